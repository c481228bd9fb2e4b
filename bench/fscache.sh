#!/usr/bin/env bash
# cachefiles (fscache) mode vs the other modes on the same image, inside the Linux 6.12 VM
# (../shared/vm: this machine's kernel has no cachefiles). Needs root.
#
#   bench/fscache.sh [TREE] [RUNS] [--record]     (default: /usr/lib/python3.11, 3 runs)
#
# 1. On the host: `lode build TREE` (zstd blobs). In the VM: one ext4 filesystem (loop)
#    in the guest's RAM holds a native copy of TREE, the image directory (the source: no
#    network) and every mode's cache directory, so all read the same disk.
# 2. Contestants: native ext4 copy; `--mode local` (kernel EROFS, blobs expanded at mount);
#    `--mode fscache`; `--mode fuse` (passthrough); `--mode fanotify` if the kernel has
#    pre-content events (6.14+; the VM's 6.12 has not: reported as n/a).
# 3. Workload: read all data, `find -type f -print0 | xargs -0 -n 256 -P 4 cat >/dev/null`.
#    Cold: empty cache, fresh mount, page cache dropped: every chunk is fetched from the image
#    directory, decompressed and stored. Warm: the same mount right after, everything cached,
#    page cache dropped: fscache reads the cachefiles files in the kernel (no daemon), FUSE
#    reads through passthrough. Each run does every contestant in turn; median of RUNS.
# 4. Ratio = native time / contestant time (1.0 = as fast as native ext4).
# The VM emulates its CPU (TCG): times are only comparable with each other.
# With --record, the results replace the "cachefiles (fscache) mode" section of
# docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
record=0
args=()
for a in "$@"; do
  if [ "$a" = --record ]; then record=1; else args+=("$a"); fi
