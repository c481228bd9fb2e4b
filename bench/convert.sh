#!/usr/bin/env bash
# Layer import throughput: `lode build LAYER...` on a real multi-layer set made on this machine.
#
#   bench/convert.sh [RUNS]        (default 3 runs; the median is reported)
#
# Layers (pax tarballs of real trees, gzip -6 like `docker push`; also a zstd copy):
#   1. usr/lib/x86_64-linux-gnu
#   2. usr/share
#   3. usr/lib/python3*, a renamed copy of libLLVM-15 (deduplicated against layer 1), a
#      whiteout of usr/share/man and an opaque usr/share/doc with one new file.
# The layer set is kept in $LODE_BENCH_LAYERS (default /var/tmp/lode-convert-layers) and reused
# while the source trees are unchanged. Prints MB/s of uncompressed layer data (tar bytes),
# the dedup ratio, output size and peak RSS, and MET/MISSED against the 170 MB/s target
# (gzip layers, zstd blobs, default threads). With APPEND=1 the results and the command line
# are appended to docs/benchmarks.md under "Convert (layer import)".
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
target_mbs=170
lode=target/release/lode
cargo build --release -q -p lode-cli
for tool in tar gzip zstd python3; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run scripts/setup.sh" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "/usr/bin/time missing: run scripts/setup.sh" >&2; exit 1; }
layers_dir=${LODE_BENCH_LAYERS:-/var/tmp/lode-convert-layers}
mkdir -p "$layers_dir"
work=$(mktemp -d /var/tmp/lode-convert-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT

python_dirs=$(cd / && ls -d usr/lib/python3* | tr '\n' ' ')
llvm=usr/lib/x86_64-linux-gnu/libLLVM-15.so.1
[ -f "/$llvm" ] || llvm=$(cd / && find usr/lib/x86_64-linux-gnu -maxdepth 1 -type f -size +20M | sort | head -1)
# Reuse the layers when the trees are unchanged (a cheap fingerprint: names, sizes, mtimes).
fingerprint=$( (cd / && find usr/lib/x86_64-linux-gnu usr/share $python_dirs -printf '%p %s %T@\n' 2>/dev/null) | sha256sum | cut -c1-16)
if [ "$(cat "$layers_dir/fingerprint" 2>/dev/null)" != "$fingerprint" ]; then
  echo "convert: making the layer set in $layers_dir (once; gzip -6 takes a while)" >&2
  rm -f "$layers_dir"/*
  tar --format=pax -C / -cf "$layers_dir/l1.tar" usr/lib/x86_64-linux-gnu
  tar --format=pax -C / -cf "$layers_dir/l2.tar" usr/share
  stage=$work/stage
  mkdir -p "$stage/usr/share/doc"
  : >"$stage/usr/share/.wh.man"
  : >"$stage/usr/share/doc/.wh..wh..opq"
  echo "documentation moved" >"$stage/usr/share/doc/README"
  # shellcheck disable=SC2086
  tar --format=pax --transform="s,^$llvm\$,opt/llvm/$(basename "$llvm")," \
    -cf "$layers_dir/l3.tar" -C "$stage" . -C / $python_dirs "$llvm"
  for l in l1 l2 l3; do
    gzip -6 -c "$layers_dir/$l.tar" >"$layers_dir/$l.tar.gz"
    zstd -q -3 -c "$layers_dir/$l.tar" >"$layers_dir/$l.tar.zst"
    rm "$layers_dir/$l.tar"
  done
  echo "$fingerprint" >"$layers_dir/fingerprint"
fi

# measure EXT -> "median_seconds peak_rss_kib cpu_percent cpu_seconds" (cpu of the median run)
# and the last run's JSON report in $work/report.json
measure() {
  local ext=$1 samples=() rss=0
  cat "$layers_dir"/*."$ext" >/dev/null
  for _ in $(seq "$runs"); do
    rm -rf "$work/img"
    sync
    /usr/bin/time -f '%e %M %P %U %S' -o "$work/time" "$lode" build --json -o "$work/img" \
      "$layers_dir/l1.$ext" "$layers_dir/l2.$ext" "$layers_dir/l3.$ext" >"$work/report.json" 2>"$work/err" \
      || { cat "$work/err" >&2; exit 1; }
    read -r t m p u sy <"$work/time"
    samples+=("$t ${p%\%} $(awk "BEGIN {print $u + $sy}")")
    [ "$m" -gt "$rss" ] && rss=$m
  done
  local median
  median=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{a[NR]=$0} END {print a[int((NR+1)/2)]}')
  read -r mt mp mc <<<"$median"
  echo "$mt $rss $mp $mc"
}

load_before=$(cut -d' ' -f1 /proc/loadavg)
read -r gz_t gz_rss gz_cpu gz_cpus < <(measure tar.gz)
cp "$work/report.json" "$work/gz.json"
gz_out=$(du -sb --apparent-size "$work/img" | cut -f1)
read -r zst_t zst_rss zst_cpu zst_cpus < <(measure tar.zst)
cp "$work/report.json" "$work/zst.json"

python3 - "$work/gz.json" "$work/zst.json" "$gz_t" "$gz_rss" "$gz_cpu" "$gz_cpus" "$zst_t" "$zst_rss" "$zst_cpu" "$zst_cpus" \
  "$runs" "$(nproc)" "$target_mbs" "${APPEND:-0}" "$0 $*" "$load_before" <<'PY'
import json, sys, datetime
(gzj, zsj, gz_t, gz_rss, gz_cpu, gz_cpus, zs_t, zs_rss, zs_cpu, zs_cpus, runs, cores, target, append, cmdline, load) = sys.argv[1:]
gz, zs = json.load(open(gzj)), json.load(open(zsj))
target = float(target)
def line(name, r, t, rss, cpu, cpus):
    tar = sum(l["tar_bytes"] for l in r["layers"])
    comp = sum(l["input_bytes"] for l in r["layers"])
    mbs = tar / 1e6 / float(t)
    # What the CPU time allows with every core to ourselves (the machine may be shared).
    per_cpu = tar / 1e6 / float(cpus) * int(cores)
    dedup = r["deduplicated_bytes"] / max(1, r["deduplicated_bytes"] + r["stored_bytes"])
    out = r["bootstrap_bytes"] + r["blob_bytes"]
    return mbs, (f"| {name} | {comp/1e6:,.0f} MB | {tar/1e6:,.0f} MB | {float(t):.2f} s | "
                 f"**{mbs:.0f} MB/s** | {cpu}% | {per_cpu:.0f} MB/s | {100*dedup:.1f}% | {out/1e6:,.0f} MB | {int(rss)/1024:.0f} MiB |")
gz_mbs, gz_line = line("gzip layers → zstd blobs", gz, gz_t, gz_rss, gz_cpu, gz_cpus)
zs_mbs, zs_line = line("zstd layers → zstd blobs", zs, zs_t, zs_rss, zs_cpu, zs_cpus)
verdict = "MET" if gz_mbs >= target else "MISSED"
per_layer = "\n".join(
    f"| {i+1} | {l['name'].rsplit('/',1)[-1]} | {l['input_bytes']/1e6:,.0f} MB | {l['tar_bytes']/1e6:,.0f} MB | "
    f"{l['entries']:,} | {l['whiteouts']} | {l['stored_bytes']/1e6:,.0f} MB | {l['deduplicated_bytes']/1e6:,.0f} MB |"
    for i, l in enumerate(gz["layers"]))
text = f"""
### {datetime.date.today()}: {cores} cores, median of {runs} runs (load average {load} before)

`{cmdline.strip()}`

| input | read | tar (uncompressed) | time | throughput | CPU | CPU-time bound ({cores} cores) | dedup | output | peak RSS |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{gz_line}
{zs_line}

Target ≥ {target:.0f} MB/s of uncompressed layer data (gzip layers): **{verdict}** ({gz_mbs:.0f} MB/s).

| layer | file | read | tar | entries | whiteouts | new in its blob | deduplicated |
|---|---|---:|---:|---:|---:|---:|---:|
{per_layer}
"""
print(text)
print(f"convert: {gz_mbs:.0f} MB/s (gzip layers), {zs_mbs:.0f} MB/s (zstd layers): {verdict} (target {target:.0f} MB/s)")
if append == "1":
    path = "docs/benchmarks.md"
    try:
        doc = open(path).read()
    except FileNotFoundError:
        doc = "# Benchmarks\n"
    head = "## Convert (layer import)"
    if head not in doc:
        doc = doc.rstrip("\n") + f"\n\n{head}\n\n`bench/convert.sh`: `lode build` on three real layers made on the benchmark machine (see the script).\n"
    # Insert at the end of the section (before the next "## " heading, if any).
    start = doc.index(head) + len(head)
    nxt = doc.find("\n## ", start)
    end = len(doc) if nxt < 0 else nxt
    doc = doc[:end].rstrip("\n") + "\n" + text + ("\n" + doc[end:].lstrip("\n") if nxt >= 0 else "")
    open(path, "w").write(doc)
    print(f"appended to {path}")
PY
