#!/usr/bin/env bash
# Runs end-to-end tests that need soft-dirty page tracking (pre-copy and hybrid migrations of
# real Docker containers) inside a QEMU guest whose kernel has it, for hosts whose own kernel
# does not (`criu check --feature mem_dirty_track`). The guest boots Debian's cloud kernel under
# TCG from an ext4 disk made of this host's own /usr and /etc (Docker, CRIU, iproute2,
# iptables, Redis: the same binaries the host's test bed uses) plus the repository's built
# binaries at their host paths; inside it `ferry testbed up` builds hosts a and b and the
# e2e test binary runs the tests the filter names.
#
# Usage: scripts/vm-e2e.sh [TEST-FILTER]   (default: pre_copy_then_hybrid)
# Prints the guest's test output on stderr and exits with the guest's test status (2 if the
# guest never reported one).
#
# Environment:
#   FERRY_VM_E2E_DIR      scratch directory (default /var/tmp/ferry-vm-e2e)
#   FERRY_VM_E2E_CACHE    where the kernel package is kept (default /var/cache/ferry/precopy-vm)
#   FERRY_VM_E2E_TIMEOUT  seconds the guest may run (default 2400)
#   FERRY_VM_E2E_MEM      guest memory (default 6G)
#   FERRY_VM_E2E_SMP      guest CPUs (default 2)
#   FERRY_VM_E2E_CGROUP   v1 (default: v1 controllers with v2 at unified/, as this host) or v2
#                         (the unified hierarchy alone)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=${FERRY_VM_E2E_DIR:-/var/tmp/ferry-vm-e2e}
cache=${FERRY_VM_E2E_CACHE:-/var/cache/ferry/precopy-vm}
timeout_s=${FERRY_VM_E2E_TIMEOUT:-2400}
mem=${FERRY_VM_E2E_MEM:-6G}
smp=${FERRY_VM_E2E_SMP:-2}
cgroup=${FERRY_VM_E2E_CGROUP:-v1}
[[ $cgroup == v1 || $cgroup == v2 ]] || { echo "FERRY_VM_E2E_CGROUP must be v1 or v2, not '$cgroup'" >&2; exit 2; }
filter=${1:-pre_copy_then_hybrid}
marker=FERRY-VM-EXIT

vm_tag=vm-e2e
# shellcheck source=scripts/vm-common.sh
source "$repo/scripts/vm-common.sh"

stage=$scratch/root
disk=$scratch/root.ext4

# A killed run may have left the stage's bind-free hard-link copy or a half-written disk.
cleanup_stage() { rm -rf "$stage" "$disk.tmp"; }

stop_stale_qemu
cleanup_stage
rm -f "$disk" "$scratch/console.log"
mkdir -p "$scratch"
[[ $(id -u) == 0 ]] || die "must run as root"

command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (package qemu-system-x86)"
command -v cpio >/dev/null || apt_install cpio
command -v mkfs.ext4 >/dev/null || apt_install e2fsprogs
command -v depmod >/dev/null || apt_install kmod
find_kernel
[[ -n $moddir ]] || die "the kernel package has no modules"
kver=$(basename "$moddir")
log "kernel: $kernel"

busybox=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/busybox$' || true)
[[ -n $busybox ]] || { apt_install busybox-static; busybox=$(dpkg -L busybox-static | grep -m1 '/busybox$'); }
for tool in dockerd containerd containerd-shim-runc-v2 runc docker ip iptables criu redis-server; do
  command -v "$tool" >/dev/null || die "$tool not found on this host (scripts/install-deps.sh installs the test bed's tools)"
done

