#!/usr/bin/env bash
# Memory footprint of the node service: `lode daemon` idle, then with N images mounted
# through it in fanotify and in FUSE mode (needs root).
#
#   bench/footprint.sh [N] [--record]        (default N = 8)
#
# Every image is a different build (its own bootstrap and blob) of a small tree, mounted
# lazily and read once (`find` + `cat` of every file), so each mount has worker state.
# Memory is counted over every lode process (the daemon and each mount's supervisor and
# worker): RSS summed (counts the shared binary once per process, the pessimistic number)
# and PSS summed (shared pages split between the processes, what the node really pays).
# Targets (issue 9): daemon RSS <= 32 MiB idle, <= 1 MiB more per mounted image.
# With --record, the results replace the "Footprint" section of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
record=0
n=8
for a in "$@"; do
  case $a in
    --record) record=1 ;;
    *) n=$a ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "bench/footprint.sh needs root (mounts)" >&2; exit 1; }
cargo build --release -q -p lode-cli
lode=$PWD/target/release/lode
work=$(mktemp -d /var/tmp/lode-bench-fp.XXXXXX)
export LODE_RUN_DIR=$work/run LODE_SOCKET=$work/lode.sock
daemon_pid=
cleanup() {
  for m in "$work"/mnt-*; do
    [ -d "$m" ] || continue
    if mountpoint -q "$m"; then "$lode" umount "$m" 2>/dev/null || umount -l "$m"; fi
  done
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# kB of RSS and PSS summed over the daemon and every process serving a mount.
measure() {
  local pids="$daemon_pid" rss=0 pss=0 p
  for p in $(python3 - <<'PY'
import json, glob, os
pids = set()
for f in glob.glob(os.environ["LODE_RUN_DIR"] + "/*.json"):
    try:
        pids.add(json.load(open(f))["pid"])
    except Exception:
        pass
for f in glob.glob(os.environ["LODE_RUN_DIR"] + "/*.stats"):
    try:
        pids.add(json.load(open(f))["worker_pid"])
    except Exception:
        pass
print(" ".join(str(p) for p in pids if p))
PY
  ); do pids="$pids $p"; done
  # FUSE workers are the supervisors' children.
  for p in $pids; do
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do pids="$pids $c"; done
  done
  for p in $(echo "$pids" | tr ' ' '\n' | sort -un); do
    [ -r /proc/"$p"/smaps_rollup ] || continue
    rss=$((rss + $(awk '/^Rss:/ {print $2}' /proc/"$p"/smaps_rollup)))
    pss=$((pss + $(awk '/^Pss:/ {print $2}' /proc/"$p"/smaps_rollup)))
  done
  echo "$rss $pss $(echo "$pids" | tr ' ' '\n' | sort -un | grep -c .)"
}

mkdir -p "$work/src"
cp -a /usr/share/doc/bash /usr/share/doc/coreutils "$work/src/" 2>/dev/null || cp -a /usr/share/doc/bash "$work/src/"
for i in $(seq 1 "$n"); do
  echo "image $i" > "$work/src/which"
  "$lode" build "$work/src" -o "$work/img-$i" >/dev/null 2>&1
done

"$lode" daemon --socket "$LODE_SOCKET" --cache-dir "$work/cache" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$LODE_SOCKET" ] && break; sleep 0.1; done
sleep 1
read -r idle_rss idle_pss _ < <(measure)
daemon_rss=$(awk '/^VmRSS:/ {print $2}' /proc/$daemon_pid/status)

declare -A total_rss total_pss procs daemon_after
for mode in fanotify fuse; do
  for i in $(seq 1 "$n"); do
    mkdir -p "$work/mnt-$mode-$i"
    "$lode" mount "$work/img-$i" "$work/mnt-$mode-$i" --mode "$mode" --cache-dir "$work/cache" >/dev/null
    find "$work/mnt-$mode-$i" -type f -exec cat {} + >/dev/null
  done
  sleep 1
  read -r r p c < <(measure)
  total_rss[$mode]=$r total_pss[$mode]=$p procs[$mode]=$c
  daemon_after[$mode]=$(awk '/^VmRSS:/ {print $2}' /proc/$daemon_pid/status)
  for i in $(seq 1 "$n"); do "$lode" umount "$work/mnt-$mode-$i"; done
done

mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k/1024}'; }
per() { awk -v t="$1" -v i="$2" -v n="$n" 'BEGIN {printf "%.2f", (t-i)/1024/n}'; }
verdict() { awk -v v="$1" -v t="$2" 'BEGIN {print (v <= t) ? "MET" : "MISSED"}'; }
out=$(
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r); $n images per mode"
  echo
  echo "| state | lode processes | RSS sum MiB | PSS sum MiB | per image, PSS MiB | per image, RSS MiB | daemon RSS MiB |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  echo "| daemon idle | 1 | $(mib "$idle_rss") | $(mib "$idle_pss") | | | $(mib "$daemon_rss") |"
  for mode in fanotify fuse; do
    echo "| $n × $mode | ${procs[$mode]} | $(mib "${total_rss[$mode]}") | $(mib "${total_pss[$mode]}") | $(per "${total_pss[$mode]}" "$idle_pss") | $(per "${total_rss[$mode]}" "$idle_rss") | $(mib "${daemon_after[$mode]}") |"
  done
  echo
  echo "daemon RSS idle $(mib "$daemon_rss") MiB vs target <= 32 MiB: $(verdict "$(mib "$daemon_rss")" 32)"
  for mode in fanotify fuse; do
    echo "$mode: $(per "${total_pss[$mode]}" "$idle_pss") MiB PSS more per mounted image vs target <= 1 MiB: $(verdict "$(per "${total_pss[$mode]}" "$idle_pss")" 1)"
  done
)
echo "$out"
if [ "$record" = 1 ]; then
  python3 - "$out" <<'PY'
import re, sys
doc = "docs/benchmarks.md"
text = open(doc).read()
section = ("## Footprint: daemon and mounts (issue 9)\n\n    bench/footprint.sh 8 --record\n\n"
           "Every lode process counted: the daemon, and each mount's supervisor and worker "
           "(fanotify, FUSE: a pair per mount). RSS counts the shared binary in every process; "
           "PSS splits shared pages.\n\n" + sys.argv[1] + "\n")
pat = re.compile(r"## Footprint: daemon and mounts \(issue 9\)\n.*?(?=\n## |\Z)", re.S)
text = pat.sub(lambda m: section.rstrip("\n"), text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
open(doc, "w").write(text)
PY
  echo "recorded in docs/benchmarks.md"
fi
