#!/usr/bin/env bash
# Build throughput: `lode build` vs `mkfs.erofs` on the same tree, side by side.
#
#   bench/build.sh [TREE] [RUNS]      (default: /usr/share, 3 runs)
#
# Both tools read the tree from a warm page cache (one untimed read first) and write to the
# same filesystem. Prints median wall time, MB/s of input, peak RSS, output size, and the ratio
# lode/mkfs.erofs, and checks the issue's targets (>= 250 MB/s, <= 128 MiB peak RSS).
set -euo pipefail
cd "$(dirname "$0")/.."
tree=${1:-/usr/share}
runs=${2:-3}
lode=target/release/lode
[ -x "$lode" ] || cargo build --release -q -p lode-cli
command -v mkfs.erofs >/dev/null || { echo "mkfs.erofs missing: run scripts/setup.sh" >&2; exit 1; }
work=$(mktemp -d /var/tmp/lode-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

input_bytes=$(find "$tree" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
entries=$(find "$tree" | wc -l)
# Warm the page cache so both tools see the same input conditions.
tar -cf - "$tree" 2>/dev/null | cat >/dev/null

# measure NAME OUTPUT_PATH CMD... -> prints "seconds rss_kib"
measure() {
  local out=$1; shift
  local samples=()
  local rss=0
  for _ in $(seq "$runs"); do
    rm -rf "$out"
    sync
    /usr/bin/time -f '%e %M' -o "$work/time" "$@" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    read -r t m <"$work/time"
    samples+=("$t")
    [ "$m" -gt "$rss" ] && rss=$m
  done
  local median
  median=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "$median $rss"
}

size_of() { du -sb --apparent-size "$1" | cut -f1; }

read -r lode_t lode_rss < <(measure "$work/lode" "$lode" build --compress none "$tree" -o "$work/lode")
lode_size=$(size_of "$work/lode")
read -r lodez_t lodez_rss < <(measure "$work/lodez" "$lode" build --compress zstd "$tree" -o "$work/lodez")
lodez_size=$(size_of "$work/lodez")
read -r mkfs_t mkfs_rss < <(measure "$work/mkfs.img" mkfs.erofs --quiet "$work/mkfs.img" "$tree")
mkfs_size=$(size_of "$work/mkfs.img")
read -r mkfsc_t mkfsc_rss < <(measure "$work/mkfsc.img" mkfs.erofs --quiet --chunksize=1048576 --blobdev="$work/mkfsc.blob" "$work/mkfsc.img" "$tree")
mkfsc_size=$(( $(size_of "$work/mkfsc.img") + $(size_of "$work/mkfsc.blob") ))

python3 - "$tree" "$input_bytes" "$entries" "$runs" "$lode_t" "$lode_rss" "$lode_size" "$lodez_t" "$lodez_rss" "$lodez_size" \
  "$mkfs_t" "$mkfs_rss" "$mkfs_size" "$mkfsc_t" "$mkfsc_rss" "$mkfsc_size" "$(nproc)" <<'PY'
import sys
(tree, inp, entries, runs, lt, lr, ls, zt, zr, zs, mt, mr, ms, ct, cr, cs, cores) = sys.argv[1:]
inp = int(inp)
rows = [("lode build --compress none", float(lt), int(lr), int(ls)),
        ("lode build --compress zstd", float(zt), int(zr), int(zs)),
        ("mkfs.erofs", float(mt), int(mr), int(ms)),
        ("mkfs.erofs --chunksize=1M --blobdev", float(ct), int(cr), int(cs))]
print(f"tree {tree}: {inp/1e6:.1f} MB in regular files, {entries} entries; {cores} cores; median of {runs} runs, warm page cache")
print(f"{'tool':38} {'time s':>7} {'MB/s':>7} {'peak RSS MiB':>13} {'output MB':>10} {'time vs lode':>13}")
for name, t, rss, size in rows:
    print(f"{name:38} {t:7.2f} {inp/1e6/t:7.0f} {rss/1024:13.1f} {size/1e6:10.1f} {t/rows[0][1]:12.2f}x")
lode_mbs = inp / 1e6 / rows[0][1]
lode_rss = rows[0][2] / 1024
print(f"target (uncompressed build): >= 250 MB/s of input: {'MET' if lode_mbs >= 250 else 'MISSED'} ({lode_mbs:.0f} MB/s)")
print(f"target: peak RSS <= 128 MiB: {'MET' if lode_rss <= 128 else 'MISSED'} ({lode_rss:.1f} MiB)")
PY
