# shellcheck shell=bash
# Shared by the packaging tests (sourced): checks that say what failed, the docker flags that
# give a container what mounting FUSE and overlays and running containers need, and the test
# image of a Debian root.

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

# `check DESCRIPTION COMMAND...`: runs the command; its failure fails the test, named.
check() {
    local what=$1
    shift
    "$@" || fail "$what (command: $*)"
    echo "ok: $what" >&2
}

# The flags of a container that mounts (FUSE, overlay): --privileged where the host allows it,
# else every capability but those outside the host's bounding set (as CAP_SYS_RESOURCE on some
# VMs) with no seccomp or AppArmor profile. Sets PRIVILEGE_FLAGS, and NESTING_FLAGS for one that
# also runs containers or systemd; says which it chose.
# shellcheck disable=SC2034 # PRIVILEGE_FLAGS and NESTING_FLAGS are for the scripts that source this.
choose_privilege() {
    local image=$1
    NESTING_FLAGS=()
    if docker run --rm --privileged --entrypoint true "$image" >/dev/null 2>&1; then
        PRIVILEGE_FLAGS=(--privileged --device /dev/fuse)
        echo "docker: --privileged" >&2
        return
    fi
    local bounding dropped=() cap
    bounding=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
    # docker's capability names and their numbers (linux/capability.h) for the ones a
    # container's --privileged asks for and a host may lack.
    for cap in SYS_RESOURCE:24 SYS_MODULE:16 SYS_RAWIO:17 SYS_BOOT:22 SYS_TIME:25 MAC_ADMIN:33 \
        MAC_OVERRIDE:32 SYSLOG:34 WAKE_ALARM:35 BLOCK_SUSPEND:36 AUDIT_READ:37 PERFMON:38 BPF:39 \
        CHECKPOINT_RESTORE:40; do
        if ! (((0x$bounding >> ${cap#*:}) & 1)); then
            dropped+=(--cap-drop "${cap%:*}")
        fi
    done
    PRIVILEGE_FLAGS=(--cap-add ALL "${dropped[@]}" --security-opt seccomp=unconfined
        --security-opt apparmor=unconfined --device /dev/fuse)
    # Without --privileged the cgroup tree is read-only in the container: on a cgroup v1 host,
    # a container that runs containers (or systemd) binds the host's (its own cgroups are below
    # it). Not tried on a cgroup v2 host, where --privileged has been enough.
    if [ ! -f /sys/fs/cgroup/cgroup.controllers ]; then
        NESTING_FLAGS=(--cgroupns host -v /sys/fs/cgroup:/sys/fs/cgroup:rw)
    fi
    echo "docker: --privileged is refused on this host; using ${PRIVILEGE_FLAGS[*]}" >&2
    docker run --rm "${PRIVILEGE_FLAGS[@]}" --entrypoint true "$image" >/dev/null ||
        fail "docker refuses even ${PRIVILEGE_FLAGS[*]}"
}

# A tree as a sorted listing of each path's type, mode, owners, size (but directories', which
# are their file system's business), link target and mtime.
listing() {
    (cd "$1" && find . \( -type d -printf '%P %M %U %G - %Ts\n' \) -o -printf '%P %M %U %G %s %l %Ts\n' | sort)
}

# A tree's contents: every regular file's sha256 and every device's numbers.
contents() {
    (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum &&
        find . \( -type c -o -type b \) -exec stat -c '%n %t:%T' {} + | sort)
}

# `same_tree REFERENCE TREE`: both listings and contents are equal, checked.
same_tree() {
    check "$2 lists as $1 (types, modes, owners, sizes, links, mtimes)" \
        diff <(listing "$1") <(listing "$2")
    check "every file's bytes and every device's numbers in $2 equal $1's" \
        diff <(contents "$1") <(contents "$2")
}

# dockerd answering, started here (in the background, log in /var/log/lazyimg-dockerd.log) when
# none runs: CI machines and fresh hosts have Debian's docker.io installed, not started.
ensure_dockerd() {
    docker info >/dev/null 2>&1 && return
    command -v dockerd >/dev/null || fail "no docker engine: apt-get install docker.io (scripts/setup.sh does)"
    echo "docker: no engine answers; starting dockerd (log: /var/log/lazyimg-dockerd.log)" >&2
    setsid dockerd >/var/log/lazyimg-dockerd.log 2>&1 </dev/null &
    for _ in $(seq 150); do
        docker info >/dev/null 2>&1 && return
        sleep 0.2
    done
    tail -20 /var/log/lazyimg-dockerd.log >&2
    fail "dockerd did not start"
}

# `save_with_reference IMAGE TAR REF`: IMAGE (of one layer, as scripts/docker-base.sh makes it)
# as `docker save` writes it to TAR, and that layer unpacked into REF, the reference tree.
save_with_reference() {
    local image=$1 tar=$2 ref=$3 layer
    docker save -o "$tar" "$image"
    layer=$(tar -xOf "$tar" manifest.json | python3 -c 'import json, sys; l = json.load(sys.stdin)[0]["Layers"]; assert len(l) == 1, l; print(l[0])')
    tar -xOf "$tar" "$layer" | tar -x --numeric-owner --xattrs -C "$ref"
}

# `check_run REF LAZYCTL-RUN-ARGS...`: `LAZYCTL-RUN-ARGS -- /bin/sh -c ...` (a `lazyctl run`
# of the reference image) must exit with the container's 3, having printed the image's
# /etc/debian_version as REF has it.
check_run() {
    local ref=$1 out status log
    shift
    log=$(mktemp)
    set +e
    out=$("$@" -- /bin/sh -c 'cat /etc/debian_version; exit 3' 2>"$log")
    status=$?
    set -e
    [ "$status" = 3 ] || { cat "$log"; fail "lazyctl run exited $status, not the container's 3"; }
    rm -f "$log"
    check "the container read the image" test "$out" = "$(cat "$ref/etc/debian_version")"
}
