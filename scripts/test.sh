#!/usr/bin/env bash
# Runs every check and test of rstudio-pool on a fresh machine: installs what is missing,
# then formatting, lints, unit, property and integration tests (real server, real workspace
# processes, real HTTP and WebSocket clients).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --all-targets
