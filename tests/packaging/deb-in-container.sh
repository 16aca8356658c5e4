#!/bin/bash
# Inside the systemd container of deb.sh: /pkg holds the package and base.tar (an image to
# mount and run), /ref that image's tree. Every step is checked; the first failure ends it.
set -euo pipefail
# shellcheck source=tests/packaging/common.sh
source /tests/common.sh
deb=$1
export DEBIAN_FRONTEND=noninteractive

# Every path of the system with its mode and owners, but for the files apt, dpkg, systemd and
# the logs keep for themselves, and shadow's backups (/etc/group-).
snapshot() {
    find /etc /usr /var /opt /root /srv -xdev \( -path /var/log -o -path /var/lib/dpkg \
        -o -path /var/lib/apt -o -path /var/cache/apt -o -path /var/cache/debconf \
        -o -path /var/lib/systemd -o -path /var/cache/ldconfig -o -path /etc/ld.so.cache \
        -o -name '*-' -path '/etc/*' \) -prune -o -printf '%p %M %u %g\n' | sort
}

apt-get update -qq
# The dependencies first, so that what the package leaves after its purge stands out.
apt-get install -y -qq --no-install-recommends fuse3 ca-certificates crun runc \
    golang-github-containers-common >/dev/null
before=$(snapshot)

echo "--- install"
apt-get install -y -qq --no-install-recommends "$deb" >/tmp/install.log 2>&1 ||
    { cat /tmp/install.log; fail "apt-get install $deb"; }
check "the package is installed" dpkg -s lazyimg >/dev/null
check "its config is a conffile" sh -c "dpkg-query -W -f='\${Conffiles}' lazyimg | grep -q ' /etc/lazyd/config.toml '"
check "the group lazyd exists" getent group lazyd >/dev/null
check "/var/lib/lazyd is root's alone" test "$(stat -c %a:%U:%G /var/lib/lazyd)" = 700:root:root
check "/var/cache/lazyimg is root's alone" test "$(stat -c %a:%U:%G /var/cache/lazyimg)" = 700:root:root
check "lazyd's man page has its FILES" sh -c "zcat /usr/share/man/man8/lazyd.8.gz | grep -q '^.SH FILES'"
check "lazyctl's man page has every command" sh -c "zcat /usr/share/man/man1/lazyctl.1.gz | grep -q '^.SS run'"
check "lazyctl --help answers" sh -c "lazyctl --help >/dev/null"
check "the unit is not enabled" sh -c "! systemctl is-enabled --quiet lazyd"
check "lazyd was not started" sh -c "! systemctl is-active --quiet lazyd && ! pidof lazyd"

echo "--- start"
check "systemctl enable --now lazyd" systemctl enable --now lazyd
check "lazyd is active" systemctl is-active --quiet lazyd
check "the socket is 0660, group lazyd" test "$(stat -c %a:%G /run/lazyd/lazyd.sock)" = 660:lazyd
useradd -m -G lazyd member
useradd -m outsider
check "a member of lazyd uses the API" runuser -u member -- lazyctl status >/dev/null
check "anyone else is refused" sh -c "! runuser -u outsider -- lazyctl status >/dev/null 2>&1"

echo "--- mount"
lazyctl convert docker-archive:/pkg/base.tar dir:/var/tmp/store:base >/dev/null
mkdir -p /mnt/base
check "lazyctl mount" lazyctl mount dir:/var/tmp/store:base /mnt/base
same_tree /ref /mnt/base

echo "--- restart under the mount"
exec 3</mnt/base/etc/debian_version
check "systemctl restart lazyd" systemctl restart lazyd
check "the mount serves after the restart" diff /ref/etc/os-release /mnt/base/etc/os-release
check "a file opened before the restart reads" diff /ref/etc/debian_version /dev/fd/3
exec 3<&-
check "lazyctl status lists the mount" sh -c "lazyctl status | grep -q /mnt/base"

echo "--- reinstall (as an upgrade) under the running lazyd"
pid=$(systemctl show -p MainPID --value lazyd)
dpkg -i "$deb" >/tmp/upgrade.log 2>&1 || { cat /tmp/upgrade.log; fail "dpkg -i over the installed package"; }
check "the upgrade says how to run the new binary" grep -q 'systemctl restart lazyd' /tmp/upgrade.log
check "the upgrade left lazyd running, the same process" test "$(systemctl show -p MainPID --value lazyd)" = "$pid"
check "the mount serves after the upgrade" diff /ref/etc/os-release /mnt/base/etc/os-release

echo "--- run a container"
check_run /ref lazyctl run dir:/var/tmp/store:base

echo "--- stop and purge"
check "lazyctl umount" lazyctl umount /mnt/base
# A plain stop leaves the mounts with systemd for the next start; the gentle stop unmounts them
# (the image's shared lower, kept after the container for the next one, among them).
check "the gentle stop (SIGUSR1)" systemctl kill --kill-whom=main --signal=SIGUSR1 lazyd
for _ in $(seq 100); do
    systemctl is-active --quiet lazyd || break
    sleep 0.1
done
check "lazyd stopped" sh -c "! systemctl is-active --quiet lazyd"
check "no mount is left under /var/lib/lazyd" sh -c "! grep -q ' /var/lib/lazyd' /proc/self/mountinfo"
apt-get purge -y -qq lazyimg >/tmp/purge.log 2>&1 || { cat /tmp/purge.log; fail "apt-get purge lazyimg"; }
check "the package is gone" sh -c "! dpkg -s lazyimg >/dev/null 2>&1"
check "the group is gone" sh -c "! getent group lazyd"
for path in /etc/lazyd /var/lib/lazyd /var/cache/lazyimg /run/lazyd /usr/bin/lazyd \
    /lib/systemd/system/lazyd.service /etc/systemd/system/multi-user.target.wants/lazyd.service; do
    check "$path is gone" test ! -e "$path" -a ! -L "$path"
done
userdel -r member 2>/dev/null
userdel -r outsider 2>/dev/null
rm -rf /var/tmp/store
rmdir /mnt/base
check "nothing else is left" diff <(echo "$before") <(snapshot)
echo "deb-in-container.sh: passed"
