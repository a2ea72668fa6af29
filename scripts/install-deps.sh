#!/usr/bin/env bash
# Installs what ferry's demo and tests need on a fresh Debian 12 machine (root). Idempotent.
# CRIU 4.2.1 is built from Debian sid's source package: Debian 12's CRIU 3.17 fails on recent
# kernels (vDSO) and 4.1 cannot dump INET sockets on kernels >= 6.16.
# qemu-system-x86 and cpio run the pre-copy test in a guest (scripts/precopy-vm.sh) whose kernel
# has the soft-dirty tracking some hosts' kernels lack.
set -euo pipefail

CRIU_WANT="4.2"
log() { printf '[install-deps] %s\n' "$*" >&2; }

need_pkgs=()
for p in docker.io iproute2 iptables redis-server redis-tools busybox-static procps \
         build-essential pkg-config libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler \
         protobuf-compiler python3-protobuf libnl-3-dev libnftables-dev libnet1-dev libcap-dev libbsd-dev \
         libgnutls28-dev uuid-dev xz-utils ca-certificates openssl postgresql-15 postgresql-client-15 \
         qemu-system-x86 cpio patch; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
  log "installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
pkill -x redis-server 2>/dev/null || true
# Debian starts a "main" cluster on install; the tests only use PostgreSQL in containers.
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | awk '$4=="online"{print $1, $2}' | while read -r v c; do
    pg_ctlcluster "$v" "$c" stop 2>/dev/null || true
  done
fi

# CRIU caches what it learns about the kernel (~20-40 ms of probes, iptables runs among them, at
# every start, so inside every dump and restore) only on a tmpfs. /run is one on most hosts but
# not on this kind of machine, so CRIU is built to keep it in a dir of its own that is made a
# tmpfs when it is not on one already.
CRIU_RUNDIR=/run/ferry-criu
mkdir -p "$CRIU_RUNDIR"
chmod 0700 "$CRIU_RUNDIR"
if [[ "$(stat -f -c %T "$CRIU_RUNDIR")" != "tmpfs" ]]; then
  mount -t tmpfs -o size=1m,mode=0700 ferry-criu "$CRIU_RUNDIR"
fi
# Patched with patches/criu (--lazy-pages-read: a post-copy dump leaves the pages in the frozen
# tasks instead of splicing them all into pipes inside the pause).
# Built with libnftables: its in-process network lock takes ~1 ms where the iptables one runs
# iptables-restore six times (~50 ms, inside a post-copy's pause).
# The installed binary records which patch set it was built with, so a changed patch rebuilds it.
CRIU_PATCHES_SUM=$(cat "$(dirname "$0")"/../patches/criu/*.patch | sha256sum | cut -c1-16)
CRIU_STAMP=/usr/local/share/ferry/criu-patches
criu_ok() {
  [[ "$(cat "$CRIU_STAMP" 2>/dev/null)" == "$CRIU_PATCHES_SUM" ]] && command -v criu >/dev/null 2>&1 && criu --version 2>/dev/null | grep -q "Version: ${CRIU_WANT}" \
    && criu check --feature network_lock_nftables >/dev/null 2>&1 \
    && criu check --feature lazy_pages_read >/dev/null 2>&1 \
    && grep -qa "${CRIU_RUNDIR}/criu.kdat" "$(command -v criu)"
}
if ! criu_ok; then
  log "building CRIU ${CRIU_WANT}.x from Debian sid sources"
  work=$(mktemp -d /tmp/ferry-criu-build.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  # Derive the deb-src entry from the machine's own apt source (never hard-code a mirror).
  uri=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
    uri=$(awk '$1=="deb"{for(i=2;i<=NF;i++) if ($i ~ /^[a-z]+:\/\//){print $i; exit}}' /etc/apt/sources.list)
  fi
  [[ -n "$uri" ]] || { log "no apt source found to derive a deb-src entry from"; exit 1; }
  mkdir -p "$work/lists/partial" "$work/src"
  echo "deb-src [trusted=yes] $uri sid main" > "$work/sources.list"
  aptopts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=-"
           -o "Dir::State::Lists=$work/lists" -o "APT::Get::List-Cleanup=0")
  apt-get "${aptopts[@]}" update -qq
  (cd "$work/src" && apt-get "${aptopts[@]}" source --download-only criu/sid) || true
  orig=$(ls "$work"/src/criu_*.orig.tar.* 2>/dev/null | head -n1)
  [[ -n "$orig" ]] || { log "criu orig tarball did not arrive"; exit 1; }
  tar -xf "$orig" -C "$work/src"
  dir=$(find "$work/src" -maxdepth 1 -type d -name 'criu-*' | head -n1)
  # ferry's own CRIU changes (patches/criu/*.patch, each says why in its message).
  for p in "$(dirname "$0")"/../patches/criu/*.patch; do
    patch -d "$dir" -p1 --forward --quiet <"$p" || { log "patch $p does not apply to $(basename "$dir")"; exit 1; }
  done
  make -C "$dir" -j"$(nproc)" RUNDIR="$CRIU_RUNDIR" criu >"$work/build.log" 2>&1 || { tail -n 40 "$work/build.log"; exit 1; }
  install -m 0755 "$dir/criu/criu" /usr/local/sbin/criu
  install -d /usr/local/share/ferry && echo "$CRIU_PATCHES_SUM" >"$CRIU_STAMP"
  hash -r
  criu_ok || { log "built criu does not report ${CRIU_WANT}"; exit 1; }
fi
log "criu: $(criu --version | head -n1)"

if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: this machine is expected to ship a Rust toolchain"; exit 1
fi
