#!/usr/bin/env bash
# Runs inside the Linux 6.12 VM (started by tests/fscache_vm.rs): every check of
# `lode mount --mode fscache` in one boot. Prints one PASS/FAIL line per check and a summary;
# exits non-zero if any check failed.
#
#   fscache_vm.sh WORK LODE TESTBIN
#
# WORK (writable, shared with the host) holds the images A B C D, the expected listings
# {A,B}.list and C.sums, made on the host. LODE is the release binary; TESTBIN the test
# binary, which prints a tree listing when LODE_FSCACHE_LISTING=DIR:OUT is set.
set -u
W=$1 L=$2 T=$3
cd "$W"
PY=$(command -v /usr/bin/python3 || command -v python3)
pass=0 fail=0
ok() { echo "PASS $1${2:+ ($2)}"; pass=$((pass + 1)); }
bad() { echo "FAIL $1${2:+: $2}"; fail=$((fail + 1)); }
t0=$(date +%s.%N)
elapsed() { $PY -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}s')" "$1" "$(date +%s.%N)"; }
# jget EXPR: evaluates EXPR on the daemon's status (d) and prints it.
jget() { $L __fscache-daemon --status 2>/dev/null | $PY -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }
blob_hex() { $PY -c 'import json, sys; print(json.load(open(sys.argv[1]))["blobs"][int(sys.argv[2])]["digest"][7:])' "$1/image.json" "$2"; }
reads_of() { jget "d['keys'].get('$1', {}).get('reads', 0)"; }
opens_of() { jget "d['keys'].get('$1', {}).get('opens', 0)"; }
listing() { LODE_FSCACHE_LISTING="$1:$2" "$T" --exact fscache_vm -q >/dev/null 2>"$2.err"; }
daemon_gone() {
  for _ in $(seq 100); do
    [ -e /run/lode/fscache/supervisor.pid ] || { ! pgrep -f '__fscache-daemon' >/dev/null && return 0; }
    sleep 0.1
  done
  return 1
}
dump_log() { echo "---- daemon.log (tail)"; tail -n 40 /run/lode/fscache/daemon.log 2>/dev/null | cut -c1-300; echo "----"; }
on_fail() { [ "$fail" -eq 0 ] || dump_log; }

# cachefiles needs its cache on a disk filesystem: a loop-mounted ext4.
truncate -s 1G cache.img && mkfs.ext4 -q -F cache.img && mkdir -p cache && mount -o loop cache.img cache || {
  echo "FAIL setup: ext4 cache filesystem"; exit 1; }
C="$W/cache/lode"
mkdir -p mA mB mC mD mX
M() { "$L" mount "$1" "$2" --mode fscache --cache-dir "$C" "${@:3}"; }

# 1. Content and metadata of a mounted image, read through the daemon.
s=$(date +%s.%N)
if M A mA; then ok mount-a "$(elapsed "$s")"; else bad mount-a; dump_log; exit 1; fi
s=$(date +%s.%N)
listing mA A.got
if cmp -s A.list A.got; then ok content-a "$(wc -l <A.got) entries, $(elapsed "$s")"; else bad content-a "$(diff A.list A.got | head -5)"; fi
X=$(blob_hex A 0)
xa=$(reads_of "$X")
[ "$xa" -gt 0 ] && ok reads-a "$xa READs on blob ${X:0:12}" || bad reads-a "no READ on blob $X"

# The same image mounted twice at once: a second fsid (the first must be unique in the domain).
if M A mX && cmp -s mX/data/f1 TA/data/f1 && [ "$(jget "sum(i['fsid'].endswith('-2') for i in d['images'])")" = 1 ]; then
  ok same-image-twice
else
  bad same-image-twice
fi
"$L" umount mX || bad same-image-twice-umount

# 2. A second image sharing blob X, in the same domain: nothing is fetched for X again.
s=$(date +%s.%N)
if M B mB; then ok mount-b "$(elapsed "$s")"; else bad mount-b; fi
listing mB B.got
cmp -s B.list B.got && ok content-b "$(wc -l <B.got) entries" || bad content-b "$(diff B.list B.got | head -5)"
Y=$(blob_hex B 1)
[ "$(blob_hex B 0)" = "$X" ] || bad share-setup "B's first blob is not A's"
xb=$(reads_of "$X") ox=$(opens_of "$X") yb=$(reads_of "$Y")
if [ "$xb" = "$xa" ] && [ "$ox" = 1 ] && [ "$yb" -gt 0 ]; then
  ok shared-blob "blob X: $xa READs before B, $xb after, opened $ox time; B's own blob: $yb READs"
