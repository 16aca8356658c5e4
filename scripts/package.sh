#!/usr/bin/env bash
# Release binaries with their debug info split off, and the Debian packages:
#
#   target/dist/bin/{lazyd,lazyctl,lazy-snapshotter}    stripped (what hosts download)
#   target/dist/debug/NAME.debug                        their debug info (crash reports:
#                                                       gdb NAME -s NAME.debug, addr2line)
#   target/dist/lazyimg_VERSION_ARCH.deb                the binaries, systemd units, the config
#                                                       (a conffile), man pages
#   target/dist/lazyimg-dbgsym_VERSION_ARCH.deb         the debug info under
#                                                       /usr/lib/debug/.build-id, where gdb
#                                                       finds it by the binary's build ID
#
#   scripts/package.sh               cargo build --release --locked, then the above
#   scripts/package.sh --no-build    from the release binaries already built
#
# Needs binutils (objcopy), dpkg-dev (dpkg-shlibdeps) and help2man; scripts/setup.sh installs them.
# DEBFULLNAME and DEBEMAIL name the maintainer.
set -euo pipefail
cd "$(dirname "$0")/.."
build=true
case "${1:-}" in
    "") ;;
    --no-build) build=false ;;
    *)
        echo "usage: scripts/package.sh [--no-build]" >&2
        exit 2
        ;;
esac

bins=(lazyd lazyctl lazy-snapshotter)
target=${CARGO_TARGET_DIR:-target}
release=$target/release
dist=$(realpath -m "$target")/dist
if $build; then
    # As scripts/setup.sh builds them: a no-op after it.
    cargo build --release --locked --workspace --bins
fi
for bin in "${bins[@]}"; do
    [ -x "$release/$bin" ] || { echo "package.sh: $release/$bin is missing; run without --no-build" >&2; exit 1; }
done

# Debian's own variables name the maintainer, where set.
maintainer="${DEBFULLNAME:-lazyimg developers} <${DEBEMAIL:-lazyimg@localhost}>"
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
rm -rf "$dist"
mkdir -p "$dist/bin" "$dist/debug"

# The split: NAME.debug keeps every debug section; the binary keeps none, nor its symbol table
# (as Debian's dh_strip does), and names NAME.debug (.gnu_debuglink) and its build ID.
for bin in "${bins[@]}"; do
    objcopy --only-keep-debug --compress-debug-sections=zlib "$release/$bin" "$dist/debug/$bin.debug"
    objcopy --strip-unneeded --remove-section=.comment \
        --add-gnu-debuglink="$dist/debug/$bin.debug" "$release/$bin" "$dist/bin/$bin"
done

build_id() {
    readelf -n "$1" | awk '/Build ID:/ { print $3 }'
}

# The packages' trees, as debian/PACKAGE in a source-package-like directory (dpkg-shlibdeps
# reads its debian/control).
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/debian"
printf 'Source: lazyimg\n\nPackage: lazyimg\nArchitecture: any\n' >"$work/debian/control"

# --- lazyimg ---
root=$work/debian/lazyimg
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
    "$root/etc/lazyd" "$root/usr/share/doc/lazyimg" "$root/usr/share/man/man1" \
    "$root/usr/share/man/man8" "$root/var/lib" "$root/var/cache"
# state_dir and cache_dir: root's alone (lazyd keeps them so, and so do the unit's
# StateDirectoryMode and CacheDirectoryMode).
install -d -m 0700 "$root/var/lib/lazyd" "$root/var/cache/lazyimg"
install -m 0755 "${bins[@]/#/$dist/bin/}" "$root/usr/bin/"
for unit in lazyd lazy-snapshotter; do
    # The units name the binaries where a manual install puts them (/usr/local/bin).
    sed 's|/usr/local/bin/|/usr/bin/|g' "packaging/systemd/$unit.service" >"$root/lib/systemd/system/$unit.service"
    chmod 0644 "$root/lib/systemd/system/$unit.service"
