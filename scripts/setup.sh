#!/usr/bin/env bash
# Install everything lode's tests, benchmarks and demo use, on Debian 12 (bookworm).
# Idempotent: when everything is present it changes nothing and runs no apt-get.
#
#   scripts/setup.sh        packages, kernel modules, Rust toolchain check
#   scripts/setup.sh --vm   also the prerequisites of the Linux 6.12 VM (../shared/vm/run):
#                           qemu-system-x86 from bookworm-backports, virtme-ng (pip), udev
set -euo pipefail

log() { echo "setup: $*"; }
warn() { echo "setup: WARNING: $*" >&2; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

want_vm=0
for arg in "$@"; do
  case "$arg" in
    --vm) want_vm=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (usage: scripts/setup.sh [--vm])" ;;
  esac
done

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "not root and sudo is not installed; run this as root"
  SUDO=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
apt_log=$(mktemp /tmp/lode-setup-apt.XXXXXX)
trap 'rm -f "$apt_log"' EXIT

# Packages the tests, benches and demo call into.
BASE_PACKAGES=(
  erofs-utils     # mkfs.erofs / dump.erofs / fsck.erofs: reference images and checks
  fuse3           # fusermount3, /dev/fuse userspace
  attr            # getfattr / setfattr
  time            # /usr/bin/time -v for peak RSS
  hyperfine       # benchmarks
  e2fsprogs       # mkfs.ext4 for loop-mounted scratch filesystems
  util-linux      # mount, umount, losetup, unshare, nsenter
  procps          # ps, pkill, free
  kmod            # modprobe
  debootstrap     # realistic root filesystems as test input
  squashfuse      # comparison baseline
  squashfs-tools  # mksquashfs: the squashfuse baseline of bench/fuse.sh
  docker-registry # a local OCI registry (loopback only) for pull tests
  skopeo          # copy images between registry / oci layout / docker archive
  umoci           # unpack OCI images as the reference tree
  zstd            # zstd CLI: zstd-compressed layer tarballs (tests, bench/convert.sh)
  tar             # GNU tar: layer tarballs (pax/gnu/sparse/xattrs) and reference extraction
  gzip            # gzip-compressed layer tarballs
  podman          # tests/podman.rs, bench/run: `podman run --rootfs` on a lazy mount
  iputils-ping    # bench/run: verifies the shaped link's RTT
  iproute2        # bench/run: network namespace, tc
  strace          # bench/run: the workload's file trace (prefetch list)
  curl            # bench/run: verifies the shaped link's throughput
  bc              # benchmark scripts' arithmetic
)

installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == *"install ok installed"* ]]; }

apt_updated=0
apt_update_once() {
  [ "$apt_updated" = 1 ] && return 0
  log "apt-get update"
  "${SUDO[@]}" apt-get update -qq >"$apt_log" 2>&1 || { cat "$apt_log" >&2; die "apt-get update failed"; }
  apt_updated=1
}

# apt_install [-t RELEASE] PKG...: install the given packages quietly.
apt_install() {
  local opts=()
  if [ "$1" = -t ]; then opts=(-t "$2"); shift 2; fi
  log "installing: $*"
  if ! "${SUDO[@]}" apt-get install -y -qq -o Dpkg::Use-Pty=0 "${opts[@]}" "$@" >"$apt_log" 2>&1; then
    tail -n 30 "$apt_log" >&2
    die "apt-get install ${opts[*]} $* failed"
  fi
}

exists_in_apt() {
  local cand
  cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/{print $2}')
  [ -n "$cand" ] && [ "$cand" != "(none)" ]
}

