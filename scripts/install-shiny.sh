#!/usr/bin/env bash
# Installs what the `shiny` purpose runs with the process provider: R and its shiny package,
# from Debian (r-base-core and r-cran-shiny). Does nothing when both are there already.
set -euo pipefail

# Both R and the package: R alone (say from another source) may lack shiny.
if command -v R >/dev/null 2>&1 \
  && R --no-save --quiet --slave -e 'if (!requireNamespace("shiny", quietly = TRUE)) quit(status = 1)' >/dev/null 2>&1; then
  exit 0
fi

echo "setup: installing R and shiny (r-base-core, r-cran-shiny) with apt-get" >&2
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
# Recommends would add compilers, LaTeX fonts and R's docs; shiny runs without them.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  r-base-core r-cran-shiny >/dev/null
