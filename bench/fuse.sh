#!/usr/bin/env bash
# FUSE mode vs native ext4 and squashfuse on the same tree (needs root).
#
#   bench/fuse.sh [TREE] [RUNS] [--record]     (default: /usr/share, 5 runs)
#
# 1. Copy TREE to /var/tmp, `lode build` it; mount it with `--mode fuse` from the image
#    directory and read everything twice, so every chunk is in the lode cache and every
#    file of at least 64 KiB (the default --passthrough-min-size) has its backing file: the
#    "warm" state measured here. Also mounted: `--no-passthrough` (same cache), and
#    passthrough for every file (`--passthrough-min-size 1`, own cache, warmed the same way).
# 2. The same tree copied into an ext4 filesystem on a loop device (native), and into an
#    uncompressed squashfs image (mksquashfs -noI -noD -noF -noX) served by squashfuse:
#    all read the same bytes from the same disk.
# 3. Workload: read all data — `find -type f -print0 | xargs -0 -n 256 -P 4 cat >/dev/null`
#    (4 readers, as a container starting up would). Measured with the page cache dropped
#    before each run ("cold page cache": every read goes to storage, every lookup to the
#    filesystem) and again without dropping ("hot"). Median of RUNS; contestants alternate.
#    Also 20,000 4 KiB preads at random offsets of the files >= 1 MiB (4 threads, page cache
#    dropped): where passthrough matters most (every miss is a round trip to lode without).
# 4. Ratio = native time / contestant time. Targets (cold page cache): passthrough >= 0.9,
#    no passthrough >= 0.6: MET / MISSED.
# With --record, the results replace the "FUSE mode" section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
record=0
args=()
for a in "$@"; do
  if [ "$a" = --record ]; then record=1; else args+=("$a"); fi
done
tree=${args[0]:-/usr/share}
runs=${args[1]:-5}
[ "$(id -u)" = 0 ] || { echo "bench/fuse.sh needs root (mounts)" >&2; exit 1; }
for t in mksquashfs squashfuse mkfs.ext4; do
  command -v $t >/dev/null || { echo "bench/fuse.sh: $t missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
lode=$PWD/target/release/lode
cargo build --release -q -p lode-cli
work=$(mktemp -d /var/tmp/lode-bench-fuse.XXXXXX)
export LODE_RUN_DIR=$work/run
cleanup() {
  for m in "$work"/m-*; do
    [ -d "$m" ] || continue
    if mountpoint -q "$m"; then
      case "$m" in
        *-pt|*-ptall|*-nopt) "$lode" umount "$m" || umount -l "$m" ;;
        *) umount "$m" || umount -l "$m" ;;
      esac
    fi
  done
  rm -rf "$work"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