log "building the binaries and the e2e test"
(cd "$repo" && cargo build --release -q --workspace --bins) || die "cargo build failed"
e2e=$(cd "$repo" && cargo test --release -q -p ferry --test e2e --no-run --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="e2e":
        print(m["executable"])' | tail -n1)
[[ -x $e2e ]] || die "could not build the e2e test binary"
bins=${CARGO_TARGET_DIR:-$repo/target}/release

# The guest's root: this host's /usr (as hard links, minus what no test needs) and /etc, the
# cloud kernel's modules, the repository's binaries at the paths the test binary was built
# with, and an init script.
log "staging the guest's root filesystem"
mkdir -p "$stage"/{dev,proc,sys,run,tmp,var/lib,var/tmp,root,mnt}
for l in bin lib lib64 sbin; do
  [[ -L /$l ]] && ln -s "$(readlink "/$l")" "$stage/$l"
done
cp -al /usr "$stage/usr" 2>/dev/null || cp -a /usr "$stage/usr"
rm -rf "$stage"/usr/lib/{google-cloud-sdk,jvm,llvm-*,gcc} "$stage"/usr/include \
       "$stage"/usr/share/{doc,man,info,locale,fonts,icons} "$stage"/usr/lib/modules
cp -a /etc "$stage/etc"
rm -f "$stage/etc/criu/runc.conf"
mkdir -p "$stage/usr/lib/modules"
cp -a "$moddir" "$stage/usr/lib/modules/$kver"
depmod -b "$stage" "$kver" || die "depmod failed"
# The first stage's drivers, in the order their dependencies need.
boot_mods=$(modprobe -d "$stage" -S "$kver" --show-depends -a virtio_pci virtio_blk |
            awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++')
[[ -n $boot_mods ]] || die "cannot resolve the virtio block driver's modules"
initrd=$scratch/initramfs
rm -rf "$initrd" && mkdir -p "$initrd"/{bin,dev,proc,sys,newroot,modules}
mods=""
for f in $boot_mods; do
  cp "$f" "$initrd/modules/"
  mods="$mods $(basename "$f" .ko)"
done
mkdir -p "$stage/ferry-vm/bin"
: >"$stage/ferry-vm/paths"
for f in "$bins"/ferry "$bins"/ferry-workload "$e2e"; do
  mkdir -p "$stage$(dirname "$f")"
  cp -L "$f" "$stage$f"
  # A second name for a checkout under /tmp or /run, which the guest mounts tmpfs over.
  ln "$stage$f" "$stage/ferry-vm/bin/"
  echo "$f" >>"$stage/ferry-vm/paths"
done
cat >"$stage/ferry-vm/init" <<EOF
#!/bin/bash
# Second stage, on the guest's ext4 root: kernel facilities, then the tests.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null || true
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
while read -r f; do
  [ -e "\$f" ] || { mkdir -p "\$(dirname "\$f")" && cp "/ferry-vm/bin/\$(basename "\$f")" "\$f"; }
done </ferry-vm/paths
# By default the same cgroup layout as the hosts the test bed runs on (v1 controllers, v2
# beside them at unified/), so the guest proves what those hosts run.
if [ "$cgroup" = v2 ]; then
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
else
  mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
  for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
    mkdir -p /sys/fs/cgroup/\$c && mount -t cgroup -o \$c cgroup /sys/fs/cgroup/\$c
  done
  mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
  mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
  mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
fi
mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
for m in overlay veth bridge br_netfilter macvlan tun nf_tables nft_compat nft_chain_nat \\
         nf_nat nf_conntrack xt_conntrack xt_MASQUERADE xt_addrtype xt_comment xt_mark \\
         iptable_nat iptable_filter iptable_mangle ip_tables ip6_tables ip6table_filter \\
         ip6table_nat nfnetlink inet_diag tcp_diag udp_diag unix_diag netlink_diag \\
         packet_diag af_packet_diag crc32c_generic libcrc32c; do
  modprobe "\$m" 2>/dev/null || echo "module \$m not loaded"
done
ip link set lo up
hostname ferry-vm
echo "guest up: \$(uname -r), cgroup $cgroup, soft-dirty: \$(criu check --feature mem_dirty_track >/dev/null 2>&1 && echo yes || echo no)"
cd /root
rc=0
FERRY_E2E=1 FERRY_E2E_TESTBED=minimal FERRY_E2E_SOFT_DIRTY=required \\
  timeout $((timeout_s - 120)) "$e2e" "$filter" --test-threads=1 --nocapture || rc=\$?
if [ "\$rc" != 0 ]; then
  # The guest's disk is thrown away: what explains a failure has to reach the console.
  for f in \$(find /var/lib/ferry-testbed/*/ferry -name '*.log' -size +0 2>/dev/null); do
    echo "===== \$f (last 60 lines)"; tail -n 60 "\$f"
  done
  for h in /var/lib/ferry-testbed/*/agent.log /var/lib/ferry-testbed/*/dockerd.log; do
    [ -f "\$h" ] && { echo "===== \$h (last 40 lines)"; tail -n 40 "\$h"; }
  done
fi
echo "$marker \$rc"
sync
echo o >/proc/sysrq-trigger
sleep 30
EOF
chmod 0755 "$stage/ferry-vm/init"

size_mb=$(( $(du -sm "$stage" | cut -f1) + 6144 ))
log "making the guest's disk (${size_mb} MB, sparse)"
mkfs.ext4 -q -F -L ferry-vm -d "$stage" "$disk.tmp" "${size_mb}M" || die "mkfs.ext4 failed"
mv "$disk.tmp" "$disk"
cleanup_stage

# First stage: load the virtio block driver and switch to the disk.
cp "$busybox" "$initrd/bin/busybox"
cat >"$initrd/init" <<EOF
#!/bin/busybox sh
bb=/bin/busybox
\$bb mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
\$bb mount -t proc proc /proc
for m in $mods; do
  [ -e /modules/\$m.ko ] && \$bb insmod /modules/\$m.ko
done
for i in \$(\$bb seq 600); do [ -b /dev/vda ] && break; \$bb sleep 0.1; done
\$bb mount -t ext4 /dev/vda /newroot || {
  echo "cannot mount the guest disk; block devices: \$(\$bb ls /sys/block)"; \$bb dmesg | \$bb tail -n 30; \$bb poweroff -f; }
\$bb umount /proc
\$bb mount -o move /dev /newroot/dev
exec \$bb switch_root /newroot /ferry-vm/init
EOF
chmod 0755 "$initrd/init"
(cd "$initrd" && find . | cpio -o -H newc --quiet | gzip -1) >"$scratch/initramfs.cpio.gz"

console=$scratch/console.log
: >"$console"
log "booting (TCG, ${smp} CPUs, ${mem}, timeout ${timeout_s} s)"
started=$(date +%s)
timeout -k 10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg -m "$mem" -smp "$smp" -nographic -nic none -no-reboot \
  -pidfile "$scratch/qemu.pid" \
  -kernel "$kernel" -initrd "$scratch/initramfs.cpio.gz" \
  -drive "file=$disk,if=virtio,format=raw,cache=unsafe" \
  -append "console=ttyS0 quiet loglevel=1 panic=-1" \
  </dev/null >"$console" 2>&1 &
qemu=$!
tail -n +1 -f --pid="$qemu" "$console" >&2 &
tailer=$!
rc=0
wait "$qemu" || rc=$?
wait "$tailer" 2>/dev/null || true
rm -f "$scratch/qemu.pid"
log "guest ran $(( $(date +%s) - started )) s (qemu exit ${rc})"
rm -f "$disk"

status=$(grep -a "^$marker " "$console" | tail -n1 | tr -d '\r' | awk '{print $2}' || true)
if [[ -z $status ]]; then
  [[ $rc == 124 ]] && log "the guest timed out after ${timeout_s} s"
  die "the guest never reported a test status (console: $console)"
fi
[[ $status == 0 ]] || { log "the guest's tests failed (status $status)"; exit 1; }
# A filter that matches nothing passes too: insist that tests ran.
grep -aqE "test result: ok\. [1-9][0-9]* passed" "$console" || die "no test ran in the guest for filter $filter"
log "the guest's tests passed"
