#!/usr/bin/env bash
# Demo (placeholder, to be filled in): build a lode image from a local tree and inspect it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ -d "$HOME/.cargo/bin" ] && export PATH="$HOME/.cargo/bin:$PATH"

scripts/setup.sh
cargo build --release --quiet

tmp=$(mktemp -d /tmp/lode-demo.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

target/release/lode build /usr/share/doc -o "$tmp/img"
target/release/lode inspect "$tmp/img"