readall() { find "$1" -type f -print0 | xargs -0 -r -n 256 -P 4 cat >/dev/null; }
# 20,000 4 KiB preads at random (seeded) block offsets of the files >= 1 MiB, 4 threads.
randread() { python3 -c '
import os, random, sys, threading
root, listing = sys.argv[1], sys.argv[2]
names = [l.rstrip("\n") for l in open(listing)]
fds = [(os.open(os.path.join(root, n), os.O_RDONLY), os.path.getsize(os.path.join(root, n))) for n in names]
def work(seed):
    r = random.Random(seed)
    for _ in range(5000):
        fd, size = fds[r.randrange(len(fds))]
        os.pread(fd, 4096, r.randrange(size // 4096) * 4096)
ts = [threading.Thread(target=work, args=(s,)) for s in range(4)]
for t in ts: t.start()
for t in ts: t.join()
' "$1" "$work/big.list"; }
timeit() { local t0 t1; t0=$(date +%s.%N); "$@"; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "copying $tree" >&2
cp -a "$tree" "$work/src"
files=$(find "$work/src" -type f | wc -l)
(cd "$work/src" && find . -type f -size +1M | sort) >"$work/big.list"
big_files=$(wc -l <"$work/big.list")
bytes=$(find "$work/src" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
echo "building the lode image" >&2
"$lode" build "$work/src" -o "$work/img" >/dev/null
echo "making the ext4 loop image and the squashfs image" >&2
size_mb=$(( bytes / 1000000 * 3 / 2 + 512 ))
truncate -s "${size_mb}M" "$work/ext4.img"
mkfs.ext4 -q -F "$work/ext4.img"
mkdir -p "$work/m-native" "$work/m-sq" "$work/m-pt" "$work/m-ptall" "$work/m-nopt"
mount -o loop "$work/ext4.img" "$work/m-native"
cp -a "$work/src/." "$work/m-native/"
mksquashfs "$work/src" "$work/sq.img" -noappend -noI -noD -noF -noX -quiet >/dev/null
squashfuse "$work/sq.img" "$work/m-sq"

echo "mounting with --mode fuse and warming the lode cache" >&2
"$lode" mount --mode fuse --cache-dir "$work/cache" "$work/img" "$work/m-pt" 2>/dev/null
# Pass 1 fetches every chunk (reads served by lode); in pass 2 opens find every file local
# and files >= 64 KiB get their backing files.
warm1=$(timeit readall "$work/m-pt")
warm2=$(timeit readall "$work/m-pt")
"$lode" mount --mode fuse --no-passthrough --cache-dir "$work/cache" "$work/img" "$work/m-nopt" 2>/dev/null
# For comparison: passthrough for every file (own cache, so its disk cost shows on its own).
"$lode" mount --mode fuse --passthrough-min-size 1 --cache-dir "$work/cache-all" "$work/img" "$work/m-ptall" 2>/dev/null
readall "$work/m-ptall"
readall "$work/m-ptall"
stats() { python3 - "$1" <<'EOF'
import json, socket, sys, glob, os
for p in glob.glob(os.environ["LODE_RUN_DIR"] + "/*.sock"):
    s = socket.socket(socket.AF_UNIX); s.connect(p); d = b""
    while True:
        b = s.recv(65536)
        if not b: break
        d += b
    v = json.loads(d)
    if v["mountpoint"] == os.path.realpath(sys.argv[1]):
        print(json.dumps(v))
EOF
}
pt0=$(stats "$work/m-pt")
reads0=$(echo "$pt0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"].get("read",0))')
served0=$(echo "$pt0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served"])')
mat_files=$(echo "$pt0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["materialized_files"])')
mat_disk=$(echo "$pt0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["materialized_disk_bytes"])')
reflinked=$(echo "$pt0" | python3 -c 'import json,sys; print(json.load(sys.stdin)["reflinked_files"])')
cache_blob_disk=$(du -sB1 "$work/cache/blobs" | cut -f1)
files_disk=$(du -sB1 "$work/cache/files" | cut -f1)
all_files=$(find "$work/cache-all/files" -type f | wc -l)
all_disk=$(du -sB1 "$work/cache-all/files" | cut -f1)

load0=$(cut -d' ' -f1-3 /proc/loadavg)
declare -A cold hot rand
names=(native pt ptall nopt sq)
for n in "${names[@]}"; do cold[$n]=""; hot[$n]=""; rand[$n]=""; done
dir_of() { case $1 in native) echo "$work/m-native" ;; pt) echo "$work/m-pt" ;; ptall) echo "$work/m-ptall" ;; nopt) echo "$work/m-nopt" ;; sq) echo "$work/m-sq" ;; esac; }
for r in $(seq 1 "$runs"); do
  for n in "${names[@]}"; do
    d=$(dir_of $n)
    drop
    cold[$n]+="$(timeit readall "$d") "
    hot[$n]+="$(timeit readall "$d") "
    drop
    rand[$n]+="$(timeit randread "$d") "
  done
  echo "run $r/$runs done" >&2
done
load1=$(cut -d' ' -f1-3 /proc/loadavg)
pt1=$(stats "$work/m-pt")
reads1=$(echo "$pt1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"].get("read",0))')
served1=$(echo "$pt1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_served"])')

