#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build rstudio-pool; sourced by run.sh and
# test.sh, harmless to run again. Pingora 0.9 builds zlib-ng (through flate2) with cmake.
set -euo pipefail

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v cc >/dev/null 2>&1 || need_apt+=(gcc)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]} with apt-get" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# One build cache outside the clone, so that CI and every checkout share compiled
# dependencies (aws-sdk-ec2 and pingora take many minutes from scratch on 2 cores).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rstudio-pool-target}"
