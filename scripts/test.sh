#!/usr/bin/env bash
# Runs every check and test of rstudio-pool on a fresh machine: installs what is missing,
# then formatting, lints, unit, property and integration tests (real server, real workspace
# processes, real HTTP and WebSocket clients).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

# The EC2 provider is tested against moto, a local EC2 API, and the jupyter purpose against
# a real JupyterLab; both live in a virtualenv outside the clone.
VENV="${RSTUDIO_POOL_VENV:-$HOME/.cache/rstudio-pool-venv}"
if [ ! -x "$VENV/bin/moto_server" ] || [ ! -x "$VENV/bin/jupyter-lab" ]; then
  echo "setup: installing moto and JupyterLab into $VENV" >&2
  python3 -m venv "$VENV" 2>/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  }
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q 'moto[server,ec2]>=5,<6' 'jupyterlab>=4,<5' 'cfn-lint==1.58.0'
fi
# The AWS deployment is linted with cfn-lint (pinned: new rules must not turn CI red), created in moto's CloudFormation, and torn
# down with the AWS CLI (both into the same virtualenv, also when it predates them).
if [ ! -x "$VENV/bin/cfn-lint" ] || [ ! -x "$VENV/bin/aws" ]; then
  echo "setup: installing cfn-lint and the AWS CLI into $VENV" >&2
  "$VENV/bin/pip" install -q 'cfn-lint==1.58.0' 'awscli>=1.40,<2'
fi
export MOTO_SERVER="$VENV/bin/moto_server"

# The EC2 user data is checked with shellcheck.
if ! command -v shellcheck >/dev/null 2>&1; then
  echo "setup: installing shellcheck with apt-get" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq shellcheck >/dev/null
fi

# The browser tests drive a headless chromium through its chromedriver (tests/common/browser.rs).
if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing chromium and chromium-driver with apt-get" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
# The shiny and code-server purposes are tested with the real programs: R with shiny from
# Debian, code-server from the npm registry into a cache folder outside the clone.
scripts/install-shiny.sh
scripts/install-code-server.sh
export RSTUDIO_POOL_VENV="$VENV"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo build (benchmarks and load programs too)"
cargo build --all-targets
echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --lib --bins --tests 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