else
  bad shared-blob "X READs $xa -> $xb, X opens $ox, Y READs $yb"
fi

# 3. Unmounting the last image stops the daemon; the cache files stay.
"$L" umount mA && "$L" umount mB && daemon_gone && ok daemon-exits-after-last-umount || bad daemon-exits-after-last-umount
files=$(find cache/lode/fscache/cache -type f -name 'D*' | wc -l)
[ "$files" = 5 ] && ok cache-files "5 cache files: bootstraps of A, A's second mount and B; blobs X and Y" || bad cache-files "$files cache files"

# 4. A new daemon reuses the cache files: no READ at all for a fully read image.
M B mB || bad remount-b
listing mB B.got2
cmp -s B.list B.got2 && ok content-b-again || bad content-b-again
r=$(jget "d['reads']")
[ "$r" = 0 ] && ok reuse-after-restart "0 READs for a second full read by a new daemon" || bad reuse-after-restart "$r READs"

# 5. Failover: kill -9 of the worker twice during a read-heavy workload (image C served over
#    HTTP, each blob READ delayed 40 ms so reads are in flight): no reader sees an error.
busybox httpd -f -p 127.0.0.1:8771 -h "$W/www" &
httpd=$!
sleep 0.3
if LODE_TEST_FSCACHE_READ_DELAY_MS=40 M http://127.0.0.1:8771/C mC; then ok mount-c-http; else bad mount-c-http; fi
s=$(date +%s.%N)
(cd mC && split -n l/4 "$W/C.sums" "$W/C.part." && for p in "$W"/C.part.*; do
  (sha256sum --quiet -c "$p" >"$p.out" 2>&1; echo $? >"$p.rc") &
done; wait) &
readers=$!
kills=0
for k in 1 2; do
  for _ in $(seq 100); do [ "$(jget "d['reads_in_flight']" 2>/dev/null || echo 0)" -gt 0 ] && break; sleep 0.05; done
  old=$(cat /run/lode/fscache/worker.pid)
  inflight=$(jget "d['reads_in_flight']" 2>/dev/null || echo '?')
  kill -9 "$old" && kills=$((kills + 1))
  echo "killed worker $old with $inflight READs in flight"
  for _ in $(seq 200); do new=$(cat /run/lode/fscache/worker.pid 2>/dev/null); [ -n "$new" ] && [ "$new" != "$old" ] && break; sleep 0.05; done
  sleep 1
done
wait "$readers"
rcs=$(cat "$W"/C.part.*.rc | sort -u | tr '\n' ' ')
errs=$(cat "$W"/C.part.*.out | wc -l)
nfiles=$(wc -l <"$W/C.sums")
if [ "$kills" = 2 ] && [ "$rcs" = "0 " ] && [ "$errs" = 0 ]; then
  ok failover "$nfiles files, 2 worker kills, 0 errors, $(elapsed "$s")"
else
  bad failover "kills=$kills rc=$rcs errors: $(cat "$W"/C.part.*.out | head -5)"
fi
restores=$(grep -c 'restore sent' /run/lode/fscache/daemon.log)
[ "$restores" = 2 ] && [ "$(jget "d['restored']")" = True ] && ok failover-restore "2 restarts with restore, in-flight READs re-delivered" || bad failover-restore "$restores restores"

# 6. After the crashes, the filled cache files are reused: re-reading C fetches nothing.
sync; echo 3 >/proc/sys/vm/drop_caches
r0=$(jget "d['reads']")
(cd mC && sha256sum --quiet -c "$W/C.sums") >/dev/null 2>&1 && rc=0 || rc=1
r1=$(jget "d['reads']")
[ "$rc" = 0 ] && [ "$r0" = "$r1" ] && ok reuse-after-crash "re-read of C after drop_caches: $((r1 - r0)) READs" || bad reuse-after-crash "rc=$rc READs $r0 -> $r1"

# 7. A fetch failure (a corrupt chunk in D's blob) is EIO at once: never a hang, never zeros.
M D mD || bad mount-d
s=$(date +%s.%N)
out=$(timeout 60 cat mD/bad 2>&1 >/dev/null); rc=$?
if [ "$rc" = 1 ] && [[ "$out" == *"Input/output error"* ]]; then ok fetch-error-eio "$(elapsed "$s")"; else bad fetch-error-eio "rc=$rc $out"; fi
cmp -s mD/good D.good && ok fetch-error-other-file-fine || bad fetch-error-other-file-fine