install_base_packages() {
  local missing=() available=() p
  for p in "${BASE_PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
  if [ ${#missing[@]} -eq 0 ]; then
    log "packages: all ${#BASE_PACKAGES[@]} present"
    return 0
  fi
  apt_update_once
  for p in "${missing[@]}"; do
    if exists_in_apt "$p"; then available+=("$p"); else warn "package $p does not exist in this distribution; skipped"; fi
  done
  [ ${#available[@]} -eq 0 ] || apt_install "${available[@]}"
  # The docker-registry package starts a system-wide registry on :5000 where systemd runs;
  # tests start their own on loopback ports, so keep the shared one off.
  if installed docker-registry && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
}

load_modules() {
  local m
  for m in erofs fuse; do
    if ! grep -qw "$m" /proc/filesystems; then
      "${SUDO[@]}" modprobe "$m" >/dev/null 2>&1 || true
    fi
  done
  grep -qw erofs /proc/filesystems || warn "kernel $(uname -r) has no EROFS (modprobe erofs failed): kernel-mount tests will fail"
  if ! grep -qw fuse /proc/filesystems || [ ! -e /dev/fuse ]; then
    warn "FUSE is not available (no fuse filesystem or /dev/fuse): FUSE tests will fail"
  fi
  log "kernel $(uname -r): erofs $(grep -qw erofs /proc/filesystems && echo yes || echo NO), fuse $(grep -qw fuse /proc/filesystems && echo yes || echo NO)"
}

check_rust() {
  if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
    warn "cargo is in ~/.cargo/bin but not on PATH; add it: export PATH=\"\$HOME/.cargo/bin:\$PATH\""
  fi
  if ! command -v cargo >/dev/null; then
    die "cargo not found. lode needs a recent Rust (see rust-version in Cargo.toml); Debian's
       rustc is too old. Install rustup (https://rustup.rs), e.g. as this user:
         curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
       then: source \"\$HOME/.cargo/env\" and rerun this script."
  fi
  log "$(cargo --version)"
}

setup_vm() {
  if ! command -v qemu-system-x86_64 >/dev/null; then
    # bookworm's own qemu-system-x86 conflicts with the newer qemu-utils from backports that
    # the machine image ships, so take qemu from bookworm-backports too.
    if [[ "$(apt-cache policy 2>/dev/null || true)" != *bookworm-backports* ]]; then
      local uri
      uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
      [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
      [ -n "$uri" ] || die "cannot find the Debian mirror URI to add bookworm-backports"
      log "adding bookworm-backports ($uri)"
      echo "deb $uri bookworm-backports main" | "${SUDO[@]}" tee /etc/apt/sources.list.d/lode-backports.list >/dev/null
      apt_updated=0
    fi
    apt_update_once
    apt_install -t bookworm-backports qemu-system-x86
  fi
  # virtme-ng finds its I/O ports through udev; without it the guest's exit status is lost.
  command -v udevadm >/dev/null || { installed udev || { apt_update_once; apt_install udev; }; }
  if ! command -v vng >/dev/null; then
    log "installing virtme-ng (pip)"
    if ! python3 -m pip install -q virtme-ng >"$apt_log" 2>&1; then
      if grep -q externally-managed "$apt_log"; then
        python3 -m pip install -q --break-system-packages virtme-ng >"$apt_log" 2>&1 ||
          { tail -n 20 "$apt_log" >&2; die "pip install virtme-ng failed"; }
      else
        tail -n 20 "$apt_log" >&2; die "pip install virtme-ng failed"
      fi
    fi
    if command -v pyenv >/dev/null; then pyenv rehash >/dev/null 2>&1 || true; fi
    hash -r
    command -v vng >/dev/null || warn "virtme-ng installed but vng is not on PATH"
  fi
  log "vm: $(qemu-system-x86_64 --version | head -n1), vng $(vng --version 2>/dev/null | awk '{print $NF}' || echo '?')"
}

# ---------------------------------------------------------------------------------------
# Servers for the lode-storage backend tests (crates/lode-storage/tests/backends.rs), each
# started by the tests on a free loopback port and killed by PID:
#   busybox httpd           static web server that answers Range requests   (Debian busybox)
#   python3 -m http.server  static web server that ignores Range            (python3)
#   moto, server mode       S3-compatible server that checks SigV4 signatures (PyPI moto[server])
MOTO_SPEC='moto[server]>=5.0,<6'

pip_install() {
  if ! python3 -m pip install -q "$@" >"$apt_log" 2>&1; then
    if grep -q externally-managed "$apt_log"; then
      python3 -m pip install -q --break-system-packages "$@" >"$apt_log" 2>&1 ||
        { tail -n 20 "$apt_log" >&2; die "pip install $* failed"; }
    else
      tail -n 20 "$apt_log" >&2; die "pip install $* failed"
    fi
  fi
}

# bench/run's plots (matplotlib for the python3 on PATH).
install_bench_python() {
  if ! python3 -c 'import matplotlib' >/dev/null 2>&1; then
    python3 -m pip --version >/dev/null 2>&1 || { apt_update_once; apt_install python3-pip; }
    log "installing matplotlib (pip)"
    pip_install matplotlib
  fi
  log "bench plots: matplotlib $(python3 -c 'import matplotlib; print(matplotlib.__version__)')"
}

install_backend_test_servers() {
  command -v busybox >/dev/null || { apt_update_once; apt_install busybox; }
  command -v python3 >/dev/null || { apt_update_once; apt_install python3; }
  if ! python3 -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1; then
    python3 -m pip --version >/dev/null 2>&1 || { apt_update_once; apt_install python3-pip; }
    log "installing $MOTO_SPEC (pip)"
    pip_install "$MOTO_SPEC"
    python3 -c 'import moto.server, flask, flask_cors' >/dev/null 2>&1 ||
      die "moto installed but python3 cannot import moto.server"
  fi
  log "backend test servers: busybox httpd, python3 http.server, moto $(python3 -c 'import moto; print(moto.__version__)') (S3)"
}
# ---------------------------------------------------------------------------------------

install_base_packages
load_modules
check_rust
[ "$want_vm" = 0 ] || setup_vm
install_backend_test_servers
install_bench_python
log "done"
