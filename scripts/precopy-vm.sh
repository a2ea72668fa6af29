#!/usr/bin/env bash
# Proves CRIU pre-copy end to end in a QEMU guest. Pre-dump rounds need the kernel's soft-dirty
# page tracking, which some hosts' kernels lack (`criu check --feature mem_dirty_track`), so the
# test boots Debian's cloud kernel (which has it) under TCG, with an initramfs holding static
# busybox, criu, runc and ferry-precopy-guest (the driver; it is also the container's process).
#
# Prints the guest's result line (FERRY-PRECOPY-RESULT {json}) on stdout, the guest console on
# stderr, and exits non-zero if the guest failed or never reported.
#
# Environment:
#   FERRY_PRECOPY_GUEST_BIN   driver binary to use (default: cargo build --release)
#   FERRY_PRECOPY_VM_DIR      scratch directory (default /var/tmp/ferry-precopy-vm)
#   FERRY_PRECOPY_VM_CACHE    where the kernel package is kept (default /var/cache/ferry/precopy-vm)
#   FERRY_PRECOPY_VM_TIMEOUT  seconds the guest may run (default 840)
#   FERRY_PRECOPY_VM_ARGS     extra arguments for `ferry-precopy-guest guest` (e.g. --cgroup v1)
#   FERRY_PRECOPY_VM_SMP      guest CPUs (default 2)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=${FERRY_PRECOPY_VM_DIR:-/var/tmp/ferry-precopy-vm}
cache=${FERRY_PRECOPY_VM_CACHE:-/var/cache/ferry/precopy-vm}
timeout_s=${FERRY_PRECOPY_VM_TIMEOUT:-840}
guest_args=${FERRY_PRECOPY_VM_ARGS:-}
smp=${FERRY_PRECOPY_VM_SMP:-2}
marker=FERRY-PRECOPY-RESULT

vm_tag=precopy-vm
# shellcheck source=scripts/vm-common.sh
source "$repo/scripts/vm-common.sh"

stop_stale_qemu
rm -rf "$scratch/initramfs" "$scratch/initramfs.cpio.gz" "$scratch/console.log"
mkdir -p "$scratch"

command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (package qemu-system-x86)"
command -v cpio >/dev/null || apt_install cpio
find_kernel
log "kernel: $kernel"

busybox=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/busybox$' || true)
[[ -n $busybox ]] || { apt_install busybox-static; busybox=$(dpkg -L busybox-static | grep -m1 '/busybox$'); }
! ldd "$busybox" >/dev/null 2>&1 || die "$busybox is not statically linked"
criu=$(command -v criu) || die "criu not found (scripts/install-deps.sh builds it)"
runc=$(command -v runc) || die "runc not found"
tar=$(command -v tar) || die "tar not found"
"$tar" --version | grep -q GNU || die "$tar is not GNU tar (CRIU archives tmpfs mounts with GNU tar's options)"
gzip=$(command -v gzip) || die "gzip not found"

guest=${FERRY_PRECOPY_GUEST_BIN:-}
if [[ -z $guest ]]; then
  log "building ferry-precopy-guest"
  (cd "$repo" && cargo build --release -q -p ferry-precopy-guest) || die "cargo build failed"
  guest=${CARGO_TARGET_DIR:-$repo/target}/release/ferry-precopy-guest
fi
[[ -x $guest ]] || die "no driver binary at $guest"

root=$scratch/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,var/lib,lib/modules}
cp "$busybox" "$root/bin/busybox"
# GNU tar starts its compressor through /bin/sh -c.
ln -s busybox "$root/bin/sh"
copy_with_libs "$root" "$criu" /usr/local/sbin/criu
copy_with_libs "$root" "$runc" /usr/sbin/runc
copy_with_libs "$root" "$tar" /bin/tar
copy_with_libs "$root" "$gzip" /bin/gzip
copy_with_libs "$root" "$guest" /bin/ferry-precopy-guest
# CRIU gathers sockets through the sock_diag modules, and its kernel probe (built with
# libnftables) needs nf_tables; the cloud kernel builds them as modules. Listed in load order.
modules="inet_diag tcp_diag udp_diag unix_diag netlink_diag af_packet_diag crc32c_generic libcrc32c nfnetlink nf_tables"
for m in $modules; do
  [[ -n $moddir ]] || break
  f=$(find "$moddir" -name "$m.ko" | head -n1)
  if [[ -n $f ]]; then cp "$f" "$root/lib/modules/"; fi
done
bundle=$root/bundle/rootfs
mkdir -p "$bundle"/{bin,dev,proc,sys,tmp,state}
copy_with_libs "$bundle" "$guest" /bin/ferry-precopy-guest

cat >"$root/init" <<EOF
#!/bin/busybox sh
# Stage 1 runs on the initramfs, which cannot be pivot_root'ed away from: copy everything
# into a tmpfs and switch_root there, so runc can pivot_root into its container as usual.
bb=/bin/busybox
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/sbin
if [ ! -e /.stage2 ]; then
  \$bb mount -t devtmpfs dev /dev
  exec </dev/console >/dev/console 2>&1
  \$bb mkdir -p /newroot
  \$bb mount -t tmpfs -o size=75% root /newroot
  for d in \$(\$bb ls -A /); do
    case \$d in newroot|dev|proc|sys) ;; *) \$bb cp -a "/\$d" /newroot/ ;; esac
  done
  \$bb mkdir -p /newroot/dev /newroot/proc /newroot/sys
  \$bb touch /newroot/.stage2
  \$bb mount -o move /dev /newroot/dev
  exec \$bb switch_root /newroot /init
fi
[ -e /dev/null ] || \$bb mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
# CRIU's kernel probe connects a TCP socket over loopback (for TCP repair).
\$bb ip link set lo up
for m in $modules; do
  [ -e /lib/modules/\$m.ko ] && \$bb insmod /lib/modules/\$m.ko
done
/bin/ferry-precopy-guest guest $guest_args
echo "ferry-precopy-guest exited with \$?"
\$bb sync
\$bb poweroff -f
EOF
chmod 0755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$scratch/initramfs.cpio.gz"
log "initramfs: $(du -h "$scratch/initramfs.cpio.gz" | cut -f1)"

console=$scratch/console.log
: >"$console"
log "booting (TCG, ${smp} CPUs, timeout ${timeout_s} s)"
started=$(date +%s)
# -no-reboot with panic=-1 turns a guest panic into a QEMU exit instead of a boot loop.
timeout -k 10 "$timeout_s" qemu-system-x86_64 \
  -accel tcg -m 2G -smp "$smp" -nographic -nic none -no-reboot \
  -pidfile "$scratch/qemu.pid" \
  -kernel "$kernel" -initrd "$scratch/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet loglevel=1 panic=-1" \
  </dev/null >"$console" 2>&1 &
qemu=$!
tail -n +1 -f --pid="$qemu" "$console" >&2 &
tailer=$!
rc=0
wait "$qemu" || rc=$?
wait "$tailer" 2>/dev/null || true
rm -f "$scratch/qemu.pid"
elapsed=$(( $(date +%s) - started ))
log "guest ran ${elapsed} s (qemu exit ${rc})"

result=$(grep -a "$marker " "$console" | tail -n1 | tr -d '\r' | sed "s/^.*$marker /$marker /" || true)
if [[ -z $result ]]; then
  [[ $rc == 124 ]] && log "the guest timed out after ${timeout_s} s"
  die "the guest never reported a result (console: $console)"
fi
printf '%s\n' "$result"
grep -q '"verdict":"pass"' <<<"$result" || { log "the guest test failed"; exit 1; }
