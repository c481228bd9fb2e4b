#!/usr/bin/env bash
# The main job on an embedded default: build a lode image from a local tree (default
# /usr/share/doc), serve it LAZILY (`lode mount`, --mode auto: fanotify on Linux 6.14+,
# else cachefiles, else FUSE) from a cold cache, run a small workload on it, and show what
# was fetched against the image size; then read everything, check the mount matches the
# source exactly, and unmount. Everything it makes is removed on exit.
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
lode=$PWD/target/release/lode

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
"$lode" inspect "$tmp/img" | head -20
echo
echo "== lode mount (lazy, empty cache)"
mkdir "$mnt"
"$lode" mount "$tmp/img" "$mnt" --cache-dir "$tmp/cache"
stats=$(ls /run/lode/mounts/*.stats 2>/dev/null | xargs -r grep -l "\"$mnt\"" | head -1 || true)
show_stats() {
  [ -n "$stats" ] || { "$lode" cache ls --cache-dir "$tmp/cache"; return; }
  sleep 0.5
  python3 - "$stats" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
f = s["fetch"]
print(f"  fetched {f['bytes_fetched']/1e6:.2f} MB in {f['requests']} requests "
      f"({100*f['bytes_fetched']/max(1,s['blob_bytes']):.1f}% of the image's {s['blob_bytes']/1e6:.1f} MB of blobs); "
      f"chunks cached {s['chunks_present']}/{s['chunks']}")
PY
}
echo "right after mount:"; show_stats
echo
echo "== workload: list everything, read the first 50 files"
mapfile -t files < <(find "$mnt" -type f | sort | head -50)
cat "${files[@]}" > /dev/null
echo "$(find "$mnt" | wc -l) entries listed"; show_stats
echo
echo "== read everything and compare with the source (contents, modes, owners, times, links)"
if diff -r --no-dereference "$tree" "$mnt" >/dev/null \
   && diff <(cd "$tree" && find . -printf '%p %M %U %G %T@ %l\n' | sort) \
           <(cd "$mnt" && find . -printf '%p %M %U %G %T@ %l\n' | sort) >/dev/null; then
  echo "identical: $(find "$mnt" | wc -l) entries"
else
  echo "DIFFERENT" >&2
  exit 1
fi
show_stats
echo
echo "== lode status (also: lode status --json, lode daemon's GET /metrics)"
"$lode" status "$mnt"
echo
"$lode" cache ls --cache-dir "$tmp/cache"
"$lode" umount "$mnt"
echo "unmounted"