done
install -m 0644 packaging/config/lazyd.toml "$root/etc/lazyd/config.toml"
echo /etc/lazyd/config.toml >"$root/DEBIAN/conffiles"
install -m 0644 packaging/deb/copyright "$root/usr/share/doc/lazyimg/copyright"
install -m 0644 README.md docs/OPERATIONS.md "$root/usr/share/doc/lazyimg/"
gzip -9n "$root/usr/share/doc/lazyimg/OPERATIONS.md"
# A native package's changelog: one entry per version, dated by the last commit.
cat <<CHANGELOG | gzip -9n >"$root/usr/share/doc/lazyimg/changelog.gz"
lazyimg ($version) unstable; urgency=medium

  * Release $version (git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)).

 -- $maintainer  $(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")
CHANGELOG

# Man pages from each binary's --help (help2man runs them: they are native here), with the
# sections in packaging/deb/NAME.h2m; lazyctl's gets every command's --help too.
man() {
    local bin=$1 section=$2 name=$3 include=$4
    help2man --no-info --no-discard-stderr --section="$section" --name="$name" \
        --version-string="$version" --include="$include" "$dist/bin/$bin" |
        gzip -9n >"$root/usr/share/man/man$section/$bin.$section.gz"
}
lazyctl=$dist/bin/lazyctl
{
    echo '[COMMANDS]'
    for cmd in $("$lazyctl" --help | sed -n '/^Commands:/,/^$/s/^  \([a-z-]*\) .*/\1/p'); do
        [ "$cmd" = help ] && continue
        printf '.SS %s\n.nf\n' "$cmd"
        # roff: a backslash is \e, and a line may not start with a dot or a quote.
        "$lazyctl" "$cmd" --help | sed -e 's/\\/\\e/g' -e 's/^[.'"'"']/\\\&&/'
        echo '.fi'
    done
    cat packaging/deb/lazyctl.h2m
} >"$work/lazyctl.h2m"
man lazyd 8 "the lazy-image host agent" packaging/deb/lazyd.h2m
man lazyctl 1 "lazy container images and model weights" "$work/lazyctl.h2m"
man lazy-snapshotter 8 "containerd remote snapshotter for lazy images" packaging/deb/lazy-snapshotter.h2m

for script in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$script" "$root/DEBIAN/$script"
done

# The shared libraries the binaries link, as package dependencies.
shlibs=$(cd "$work" && dpkg-shlibdeps -O "${bins[@]/#/debian/lazyimg/usr/bin/}" | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "package.sh: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@SHLIBS@/$shlibs/" \
    -e "s|@MAINTAINER@|$maintainer|" \
    packaging/deb/control >"$root/DEBIAN/control"
dpkg-deb --root-owner-group -Zxz --build "$root" "$dist/lazyimg_${version}_${arch}.deb" >/dev/null

# --- lazyimg-dbgsym ---
dbg=$work/debian/lazyimg-dbgsym
install -d -m 0755 "$dbg/DEBIAN" "$dbg/usr/share/doc"
ln -s lazyimg "$dbg/usr/share/doc/lazyimg-dbgsym"
ids=()
for bin in "${bins[@]}"; do
    id=$(build_id "$dist/bin/$bin")
    [ -n "$id" ] || { echo "package.sh: $bin has no build ID" >&2; exit 1; }
    ids+=("$id")
    install -D -m 0644 "$dist/debug/$bin.debug" "$dbg/usr/lib/debug/.build-id/${id:0:2}/${id:2}.debug"
done
size=$(du -sk --exclude=DEBIAN "$dbg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@BUILD_IDS@/${ids[*]}/" \
    -e "s|@MAINTAINER@|$maintainer|" \
    packaging/deb/control.dbgsym >"$dbg/DEBIAN/control"
# Its sections are compressed already (zlib): xz would take minutes to gain little.
dpkg-deb --root-owner-group -Zgzip -z1 --build "$dbg" "$dist/lazyimg-dbgsym_${version}_${arch}.deb" >/dev/null

echo "package.sh: $dist"
for f in "$dist"/bin/* "$dist"/debug/* "$dist"/*.deb; do
    printf '  %-48s %6s MiB\n' "${f#"$dist"/}" "$(du -m --apparent-size "$f" | cut -f1)"
done