# 8. Bad copen answers are refused by the kernel and the mount fails cleanly (no hang); an
#    unknown cookie gets an error copen.
for size in 12x -5000; do
  out=$(LODE_TEST_FSCACHE_COPEN_SIZE=$size timeout 120 "$L" mount A mX --mode fscache --cache-dir "$C" 2>&1); rc=$?
  if [ "$rc" != 0 ] && [ "$rc" != 124 ] && ! mountpoint -q mX; then
    ok "bad-copen-$size" "$(echo "$out" | tail -n1 | cut -c1-160)"
  else
    bad "bad-copen-$size" "rc=$rc $out"
  fi
done
grep -q 'the kernel refused `copen [0-9]*,12x`: Invalid argument' /run/lode/fscache/daemon.log &&
  ok bad-copen-kernel-einval || bad bad-copen-kernel-einval
out=$(timeout 120 mount -t erofs none -o fsid=nosuchimage,domain_id=lode mX 2>&1); rc=$?
[ "$rc" != 0 ] && [ "$rc" != 124 ] && ! mountpoint -q mX && ok unknown-fsid-refused "$out" || bad unknown-fsid-refused "rc=$rc $out"
n=$(jget "len(d['images'])")
[ "$n" = 3 ] && ok failed-mounts-forgotten || bad failed-mounts-forgotten "$n images registered"
# SIGTERM (what a generic stop does) while mounts remain: the daemon stays.
kill -TERM "$(cat /run/lode/fscache/supervisor.pid)"
sleep 2
[ "$(jget "len(d['images'])")" = 3 ] && ok sigterm-ignored-while-mounted || bad sigterm-ignored-while-mounted
sync; echo 3 >/proc/sys/vm/drop_caches
(cd mB && cmp -s tiny "$W/TB/tiny") && (cd mC && sha256sum --quiet -c "$W/C.sums" >/dev/null 2>&1) && ok still-serving || bad still-serving

# 9a. Auto mode on this kernel (no fanotify pre-content events): cachefiles is chosen, by
#     `lode mount` itself and by a `lode daemon` serving the request; status and ls see it.
out=$("$L" mount A mX --cache-dir "$C" 2>&1)
if [[ "$out" == *"--mode auto chose fscache"* ]] && cmp -s mX/data/f1 TA/data/f1; then
  ok auto-mode-fscache "$(echo "$out" | grep chose | cut -c1-120)"
else
  bad auto-mode-fscache "$out"
fi
st=$("$L" status mX --json 2>&1)
[[ "$st" == *'"mode": "fscache"'* && "$st" == *'"state": "serving"'* ]] && ok status-fscache || bad status-fscache "$(echo "$st" | head -c 600)"
"$L" umount mX || bad auto-umount
S=/run/lode/vm-test.sock
"$L" daemon --socket "$S" --cache-dir "$C" >daemon-api.log 2>&1 & dpid=$!
for _ in $(seq 100); do [ -S "$S" ] && break; sleep 0.1; done
out=$(LODE_SOCKET=$S "$L" mount A mX 2>&1)
ls_json=$(LODE_SOCKET=$S "$L" ls --json 2>&1)
if [[ "$out" == *"chose fscache"* && "$ls_json" == *'"mode": "fscache"'* ]] && cmp -s mX/data/f1 TA/data/f1; then
  ok daemon-auto-mode-fscache
else
  bad daemon-auto-mode-fscache "$out $(echo "$ls_json" | head -c 400) $(tail -5 daemon-api.log)"
fi
LODE_SOCKET=$S "$L" umount mX || bad daemon-umount
kill "$dpid"; wait "$dpid" 2>/dev/null

# 9. Everything unmounts; the daemon exits; the cache filesystem is not busy.
"$L" umount mB && "$L" umount mC && "$L" umount mD && ok umount-all || bad umount-all
daemon_gone && ok daemon-exits-final || bad daemon-exits-final
kill "$httpd" 2>/dev/null
umount cache && ok cache-fs-released || bad cache-fs-released
echo "fscache-vm: $pass passed, $fail failed, $(elapsed "$t0") in the guest"
on_fail
[ "$fail" = 0 ]
