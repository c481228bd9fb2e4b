#!/usr/bin/env bash
# Set up the machine, build everything, and run the whole test suite (needs root: mounts,
# mknod, chown). Exits non-zero on any failure; the last line is a pass/fail count.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "test.sh: the tests need root and sudo is missing" >&2; exit 1; }
  echo "test.sh: re-running as root via sudo"
  exec sudo --preserve-env=PATH,HOME,CARGO_HOME,RUSTUP_HOME,CI,RUST_BACKTRACE "$0" "$@"
fi
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

start=$(date +%s)
scripts/setup.sh --vm

echo "test.sh: cargo build --release --workspace"
cargo build --release --workspace --quiet

log=$(mktemp /tmp/lode-test.XXXXXX)
trap 'rm -f "$log"' EXIT
echo "test.sh: cargo test --workspace --release --no-fail-fast"
set +e
cargo test --workspace --release --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

# Sum every "test result: ok. N passed; M failed; K ignored; ..." line.
read -r passed failed ignored < <(awk '
  /^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) p += $(i-1)
      if ($(i) ~ /^failed;?$/) f += $(i-1)
      if ($(i) ~ /^ignored;?$/) g += $(i-1)
    }
  }
  END { printf "%d %d %d\n", p, f, g }' "$log")
elapsed=$(( $(date +%s) - start ))
if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
  failed=1  # cargo failed without a failing test (e.g. a test binary did not build)
fi
if [ "$rc" -eq 0 ]; then
  echo "test.sh: OK in ${elapsed}s"
else
  echo "test.sh: FAILED (cargo test exit $rc) in ${elapsed}s"
fi
echo "summary: $passed passed, $failed failed, $ignored skipped"
exit "$rc"
