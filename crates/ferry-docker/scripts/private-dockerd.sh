#!/bin/sh
# Starts/stops a throw-away dockerd in its own network namespace, for ferry-docker's live test.
#
# Why a namespace: the test must not touch the machine's own Docker (if any) nor put traffic anywhere
# but loopback and namespaces it owns. Why the cgroup re-mount: `ip netns exec` remounts /sys in a new
# mount namespace, which hides /sys/fs/cgroup, and dockerd then dies with "Devices cgroup isn't mounted".
# We re-mount exactly the hierarchies the root namespace has (v1 controllers, hybrid or pure v2), so
# dockerd sees the same cgroup layout as a dockerd started on the host would.
#
#   private-dockerd.sh start   -> prints the DOCKER_HOST to use (FERRYTEST_EXPERIMENTAL=1 adds
#                                 --experimental, for the live test's checkpoint part)
#   private-dockerd.sh stop    -> kills that dockerd (by its pid file), removes its dirs and the namespace
set -eu
NS=${FERRYTEST_NS:-ferrytest-docker}
DATA=/var/lib/$NS
EXEC=/run/$NS
SOCK=$EXEC/docker.sock
PIDFILE=$EXEC/d.pid
LOG=/tmp/$NS.log
DOCKER=${DOCKER_CLI:-/usr/bin/docker}

remount_cgroups() {
    # Lines of the root namespace's /proc/1/mounts that are cgroup file systems, as "fstype mountpoint options".
    awk '$3 == "cgroup" || $3 == "cgroup2" || ($2 == "/sys/fs/cgroup" && $3 == "tmpfs") {print $3, $2, $4}' /proc/1/mounts
}

case "${1:-}" in
start)
    ip netns add "$NS"
    ip netns exec "$NS" ip link set lo up
    # A parent for a macvlan network that reaches nothing outside the namespace (a veth pair both
    # of whose ends stay here; this kernel has no "dummy" link type).
    ip netns exec "$NS" ip link add ferryparent0 type veth peer name ferryparent1
    ip netns exec "$NS" ip link set ferryparent0 up
    ip netns exec "$NS" ip link set ferryparent1 up
    ip netns exec "$NS" sysctl -qw net.ipv4.ip_forward=1
    mkdir -p "$DATA" "$EXEC"
    MOUNTS=$(remount_cgroups)
    EXTRA=""
    [ "${FERRYTEST_EXPERIMENTAL:-}" = 1 ] && EXTRA="--experimental"
    # shellcheck disable=SC2016
    ip netns exec "$NS" env MOUNTS="$MOUNTS" DATA="$DATA" EXEC="$EXEC" SOCK="$SOCK" PIDFILE="$PIDFILE" EXTRA="$EXTRA" sh -c '
        set -e
        echo "$MOUNTS" | while read -r fstype dir opts; do
            [ -n "$fstype" ] || continue
            mkdir -p "$dir"
            case "$fstype" in
            tmpfs)   mount -t tmpfs -o "$opts" tmpfs "$dir" ;;
            cgroup2) mount -t cgroup2 -o "$opts" none "$dir" ;;
            cgroup)  mount -t cgroup -o "$opts" cgroup "$dir" ;;
            esac
        done
        exec dockerd --data-root "$DATA" --exec-root "$EXEC" -H "unix://$SOCK" --pidfile "$PIDFILE" \
            --bridge=none --iptables=false $EXTRA
    ' >"$LOG" 2>&1 &
    i=0
    until "$DOCKER" -H "unix://$SOCK" version >/dev/null 2>&1; do
        i=$((i + 1))
        if [ $i -gt 100 ]; then echo "dockerd did not come up; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; fi
        sleep 0.2
    done
    echo "unix://$SOCK"
    ;;
stop)
    if [ -f "$PIDFILE" ]; then
        pid=$(cat "$PIDFILE")
        kill "$pid" 2>/dev/null || true
        i=0
        while kill -0 "$pid" 2>/dev/null; do
            i=$((i + 1)); [ $i -gt 150 ] && { kill -9 "$pid" 2>/dev/null || true; break; }
            sleep 0.2
        done
    fi
    # Container mounts lived in dockerd's private mount namespace and died with it; what is left is files.
    rm -rf "$DATA" "$EXEC"
    ip netns del "$NS" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
