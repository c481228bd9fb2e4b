#!/usr/bin/env bash
# The main job on an embedded default: build a lode image from a local tree (default
# /usr/share/doc), inspect it, mount it with the kernel's EROFS driver, check the mount
# matches the source, and unmount. Everything it makes is removed on exit.
#
#   scripts/demo.sh [TREE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
if [ "$(id -u)" != 0 ]; then
  exec sudo --preserve-env=PATH,HOME,CARGO_HOME,RUSTUP_HOME "$0" "$@"
fi
tree=${1:-/usr/share/doc}

scripts/setup.sh
cargo build --release --quiet -p lode-cli
lode=target/release/lode

tmp=$(mktemp -d /var/tmp/lode-demo.XXXXXX)
mnt="$tmp/mnt"
cleanup() {
  mountpoint -q "$mnt" 2>/dev/null && "$lode" umount "$mnt"
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== lode build $tree"
"$lode" build "$tree" -o "$tmp/img"
echo
echo "== lode inspect"
"$lode" inspect "$tmp/img"
echo
echo "== lode mount --mode local (kernel EROFS, file-backed, blobs as device=)"
mkdir "$mnt"
"$lode" mount "$tmp/img" "$mnt" --mode local
grep " $mnt " /proc/mounts
echo
echo "== the mount matches the source tree (contents, modes, owners, times, links):"
if diff -r --no-dereference "$tree" "$mnt" >/dev/null \
   && diff <(cd "$tree" && find . -printf '%p %M %U %G %T@ %l\n' | sort) \
           <(cd "$mnt" && find . -printf '%p %M %U %G %T@ %l\n' | sort) >/dev/null; then
  echo "identical: $(find "$mnt" | wc -l) entries"
else
  echo "DIFFERENT" >&2
  exit 1
fi
df -h "$mnt" | tail -1
"$lode" umount "$mnt"
echo "unmounted"
