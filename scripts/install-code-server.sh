#!/usr/bin/env bash
# Installs code-server (the `code-server` purpose's workspace) into a cache folder outside the
# clone, for the tests and for a laptop: ${RSTUDIO_POOL_CODE_SERVER:-~/.cache/rstudio-pool-code-server},
# with its executable at $DIR/bin/code-server. Harmless to run again: when that version is
# there it checks and exits.
#
# Why not `npm install -g code-server`: its postinstall runs a nested `npm install` of VS Code,
# and install scripts of both download prebuilt binaries from outside the npm registry
# (@vscode/ripgrep's rg, argon2, kerberos), which fails where only the package registries are
# reachable. So: every package is installed with --ignore-scripts, rg comes from Debian's
# ripgrep, and the native modules are built here from source against the machine's Node.js
# headers. code-server 4.100.x is the last release for Node.js 20 (4.103 and later need 22).
set -euo pipefail

VERSION="${CODE_SERVER_VERSION:-4.100.3}"
NODE_MAJOR=20
DIR="${RSTUDIO_POOL_CODE_SERVER:-$HOME/.cache/rstudio-pool-code-server}"

say() { echo "install-code-server: $*" >&2; }

if [ -x "$DIR/bin/code-server" ] && [ "$(cat "$DIR/version" 2>/dev/null)" = "$VERSION" ] \
  && command -v rg >/dev/null 2>&1; then
  say "code-server $VERSION is installed in $DIR"
  exit 0
fi

started=$(date +%s)

# Node.js: the machine's own (the native modules are built for it and bin/code-server runs it).
NODE="$(command -v node || true)"
if [ -z "$NODE" ] || [ "$("$NODE" -p 'process.versions.node.split(".")[0]')" != "$NODE_MAJOR" ]; then
  say "code-server $VERSION needs Node.js $NODE_MAJOR; found: ${NODE:-none} $(${NODE:-false} --version 2>/dev/null || true)"
  exit 1
fi
NODEDIR="$(cd "$(dirname "$(readlink -f "$NODE")")/.." && pwd)"
if [ ! -f "$NODEDIR/include/node/common.gypi" ]; then
  say "no Node.js headers in $NODEDIR/include/node: the native modules cannot be built"
  exit 1
fi

# Debian packages: ripgrep (VS Code's search), a compiler, make and python3 (node-gyp) and
# libkrb5-dev (the kerberos module).
need_apt=()
command -v rg >/dev/null 2>&1 || need_apt+=(ripgrep)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
command -v krb5-config >/dev/null 2>&1 || need_apt+=(libkrb5-dev)
if [ "${#need_apt[@]}" -gt 0 ]; then
  say "installing ${need_apt[*]} with apt-get"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Another apt-get (a parallel setup) may hold dpkg's lock: wait for it rather than fail.
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    "${need_apt[@]}" >/dev/null
fi

# Everything is built in a folder of this run beside the cache and moved into place at the
# end, so an interrupted install leaves no half of one behind, and two at once do not mix.
mkdir -p "$(dirname "$DIR")"
STAGING="$DIR.partial.$$"
trap 'rm -rf "$STAGING"' EXIT
rm -rf "$STAGING"
mkdir -p "$STAGING/bin"
npm_quiet=(--ignore-scripts --omit=dev --no-audit --no-fund --loglevel=error)

say "npm install code-server@$VERSION (no install scripts) into $STAGING"
npm install --prefix "$STAGING" "${npm_quiet[@]}" "code-server@$VERSION" >&2
CS="$STAGING/node_modules/code-server"
VSCODE="$CS/lib/vscode"

say "npm install of VS Code's own packages (lib/vscode, no install scripts)"
(cd "$VSCODE" && npm install "${npm_quiet[@]}" >&2)
say "npm install of the built-in extensions' shared packages (lib/vscode/extensions)"
(cd "$VSCODE/extensions" && npm install "${npm_quiet[@]}" >&2 && node postinstall.mjs >/dev/null)

# What code-server's postinstall.sh does besides installing: VS Code looks for its packages
# in node_modules.asar, and its terminal's `code` command is a script in bin/.
say "linking node_modules.asar and the remote-cli script, as code-server's postinstall does"
ln -sfn node_modules "$VSCODE/node_modules.asar"
ln -sfn code-linux.sh "$VSCODE/bin/remote-cli/code-server"
ln -sfn browser-linux.sh "$VSCODE/bin/helpers/browser.sh"

say "using Debian's ripgrep ($(command -v rg)) for @vscode/ripgrep"
mkdir -p "$VSCODE/node_modules/@vscode/ripgrep/bin"
ln -sfn "$(command -v rg)" "$VSCODE/node_modules/@vscode/ripgrep/bin/rg"

# Native modules, from source: node-pre-gyp and prebuild-install would try a download first
# and fall back to node-gyp; node-gyp takes the headers from $NODEDIR instead of a download.
# node-pty's postinstall runs `npx node-gyp configure`, which would stop to ask before it
# fetches node-gyp from the npm registry: npm_config_yes answers.
export npm_config_nodedir="$NODEDIR" npm_config_build_from_source=true npm_config_yes=true
say "building argon2 from source (headers from $NODEDIR/include/node)"
(cd "$STAGING" && npm rebuild --loglevel=error argon2 >&2)
native=(node-pty @vscode/spdlog native-watchdog kerberos @parcel/watcher @vscode/deviceid)
say "building ${native[*]} from source"
(cd "$VSCODE" && npm rebuild --loglevel=error "${native[@]}" >&2)
(cd "$VSCODE" && "$NODE" -e '
  for (const m of process.argv.slice(1)) require(m);
' "${native[@]}") || {
  say "a native module does not load after the build"
  exit 1
}

cat >"$STAGING/bin/code-server" <<EOF
#!/bin/sh
# code-server $VERSION, installed by rstudio-pool's scripts/install-code-server.sh.
here="\$(dirname "\$(readlink -f "\$0")")"
exec "$NODE" "\$here/../node_modules/code-server/out/node/entry.js" "\$@"
EOF
chmod +x "$STAGING/bin/code-server"
# Even --version writes a config file and a log folder under HOME: give it one of its own.
check_home="$STAGING/version-check"
mkdir -p "$check_home"
got="$(HOME="$check_home" XDG_CONFIG_HOME="$check_home" XDG_DATA_HOME="$check_home" \
  "$STAGING/bin/code-server" --config /dev/null --version | tail -1)"
rm -rf "$check_home"
case "$got" in
  "$VERSION"*) ;;
  *)
    say "bin/code-server --version says: $got"
    exit 1
    ;;
esac
echo "$VERSION" >"$STAGING/version"

if [ -x "$DIR/bin/code-server" ] && [ "$(cat "$DIR/version" 2>/dev/null)" = "$VERSION" ]; then
  say "another run installed code-server $VERSION in $DIR meanwhile; keeping that one"
  exit 0
fi
rm -rf "$DIR"
mv -T "$STAGING" "$DIR"
say "code-server $got installed in $DIR in $(($(date +%s) - started)) s; run $DIR/bin/code-server"
