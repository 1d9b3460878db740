#!/usr/bin/env bash
# Runs rstudio-pool on the embedded default (process provider, demo workspaces, everything on
# loopback), installing build tools first if the machine lacks them. Arguments go to
# rstudio-pool, e.g. `scripts/run.sh -c conf/local.yaml`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec cargo run --release -- "$@"