done
tree=${args[0]:-/usr/lib/python3.11}
runs=${args[1]:-3}
[ "$(id -u)" = 0 ] || { echo "bench/fscache.sh needs root (VM, mounts)" >&2; exit 1; }
shared=${LODE_SHARED_DIR:-$PWD/../shared}
[ -x "$shared/vm/run" ] || { echo "bench/fscache.sh: $shared/vm/run missing (set LODE_SHARED_DIR)" >&2; exit 1; }
lode=$PWD/target/release/lode
cargo build --release -q -p lode-cli
work=$(mktemp -d /var/tmp/lode-bench-fscache.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "building the image of $tree" >&2
"$lode" build "$tree" -o "$work/img" >/dev/null
files=$(find "$tree" -type f | wc -l)
bytes=$(find "$tree" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')

cat >"$work/in-vm.sh" <<'EOS'
set -euo pipefail
W=$1 L=$2 TREE=$3 RUNS=$4 BYTES=$5
cd "$W"
size_mb=$(( BYTES / 1000000 * 6 + 512 ))
# The disk lives in the guest's RAM (/tmp is a private overlay there): a loop file on the
# shared host directory would make every O_DIRECT cache write a round trip through 9p.
truncate -s "${size_mb}M" /tmp/disk.img && mkfs.ext4 -q -F /tmp/disk.img && mkdir -p d && mount -o loop /tmp/disk.img d
cp -a "$TREE" d/native
cp -a img d/img
mkdir -p mnt
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
readall() { find "$1" -type f -print0 | xargs -0 -r -n 256 -P 4 cat >/dev/null; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
wait_fscache_gone() { for _ in $(seq 200); do [ -e /run/lode/fscache/supervisor.pid ] || return 0; sleep 0.05; done; }
modes=(fscache fuse fanotify)
declare -A avail
for m in "${modes[@]}"; do avail[$m]=1; done
# local mode: blobs expanded into its cache at mount; warm only.
mkdir -p mlocal && "$L" mount d/img mlocal --mode local --cache-dir d/cache-local
for r in $(seq 1 "$RUNS"); do
  drop; t=$(now); readall d/native; echo "native warm $(since "$t")"
  drop; t=$(now); readall mlocal; echo "local warm $(since "$t")"
  for m in "${modes[@]}"; do
    [ "${avail[$m]}" = 1 ] || continue
    rm -rf "d/cache-$m"; mkdir -p "d/cache-$m"
    drop
    t=$(now)
    if ! timeout 300 "$L" mount d/img mnt --mode "$m" --cache-dir "d/cache-$m" >"mount-$m.log" 2>&1; then
      avail[$m]=0; echo "$m n/a $(tail -n1 "mount-$m.log" | cut -c1-200)"; continue
    fi
    echo "$m mount $(since "$t")"
    t=$(now); readall mnt; echo "$m cold $(since "$t")"
    drop; t=$(now); readall mnt; echo "$m warm $(since "$t")"
    if [ "$m" = fscache ]; then
      "$L" __fscache-daemon --status | python3 -c 'import json, sys; d = json.load(sys.stdin); print("fscache reads", d["reads"], d["read_bytes"], d["fetch_seconds"], d["write_seconds"])'
    fi
    "$L" umount mnt
    [ "$m" != fscache ] || wait_fscache_gone
  done
done
"$L" umount mlocal || umount mlocal
umount d
EOS

echo "running the VM (emulated; a few minutes)" >&2
raw=$(cd "$work" && "$shared/vm/run" --mem 3G --rwdir "$work" -- bash "$work/in-vm.sh" "$work" "$lode" "$tree" "$runs" "$bytes" 2>&1 | tee /dev/stderr)

python3 - "$raw" "$tree" "$files" "$bytes" "$runs" "$*" "$record" <<'EOF'
import re, statistics, sys
raw, tree, files, nbytes, runs, cmdargs, record = sys.argv[1:]
vals, na, reads = {}, {}, []
for line in raw.splitlines():
    p = line.split()
    if len(p) >= 3 and p[1] in ("mount", "cold", "warm"):
        try:
            vals.setdefault((p[0], p[1]), []).append(float(p[2]))
        except ValueError:
            pass
    elif len(p) >= 2 and p[1] == "n/a":
        na[p[0]] = " ".join(p[2:])
    elif len(p) == 6 and p[:2] == ["fscache", "reads"]:
        reads.append((int(p[2]), int(p[3]), float(p[4]), float(p[5])))
med = lambda k: statistics.median(vals[k]) if k in vals else None
native = med(("native", "warm"))
def cell(v):
    return "—" if v is None else f"{v:.2f}"
def ratio(v):
    return "—" if v is None or not native else f"{native / v:.2f}"
rows = [("native ext4 copy", "native"), ("`--mode local` (kernel EROFS, expanded blobs)", "local"),
        ("`--mode fscache`", "fscache"), ("`--mode fuse` (passthrough)", "fuse"),
        ("`--mode fanotify`", "fanotify")]
out = []
out.append(f"Tree: `{tree}`, {files} files, {int(nbytes)/1e6:.1f} MB; image directory as the source "
           f"(no network); {runs} runs, median; Linux 6.12 VM, 2 emulated CPUs (TCG), 3 GiB, ext4 on a loop file in guest RAM.")
out.append("")
out.append("| mode | mount s | cold read s | cold ratio vs native | warm read s | warm ratio vs native |")
out.append("|---|---:|---:|---:|---:|---:|")
for label, k in rows:
    if k in na:
        out.append(f"| {label} | n/a | n/a | | n/a | |")
        continue
    m, c, w = med((k, "mount")), med((k, "cold")), med((k, "warm"))
    if c is None and k in ("native", "local"):
        c = w  # nothing to fetch: a cold read is a read with the page cache dropped
    out.append(f"| {label} | {cell(m)} | {cell(c)} | {ratio(c)} | {cell(w)} | {ratio(w)} |")
out.append("")
if reads:
    n, b, f, w = (statistics.median(x) for x in zip(*reads))
    out.append(f"fscache, per cold+warm pass: {n:.0f} READ messages for {b / 1e6:.1f} MB (all during the cold read: "
               f"the warm read is served by the kernel from the cache files); summed over the daemon's reader "
               f"threads, {f:.1f} s making ranges present (fetch, verify, decompress into lode's cache) and "
               f"{w:.1f} s copying them into the cache files (O_DIRECT).")
for k, why in na.items():
    out.append(f"{k}: not measured — `lode mount` failed in the VM: {why}")
body = "\n".join(out) + "\n"
print(body)
if record == "1":
    path = "docs/benchmarks.md"
    try:
        doc = open(path).read()
    except FileNotFoundError:
        doc = "# Benchmarks\n"
    head = "## cachefiles (fscache) mode\n"
    section = head + "\n    bench/fscache.sh " + cmdargs + "\n\n" + body
    if head in doc:
        start = doc.index(head)
        m = re.search(r"\n## ", doc[start + 1:])
        end = start + 1 + m.start() + 1 if m else len(doc)
        doc = doc[:start] + section + ("\n" if m else "") + doc[end:]
    else:
        doc = doc.rstrip("\n") + "\n\n" + section
    open(path, "w").write(doc)
    print("recorded in docs/benchmarks.md", file=sys.stderr)
EOF