med() { echo "$1" | tr ' ' '\n' | grep -v '^$' | median; }
ratio() { echo "scale=3; $1 / $2" | bc; }
verdict() { if [ "$(echo "$1 >= $2" | bc)" = 1 ]; then echo MET; else echo MISSED; fi; }
tn_c=$(med "${cold[native]}"); tn_h=$(med "${hot[native]}"); tn_r=$(med "${rand[native]}")
out=$(mktemp)
{
  echo "Tree: \`$tree\` copy, $files files ($big_files of at least 1 MiB), $(echo "scale=1; $bytes/1000000" | bc) MB; $runs runs, median; $(nproc) cores, kernel $(uname -r); load average $load0 before, $load1 after."
  echo
  echo "| | read all data, page cache dropped: s | ratio vs native | target | | read all data, page cache hot: s | ratio | 4 KiB random reads, page cache dropped: s | ratio |"
  echo "|---|---:|---:|---:|---|---:|---:|---:|---:|"
  for n in native pt ptall nopt sq; do
    c=$(med "${cold[$n]}"); h=$(med "${hot[$n]}"); x=$(med "${rand[$n]}")
    rc=$(ratio "$tn_c" "$c"); rh=$(ratio "$tn_h" "$h"); rx=$(ratio "$tn_r" "$x")
    case $n in
      native) label="native ext4 (loop image)"; tgt="—"; v="" ;;
      pt) label="lode FUSE, passthrough (files ≥ 64 KiB, the default)"; tgt="≥ 0.9"; v=$(verdict "$rc" 0.9) ;;
      ptall) label="lode FUSE, passthrough for every file (--passthrough-min-size 1)"; tgt="—"; v="" ;;
      nopt) label="lode FUSE, --no-passthrough"; tgt="≥ 0.6"; v=$(verdict "$rc" 0.6) ;;
      sq) label="squashfuse (uncompressed squashfs)"; tgt="—"; v="" ;;
    esac
    printf '| %s | %.2f | %.2f | %s | %s | %.2f | %.2f | %.2f | %.2f |\n' "$label" "$c" "$rc" "$tgt" "$v" "$h" "$rh" "$x" "$rx"
  done
  echo
  echo "Passthrough mount, $((runs * 2)) measured passes: $((reads1 - reads0)) FUSE READ requests, $(echo "scale=1; ($served1 - $served0)/1000000" | bc) MB served by lode out of $(echo "scale=1; $runs * 2 * $bytes/1000000" | bc) MB read (files under 64 KiB are read through lode; the rest through passthrough, unless already in the page cache)."
  printf 'Warming: first read of everything (lazy fetch from the image directory) %.1f s; second read, which made the backing files, %.1f s.\n' "$warm1" "$warm2"
  echo "Backing files: $mat_files files, $(echo "scale=1; $mat_disk/1000000" | bc) MB allocated ($reflinked reflinked);"
  echo "\`cache/files\` $(echo "scale=1; $files_disk/1000000" | bc) MB on disk next to \`cache/blobs\` $(echo "scale=1; $cache_blob_disk/1000000" | bc) MB (the cache filesystem, $(df --output=fstype "$work" | tail -1), does not reflink)."
  echo "With passthrough for every file: $all_files backing files, $(echo "scale=1; $all_disk/1000000" | bc) MB on disk."
} >"$out"
cat "$out"
if [ "$record" = 1 ]; then
  python3 - "$out" "$*" <<'EOF'
import sys, re
out, cmdargs = sys.argv[1], sys.argv[2]
body = open(out).read()
path = "docs/benchmarks.md"
try:
    doc = open(path).read()
except FileNotFoundError:
    doc = "# Benchmarks\n"
section = "## FUSE mode\n\nCommand: `bench/fuse.sh " + cmdargs + "` (as root, after `scripts/setup.sh`).\n\n" + body
if "## FUSE mode\n" in doc:
    start = doc.index("## FUSE mode\n")
    m = re.search(r"\n## ", doc[start + 1:])
    end = start + 1 + m.start() + 1 if m else len(doc)
    doc = doc[:start] + section + ("\n" if m else "") + doc[end:]
else:
    doc = doc.rstrip("\n") + "\n\n" + section
open(path, "w").write(doc)
print("recorded in docs/benchmarks.md", file=sys.stderr)
EOF
fi
