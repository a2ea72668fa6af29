# Shared by the scripts that boot Debian's cloud kernel (which has soft-dirty page tracking)
# under QEMU/TCG: logging, a stale-QEMU guard, package installs, fetching the kernel, and
# copying binaries with their libraries. Source it after setting:
#   vm_tag   prefix of log lines        scratch  the run's scratch directory
#   cache    where the kernel package is kept
# find_kernel sets `kernel` (the vmlinuz) and `moddir` (its lib/modules/<version>).

log() { printf '[%s] %s\n' "${vm_tag:-vm}" "$*" >&2; }
die() { log "error: $*"; exit 2; }

# A previous run that was killed may have left its QEMU running: stop it, but only if the
# pidfile names a QEMU that booted from this scratch directory.
stop_stale_qemu() {
  local pidfile=$scratch/qemu.pid pid
  [[ -f $pidfile ]] || return 0
  pid=$(tr -dc 0-9 <"$pidfile")
  if [[ -n $pid && -r /proc/$pid/cmdline ]] &&
     tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "qemu-system.*$scratch/"; then
    log "stopping QEMU $pid left by an earlier run"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

apt_install() {
  [[ $(id -u) == 0 ]] || die "$* missing and not root to install it"
  log "installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } ||
    die "apt-get install $* failed"
}

# The cloud kernel package is fetched into the cache with apt's own sources and unpacked
# there; nothing is installed on the host.
find_kernel() {
  local deb="" dir pkg f
  for f in "$cache"/linux-image-*-cloud-amd64_*.deb; do
    [[ -e $f ]] && deb=$f
  done
  if [[ -z $deb ]]; then
    mkdir -p "$cache"
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
          awk '/Depends: linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}')
    if [[ -z $pkg ]]; then
      apt-get update -qq >/dev/null 2>&1 || true
      pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9].*-cloud-amd64$/ {print $2; exit}')
    fi
    [[ -n $pkg ]] || die "apt knows no linux-image-cloud-amd64 (Debian's cloud kernel): cannot get a kernel with soft-dirty tracking"
    log "downloading $pkg"
    (cd "$cache" && apt-get download -o APT::Sandbox::User=root "$pkg" >/dev/null) ||
      die "apt-get download $pkg failed"
    for f in "$cache/$pkg"_*.deb; do
      [[ -e $f ]] && deb=$f
    done
    [[ -n $deb ]] || die "apt-get download $pkg left no .deb in $cache"
  fi
  dir=${deb%.deb}
  if [[ ! -d $dir/boot ]]; then
    rm -rf "$dir.tmp"
    dpkg-deb -x "$deb" "$dir.tmp" || die "cannot unpack $deb"
    mv "$dir.tmp" "$dir"
  fi
  kernel="" moddir=""
  for f in "$dir"/boot/vmlinuz-*; do [[ -e $f ]] && kernel=$f; done
  for f in "$dir"/lib/modules/*; do [[ -d $f ]] && moddir=$f; done
  [[ -n $kernel ]] || die "no vmlinuz in $deb"
}

# Copies an executable and every shared library ldd names into the tree at $1, at the same
# paths, so the guest's dynamic loader finds them where the host's did.
copy_with_libs() {
  local root=$1 bin=$2 dest=${3:-$2} lib
  mkdir -p "$root$(dirname "$dest")"
  if [[ $(basename "$bin") == ferry-precopy-guest ]] && command -v strip >/dev/null; then
    strip --strip-debug -o "$root$dest" "$bin"
  else
    cp -L "$bin" "$root$dest"
  fi
  for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \// {print $3} /^[ \t]*\// {print $1}'); do
    [[ -e $root$lib ]] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

