#!/bin/sh
# Entry point of the integration-test image (packaging/docker/Dockerfile.test): prepares the
# container's cgroup tree for nested containers, then runs the command (scripts/test.sh).
#
# On a cgroup v2 host, a privileged container has its own cgroup namespace whose root holds
# this container's processes. cgroup v2 lets no cgroup both hold processes and hand controllers
# to children, so crun and runc could not create the test containers' cgroups. As Docker's own
# docker-in-docker image does, move every process into a child cgroup (init) and enable the
# controllers for the children.
set -eu
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 </sys/fs/cgroup/cgroup.procs >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    sed -e 's/ / +/g' -e 's/^/+/' </sys/fs/cgroup/cgroup.controllers \
        >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || :
fi
exec "$@"
