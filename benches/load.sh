#!/usr/bin/env bash
# The load benchmark of the edge proxy, in one run on one machine:
#   1. HTTP: one upstream (nginx serving a small fixed answer, started by rstudio-pool's process
#      provider as a workspace and registered through the command API), and in front of it, one
#      at a time: rstudio-pool (routing, rewriting, token access check and activity tracking
#      all on), nginx with an equivalent prefix-stripping config, configurable-http-proxy, and
#      the bare Pingora proxy of benches/bare_proxy.rs. wrk drives each: keep-alive, 1 thread,
#      $CONNS connections, $DURATION s, $ROUNDS rounds in alternating order. One worker each.
#   1b. Instructions per request: rstudio-pool and the bare Pingora proxy again, each under
#      callgrind, so that the cost of our features is a count that machine noise does not move.
#   1c. TLS: rstudio-pool with proxy.tls against nginx with ssl, the same certificate (ECDSA
#      P-256, made here) and cipher suite ($TLS_SUITE, TLS 1.3), one worker each, the same
#      upstream: wrk keep-alive, then a new connection per request with a full handshake, then
#      with a resumed session (req/s there = handshakes/s); server CPU per request for both.
#   2. WebSockets: $WS_SOCKETS sockets through rstudio-pool, nginx and configurable-http-proxy
#      to the demo workspace's echo, each sending one small message a second for $WS_SECONDS s.
#   3. Assignment: $API_CALLERS concurrent REQUEST_RSTUDIO for new users with that many free
#      ready instances warm, $API_ROUNDS times after $API_WARMUP warm-up burst not counted (the pool
#      refills in between), each after the same burst against GET /healthz: the floor of HTTP on these cores.
#      The server runs on one core and the callers on the other (API_PIN=0: both anywhere).
#   4. Slow clients: $SLOW_CLIENTS connections to rstudio-pool, then to nginx, each sending a
#      request head one byte a second and never finishing it (reopened when the proxy closes
#      it), for $SLOW_SECONDS s, while a normal user asks for the page $SLOW_RATE times a second
#      (benches/slow_clients.rs); each proxy first with no slow clients, the baseline.
# Prints one table per part; figures are ratios to nginx measured in the same run.
#
#   benches/load.sh                          # everything, about 6 minutes
#   PARTS=http DURATION=5 benches/load.sh    # just the HTTP table, quickly
#   PARTS="http tls" benches/load.sh         # plain HTTP and TLS, about 3.5 minutes
#   PROFILE=/tmp/p.txt PARTS=tls benches/load.sh   # plus perf profiles: /tmp/p.txt.tls-<run>
#   TLS_SUITE=TLS_AES_256_GCM_SHA384 PARTS=tls benches/load.sh   # another TLS 1.3 suite
#   PARTS=instr INSTR_REPORT=/tmp/instr.txt benches/load.sh   # instructions per request, by function
#   POOL_BIN=/tmp/rstudio-pool-before PARTS=instr benches/load.sh   # the same for another build
#   BENCH_AUTH=none PARTS=http benches/load.sh   # what the access check costs
#   BENCH_PINGORA="work_stealing: false" benches/load.sh   # Pingora server keys for rstudio-pool
#   PARTS=ws WS_SOCKETS=10000 WS_SECONDS=600 WS_PROXIES=rstudio-pool benches/load.sh   # the soak
#   PARTS=slow benches/load.sh               # slow clients against the normal user, about 3.5 minutes
#   PARTS=slow SLOW_CLIENTS=10000 SLOW_SECONDS=90 SLOW_PROXIES=rstudio-pool benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

DURATION="${DURATION:-10}"
CONNS="${CONNS:-50}"
ROUNDS="${ROUNDS:-2}"
WS_SOCKETS="${WS_SOCKETS:-1000 10000}"
WS_SECONDS="${WS_SECONDS:-30}"
API_CALLERS="${API_CALLERS:-200}"
API_ROUNDS="${API_ROUNDS:-5}"
API_WARMUP="${API_WARMUP:-1}"
# The assignment part pins the server to one core and the callers to the other, as callers on
# other machines would be; API_PIN=0 lets the scheduler place both.
API_PIN="${API_PIN:-1}"
SLOW_CLIENTS="${SLOW_CLIENTS:-5000}"
# Longer than rstudio-pool's proxy.request_head_timeout_ms (15 s), so that the deadline is met.
SLOW_SECONDS="${SLOW_SECONDS:-40}"
SLOW_RATE="${SLOW_RATE:-20}"
PARTS="${PARTS:-http tls instr ws api}"
# The one TLS 1.3 cipher suite both servers negotiate in the TLS part.
TLS_SUITE="${TLS_SUITE:-TLS_AES_128_GCM_SHA256}"
INSTR_SECONDS="${INSTR_SECONDS:-10}"

need_apt=()
command -v nginx >/dev/null 2>&1 || need_apt+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
if [[ " $PARTS " == *" instr "* ]]; then command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind); fi
if [[ " $PARTS " == *" tls "* ]]; then
  command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
  [ -x /usr/bin/time ] || need_apt+=(time)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "load: installing ${need_apt[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
NODE_DIR="${RSTUDIO_POOL_BENCH_NODE:-$HOME/.cache/rstudio-pool-bench}"
CHP="$NODE_DIR/node_modules/.bin/configurable-http-proxy"
if [ ! -x "$CHP" ]; then
  echo "load: installing configurable-http-proxy into $NODE_DIR" >&2
  mkdir -p "$NODE_DIR" && (cd "$NODE_DIR" && npm install --silent configurable-http-proxy >/dev/null)
fi

cargo build --release --bin rstudio-pool --example bare_proxy --example ws_load --example api_load --example slow_clients 2>&1 | tail -1 >&2
BIN="$CARGO_TARGET_DIR/release"
# POOL_BIN measures another build of rstudio-pool (an earlier commit, for a before/after).
POOL="${POOL_BIN:-$BIN/rstudio-pool}"
NGINX="$(command -v nginx)"

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
WORK="$(mktemp -d /tmp/rstudio-pool-load.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  # The servers first, so that none launches a workspace after the sweep below (one that did
  # outlived a run of this script).
  wait 2>/dev/null || true
  # Workspaces started by the process provider run in their own process groups, in folders
  # under $WORK.
  for p in /proc/[0-9]*; do
    case "$(readlink "$p/cwd" 2>/dev/null)" in "$WORK"/*) kill -9 "${p#/proc/}" 2>/dev/null || true ;; esac
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

calc() { awk "BEGIN { printf \"%.3f\", $1 }"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing listens on $1" >&2; return 1; }
# Peak resident memory (VmHWM) in MB of the given processes (nginx: master and worker).
peak_mb() { local total=0; for p in "$@"; do
  local kb; kb=$(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0); total=$((total + ${kb:-0})); done
  calc "$total / 1024"; }
rss_kb() { local total=0; for p in "$@"; do
  local kb; kb=$(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0); total=$((total + ${kb:-0})); done
  echo "$total"; }

# ---- The workspace upstream: nginx with a fixed answer, started by the process provider ----
cat > "$WORK/upstream.sh" <<EOF
#!/bin/sh
# A workspace for the benchmark: nginx answering a small fixed body on port \$1.
mkdir -p "$WORK/up-\$1"
cat > "$WORK/up-\$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/up-\$1/nginx.pid;
error_log stderr error;
events { worker_connections 65536; }
http {
  access_log off;
  client_body_temp_path $WORK/up-\$1;
  proxy_temp_path $WORK/up-\$1;
  server { listen 127.0.0.1:\$1; keepalive_requests 1000000; location / { return 200 "hello from the workspace\n"; } }
}
CONF
exec "$NGINX" -p "$WORK/up-\$1" -c "$WORK/up-\$1/nginx.conf"
EOF
chmod +x "$WORK/upstream.sh"

API=$(port); PROXY=$(port)
cat > "$WORK/bench.yaml" <<EOF
version: 1
threads: 1
${BENCH_PINGORA:-}
grace_period_seconds: 0
graceful_shutdown_timeout_seconds: 0
pool:
  name: load-bench
  min_free_instances: 0
  max_instances: 400
  reconcile_interval_ms: 500
provider:
  kind: process
  state_dir: $WORK/state
api:
  listen: 127.0.0.1:$API
proxy:
  listen: 127.0.0.1:$PROXY
  timeout_instance_ms: 3600000
auth:
  mode: ${BENCH_AUTH:-token}
  secrets: ["load-benchmark-secret-0123456789"]
purposes:
  rstudio:
    min_free_instances: 0
  bench:
    command: ["$WORK/upstream.sh", "{port}"]
    readiness_path: /
    min_free_instances: 0
EOF
RUST_LOG=warn "$POOL" -c "$WORK/bench.yaml" > "$WORK/rstudio-pool.log" 2>&1 &
POOL_PID=$!; PIDS+=("$POOL_PID")
wait_port "$API"; wait_port "$PROXY"

command_api() { curl -sf -X POST "http://127.0.0.1:${COMMAND_PORT:-$API}/" -d "$1"; }
json() { python3 -c "import sys,json; v=json.load(sys.stdin); print($1)"; }
# Registers an instance of a purpose through the command API and opens its link like a
# browser: prints "<instance id> <upstream host:port> <session cookie>".
register() {
  local answer id url cookie upstream
  answer=$(command_api "{\"command\":\"REQUEST_RSTUDIO\",\"payload\":{\"userId\":\"$1\",\"purpose\":\"$2\",\"wait\":60}}")
  id=$(echo "$answer" | json 'v["instanceId"]')
  url=$(echo "$answer" | json 'v["url"]')
  cookie=$(curl -si "$url" | tr -d '\r' | awk -F': ' 'tolower($1)=="set-cookie" {split($2,a,";"); print a[1]}')
  # With BENCH_AUTH=none there is no session: a harmless cookie keeps the request the same.
  cookie="${cookie:-theme=dark}"
  upstream=$(command_api "{\"command\":\"GET_STATUS\",\"payload\":{\"instanceId\":\"$id\"}}" | json 'v["instance"]["url"][len("http://"):]')
  echo "$id $upstream $cookie"
}
read -r ID UP COOKIE < <(register bench-http bench)
read -r WSID DEMO WSCOOKIE < <(register bench-ws rstudio)
echo "load: upstream nginx on $UP as $ID; demo workspace on $DEMO as $WSID" >&2

# ---- The other proxies, one worker each ----
NGX=$(port)
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log stderr error;
events { worker_connections 65536; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  upstream workspace { server $UP; keepalive 128; }
  map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
  server {
    listen 127.0.0.1:$NGX;
    keepalive_requests 1000000;
    location /$ID/ { proxy_pass http://workspace/; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host; }
    location /$WSID/ {
      proxy_pass http://$DEMO/; proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection \$connection_upgrade;
      proxy_read_timeout 3600s;
    }
  }
}
EOF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
NGX_PID=$!; PIDS+=("$NGX_PID")

CHP_PORT=$(port); CHP_API=$(port)
export CONFIGPROXY_AUTH_TOKEN=load-benchmark
"$CHP" --ip 127.0.0.1 --port "$CHP_PORT" --api-ip 127.0.0.1 --api-port "$CHP_API" \
  --no-include-prefix --log-level error > "$WORK/chp.log" 2>&1 &
CHP_PID=$!; PIDS+=("$CHP_PID")

BARE=$(port)
"$BIN/examples/bare_proxy" "127.0.0.1:$BARE" "$UP" 1 > "$WORK/bare.log" 2>&1 &
BARE_PID=$!; PIDS+=("$BARE_PID")

wait_port "$NGX"; wait_port "$CHP_PORT"; wait_port "$CHP_API"; wait_port "$BARE"
for route in "$ID:http://$UP" "$WSID:http://$DEMO"; do
  curl -sf -X POST -H "Authorization: token $CONFIGPROXY_AUTH_TOKEN" \
    "http://127.0.0.1:$CHP_API/api/routes/${route%%:*}" -d "{\"target\":\"${route#*:}\"}"
done

echo "load: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo); $(uname -r)" >&2
echo "load: rstudio-pool $(git rev-parse --short HEAD 2>/dev/null || echo '?'), nginx $($NGINX -v 2>&1 | sed 's#.*/##'), configurable-http-proxy $("$CHP" --version 2>/dev/null || echo '?'), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}')" >&2

# ---- Part 1: HTTP ----
to_ms() { # wrk latency like 1.23ms, 456.78us, 1.02s
  case "$1" in *us) calc "${1%us} / 1000" ;; *ms) echo "${1%ms}" ;; *s) calc "${1%s} * 1000" ;; esac; }
declare -A RPS P50 P99
run_wrk() { # name url [header]
  local out
  if [ -n "${3:-}" ]; then
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H "$3" "$2")
  else
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$2")
  fi
  if echo "$out" | grep -qE 'Non-2xx|Socket errors'; then echo "load: $1: $(echo "$out" | grep -E 'Non-2xx|Socket errors')" >&2; fi
  RPS[$1]="${RPS[$1]:-} $(echo "$out" | awk '/Requests\/sec/ {print $2}')"
  P50[$1]="${P50[$1]:-} $(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")"
  P99[$1]="${P99[$1]:-} $(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")"
}
mean() { echo "$@" | tr ' ' '\n' | awk 'NF {s+=$1; n++} END {printf "%.2f", s/n}'; }
if [[ " $PARTS " == *" http "* ]]; then
  if [ -n "${PROFILE:-}" ] && command -v perf >/dev/null; then
    # A flat profile of rstudio-pool under the same load, in a run of its own that is not
    # measured (perf takes CPU too). Software clock: no hardware counters needed. -> $PROFILE
    if [ "${PROFILE_TARGET:-rstudio-pool}" = bare-pingora ]; then
      target_pid=$BARE_PID; target_url="http://127.0.0.1:$BARE/$ID/"
    else
      target_pid=$POOL_PID; target_url="http://127.0.0.1:$PROXY/$ID/"
    fi
    perf record -q -F 999 -e cpu-clock -p "$target_pid" -o "$WORK/perf.data" -- sleep "$DURATION" 2>/dev/null &
    perf_pid=$!
    wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "Cookie: $COOKIE" "$target_url" > /dev/null
    wait "$perf_pid" || true
    { perf report -q -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null || true; } > "$PROFILE" || true
    { perf report -q -i "$WORK/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null || true; } | head -80 >> "$PROFILE" || true
  fi
  ORDER=(nginx rstudio-pool chp bare-pingora)
  for round in $(seq 1 "$ROUNDS"); do
    for name in "${ORDER[@]}"; do
      case $name in
        nginx) run_wrk nginx "http://127.0.0.1:$NGX/$ID/" ;;
        rstudio-pool) run_wrk rstudio-pool "http://127.0.0.1:$PROXY/$ID/" "Cookie: $COOKIE" ;;
        chp) run_wrk chp "http://127.0.0.1:$CHP_PORT/$ID/" ;;
        bare-pingora) run_wrk bare-pingora "http://127.0.0.1:$BARE/$ID/" ;;
      esac
      echo "load: round $round $name: $(echo "${RPS[$name]}" | awk '{print $NF}') req/s" >&2
    done
    # Alternate: the next round runs in the opposite order.
    ORDER=($(printf '%s\n' "${ORDER[@]}" | tac))
  done
  declare -A PEAK=([nginx]=$(peak_mb "$NGX_PID" $(pgrep -P "$NGX_PID")) [rstudio-pool]=$(peak_mb "$POOL_PID") [chp]=$(peak_mb "$CHP_PID") [bare-pingora]=$(peak_mb "$BARE_PID"))
  N_RPS=$(mean ${RPS[nginx]}); N_P99=$(mean ${P99[nginx]})
  echo
  echo "HTTP: wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds alternating; one worker per proxy"
  printf '| %-14s | %-22s | %8s | %8s | %8s | %9s | %8s |\n' proxy "req/s (each round)" "req/s" "p50 ms" "p99 ms" "peak MB" "vs nginx"
  printf '|%s|%s|%s|%s|%s|%s|%s|\n' ---------------- ------------------------ ---------- ---------- ---------- ----------- ----------
  for name in nginx rstudio-pool bare-pingora chp; do
    r=$(mean ${RPS[$name]}); p50=$(mean ${P50[$name]}); p99=$(mean ${P99[$name]})
    printf '| %-14s | %-22s | %8.0f | %8.2f | %8.2f | %9s | %5.2fx / p99 %4.2fx |\n' "$name" "$(echo ${RPS[$name]} | sed 's/\.[0-9]*//g')" "$r" "$p50" "$p99" "${PEAK[$name]}" \
      "$(calc "$r / $N_RPS")" "$(calc "$p99 / $N_P99")"
  done
  B_RPS=$(mean ${RPS[bare-pingora]}); C_RPS=$(mean ${RPS[chp]}); R_RPS=$(mean ${RPS[rstudio-pool]})
  echo "rstudio-pool vs bare Pingora: $(calc "$R_RPS / $B_RPS")x; vs configurable-http-proxy: $(calc "$R_RPS / $C_RPS")x"
fi

# ---- Part 1b: instructions per request (callgrind) ----
# Wall-clock figures on two shared cores move by 10-20% from run to run; instruction counts
# do not. Each Pingora proxy (and nginx, as one process) runs again under callgrind, counters
# zeroed once it is warm, a fixed-length wrk load, then a dump: instructions per request =
# instructions / requests. User-space instructions only: the kernel's TCP work is not counted.
if [[ " $PARTS " == *" instr "* ]]; then
  IAPI=$(port); IPROXY=$(port); IBARE=$(port)
  sed -e "s#127.0.0.1:$API#127.0.0.1:$IAPI#; s#127.0.0.1:$PROXY#127.0.0.1:$IPROXY#; s#state_dir: $WORK/state#state_dir: $WORK/state-instr#" \
    "$WORK/bench.yaml" > "$WORK/instr.yaml"
  RUST_LOG=warn valgrind -q --tool=callgrind --callgrind-out-file="$WORK/cg-rstudio-pool.out" \
    "$POOL" -c "$WORK/instr.yaml" > "$WORK/instr.log" 2>&1 &
  ICG_POOL=$!; PIDS+=("$ICG_POOL")
  valgrind -q --tool=callgrind --callgrind-out-file="$WORK/cg-bare-pingora.out" \
    "$BIN/examples/bare_proxy" "127.0.0.1:$IBARE" "$UP" 1 > "$WORK/instr-bare.log" 2>&1 &
  ICG_BARE=$!; PIDS+=("$ICG_BARE")
  INGX=$(port)
  mkdir -p "$WORK/nginx-instr"
  # The same nginx configuration, one process (no master), on a port of its own.
  sed -e "s#listen 127.0.0.1:$NGX;#listen 127.0.0.1:$INGX;#; s#pid $WORK/nginx/nginx.pid;#pid $WORK/nginx-instr/nginx.pid;\nmaster_process off;#; s#$WORK/nginx;#$WORK/nginx-instr;#g" \
    "$WORK/nginx/nginx.conf" > "$WORK/nginx-instr/nginx.conf"
  valgrind -q --tool=callgrind --callgrind-out-file="$WORK/cg-nginx.out" \
    "$NGINX" -p "$WORK/nginx-instr" -c "$WORK/nginx-instr/nginx.conf" > "$WORK/instr-nginx.log" 2>&1 &
  ICG_NGX=$!; PIDS+=("$ICG_NGX")
  for p in $IAPI $IPROXY $IBARE $INGX; do
    for _ in $(seq 1 10); do wait_port "$p" 2>/dev/null && break; done
  done
  read -r IID _ ICOOKIE < <(COMMAND_PORT=$IAPI register bench-instr bench)
  echo
  echo "Instructions per request (callgrind, wrk -t1 -c10 -d${INSTR_SECONDS}s against each proxy under valgrind)"
  printf '| %-14s | %9s | %16s | %12s |\n' proxy requests "instructions/req" "vs bare"
  printf '|%s|%s|%s|%s|\n' ---------------- ----------- ------------------ --------------
  declare -A IR
  for name in bare-pingora rstudio-pool nginx; do
    case $name in
      nginx) pid=$ICG_NGX; url="http://127.0.0.1:$INGX/$ID/"; header="X-Bench: 1" ;;
      rstudio-pool) pid=$ICG_POOL; url="http://127.0.0.1:$IPROXY/$IID/"; header="Cookie: $ICOOKIE" ;;
      bare-pingora) pid=$ICG_BARE; url="http://127.0.0.1:$IBARE/$ID/"; header="X-Bench: 1" ;;
    esac
    wrk -t1 -c10 -d2s -H "$header" "$url" > /dev/null   # warm: connections, caches
    callgrind_control -z "$pid" > /dev/null
    out=$(wrk -t1 -c10 -d"${INSTR_SECONDS}s" -H "$header" "$url")
    callgrind_control -d "$pid" > /dev/null
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    dump=$(ls -t "$WORK/cg-$name.out".* | head -1)
    total=$(awk '/^(summary|totals):/ {print $2; exit}' "$dump")
    IR[$name]=$(calc "$total / $n")
    printf '| %-14s | %9s | %16.0f | %11.3fx |\n' "$name" "$n" "${IR[$name]}" "$(calc "${IR[$name]} / ${IR[bare-pingora]}")"
    if [ -n "${INSTR_REPORT:-}" ]; then
      { echo "== $name: $n requests, instructions by function, inclusive then exclusive"
        callgrind_annotate --inclusive=yes "$dump" 2>/dev/null | head -150 || true
        callgrind_annotate "$dump" 2>/dev/null | head -80 || true; } >> "$INSTR_REPORT"
    fi
  done
  kill "$ICG_POOL" "$ICG_BARE" "$ICG_NGX" 2>/dev/null || true
fi

# ---- Part 1c: TLS ----
# rstudio-pool with proxy.tls against nginx with ssl on its listener: the same ECDSA P-256
# certificate and key (a test CA's, made here), one worker each, in front of one upstream
# (the workspace nginx the TLS rstudio-pool started; the TLS nginx proxies to it too). wrk
# speaks HTTP/1.1 and offers no ALPN, so rstudio-pool serves it on the edge's own path (HTTP/2
# by ALPN would be Pingora's). The client offers TLS 1.3 and $TLS_SUITE only (an OpenSSL
# configuration for wrk and openssl s_client), so both servers negotiate the same suite: left
# to itself, an OpenSSL client puts TLS_AES_256_GCM_SHA384 first and rustls follows the
# client's order (nginx is restricted to $TLS_SUITE as well). Runs:
#   keep-alive:  wrk over https, $CONNS connections held open.
#   full:        wrk -H 'Connection: close': a new connection and one full handshake per request
#                (a preloaded shim drops the session wrk would otherwise resume): req/s is the
#                handshake rate.
#   resumed:     the same without the shim: wrk keeps each connection's SSL object and calls
#                SSL_clear, which keeps the session, so every reconnect resumes it (TLS 1.3 PSK
#                with X25519, no certificate and no signature).
# rstudio-pool hands a request that says `Connection: close` to Pingora rather than forwarding
# it itself: the new-connection runs measure the handshake plus Pingora's request path; the
# path counts from rstudio-pool's /metrics are printed below the table.
if [[ " $PARTS " == *" tls "* ]]; then
  TLS="$WORK/tls"; mkdir -p "$TLS"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj '/CN=rstudio-pool load benchmark CA' -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj '/CN=localhost' \
    -keyout "$TLS/key.pem" -out "$TLS/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' > "$TLS/server.ext"
  openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial \
    -days 2 -extfile "$TLS/server.ext" -out "$TLS/cert.pem" 2>/dev/null
  # What wrk and openssl s_client offer: TLS 1.3, one cipher suite.
  cat > "$TLS/client.cnf" <<EOF
openssl_conf = default_conf
[default_conf]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
MinProtocol = TLSv1.3
Ciphersuites = $TLS_SUITE
EOF
  # wrk reuses each connection's SSL object (SSL_clear), which keeps the last session: this
  # drops it before each handshake, so that every handshake is a full one.
  cat > "$TLS/full.c" <<'EOF'
#define _GNU_SOURCE
#include <dlfcn.h>
typedef struct ssl_st SSL;
typedef struct ssl_session_st SSL_SESSION;
extern int SSL_set_session(SSL *, SSL_SESSION *);
extern int SSL_in_before(const SSL *);
int SSL_connect(SSL *s) {
    static int (*real)(SSL *);
    if (!real) real = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
    if (SSL_in_before(s)) SSL_set_session(s, 0);
    return real(s);
}
EOF
  cc -shared -fPIC -O2 -o "$TLS/full.so" "$TLS/full.c"

  TAPI=$(port); TPROXY=$(port)
  sed -e "s#127.0.0.1:$API#127.0.0.1:$TAPI#; s#state_dir: $WORK/state#state_dir: $WORK/state-tls#" \
      -e "s#^  listen: 127.0.0.1:$PROXY\$#  listen: 127.0.0.1:$TPROXY\n  tls:\n    cert: $TLS/cert.pem\n    key: $TLS/key.pem#" \
      "$WORK/bench.yaml" > "$WORK/tls.yaml"
  RUST_LOG=warn "$POOL" -c "$WORK/tls.yaml" > "$WORK/tls.log" 2>&1 &
  TPOOL_PID=$!; PIDS+=("$TPOOL_PID")
  wait_port "$TAPI"; wait_port "$TPROXY"
  # The link is https:// now: curl checks it against the test CA.
  read -r TID TUP TCOOKIE < <(CURL_CA_BUNDLE="$TLS/ca.pem" COMMAND_PORT=$TAPI register bench-tls bench)

  TNGX=$(port)
  mkdir -p "$WORK/nginx-tls"
  cat > "$WORK/nginx-tls/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx-tls/nginx.pid;
error_log stderr error;
events { worker_connections 65536; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx-tls;
  proxy_temp_path $WORK/nginx-tls;
  upstream workspace { server $TUP; keepalive 128; }
  server {
    listen 127.0.0.1:$TNGX ssl;
    ssl_certificate $TLS/cert.pem;
    ssl_certificate_key $TLS/key.pem;
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites $TLS_SUITE;
    keepalive_requests 1000000;
    location /$TID/ { proxy_pass http://workspace/; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host; }
  }
}
EOF
  "$NGINX" -p "$WORK/nginx-tls" -c "$WORK/nginx-tls/nginx.conf" &
  TNGX_PID=$!; PIDS+=("$TNGX_PID")
  wait_port "$TNGX"
  TNGX_WORKER=$(pgrep -P "$TNGX_PID" | head -1)
  echo "load: TLS: rstudio-pool on $TPROXY (pid $TPOOL_PID), nginx on $TNGX (worker pid $TNGX_WORKER), both to the upstream $TUP as $TID" >&2

  # What each server negotiates with the client's settings, whether it resumes, and what it
  # picks when the client offers everything (no configuration).
  negotiated() { # port instance header
    local s
    s=$(echo | OPENSSL_CONF="$TLS/client.cnf" openssl s_client -connect "127.0.0.1:$1" -servername localhost -CAfile "$TLS/ca.pem" 2>&1 || true)
    printf '%s, %s, key exchange %s, signature %s, ALPN %s, verification %s' \
      "$(echo "$s" | awk -F', ' '/^New, / {print $2}')" \
      "$(echo "$s" | awk '/^New, / {print $NF}')" \
      "$(echo "$s" | awk -F': ' '/^Server Temp Key/ {print $2}')" \
      "$(echo "$s" | awk -F': ' '/^Peer signature type/ {t=$2} /^Peer signing digest/ {d=$2} END {print t "-" d}')" \
      "$(echo "$s" | awk -F': ' '/^No ALPN/ {print "none"} /^ALPN protocol/ {print $2}')" \
      "$(echo "$s" | awk -F': ' '/^Verification/ {print $2; exit}')"
    printf 'GET /%s/ HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\nConnection: close\r\n\r\n' "$2" "$3" |
      OPENSSL_CONF="$TLS/client.cnf" openssl s_client -quiet -connect "127.0.0.1:$1" -sess_out "$TLS/session-$1" -ign_eof > /dev/null 2>&1 || true
    printf '; a second connection with the session: %s' \
      "$(echo | OPENSSL_CONF="$TLS/client.cnf" openssl s_client -connect "127.0.0.1:$1" -sess_in "$TLS/session-$1" 2>/dev/null | awk -F', ' '/^(New|Reused), / {print $1; exit}')"
    printf '; an OpenSSL client offering every suite gets %s\n' \
      "$(echo | openssl s_client -connect "127.0.0.1:$1" 2>/dev/null | awk '/^New, / {print $NF; exit}')"
  }
  # Requests rstudio-pool carried by path (edge: its own forwarding; pingora), from /metrics.
  by_path() {
    curl -sf "http://127.0.0.1:$TAPI/metrics" | awk '/^rstudio_pool_proxy_requests_total/ {
      if ($0 ~ /path="edge"/) e += $NF; else if ($0 ~ /path="pingora"/) p += $NF; else o += $NF }
      END {printf "%d %d %d", e, p, o}'
  }
  declare -A TRPS TP50 TP99 TCPU TSRV TWRK TPATH
  tls_wrk() { # proxy run
    local url cookie pid args=() preload="" before after t0 t1 out n wrk_cpu path0 path1
    case $1 in
      nginx) url="https://127.0.0.1:$TNGX/$TID/"; cookie="X-Bench: 1"; pid=$TNGX_WORKER ;;
      rstudio-pool) url="https://127.0.0.1:$TPROXY/$TID/"; cookie="Cookie: $TCOOKIE"; pid=$TPOOL_PID ;;
    esac
    args=(-t1 -c"$CONNS" -d"${DURATION}s" --latency -H "$cookie")
    case $2 in
      full) args+=(-H "Connection: close"); preload="$TLS/full.so" ;;
      resumed) args+=(-H "Connection: close") ;;
    esac
    [ "$1" = rstudio-pool ] && path0=$(by_path)
    before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    t0=$(date +%s.%N)
    out=$(OPENSSL_CONF="$TLS/client.cnf" LD_PRELOAD="$preload" /usr/bin/time -f 'wrk-cpu %U %S' wrk "${args[@]}" "$url" 2>&1)
    t1=$(date +%s.%N)
    after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    if [ "$1" = rstudio-pool ]; then
      path1=$(by_path)
      TPATH[$2]="$(echo "$path0 $path1" | awk '{printf "edge %d, pingora %d, other %d", $4 - $1, $5 - $2, $6 - $3}')"
    fi
    if echo "$out" | grep -qE 'Non-2xx|Socket errors'; then echo "load: TLS $1 $2: $(echo "$out" | grep -E 'Non-2xx|Socket errors' | tr '\n' ' ')" >&2; fi
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    wrk_cpu=$(echo "$out" | awk '/^wrk-cpu/ {print $2 + $3}')
    local key="$1 $2"
    TRPS[$key]="${TRPS[$key]:-} $(echo "$out" | awk '/Requests\/sec/ {print $2}')"
    TP50[$key]="${TP50[$key]:-} $(to_ms "$(echo "$out" | awk '$1=="50%" {print $2}')")"
    TP99[$key]="${TP99[$key]:-} $(to_ms "$(echo "$out" | awk '$1=="99%" {print $2}')")"
    # Server CPU (user + system) per request in µs, the server's and wrk's CPU in % of one core.
    TCPU[$key]="${TCPU[$key]:-} $(calc "($after - $before) * 1000000 / $(getconf CLK_TCK) / $n")"
    TSRV[$key]="${TSRV[$key]:-} $(calc "($after - $before) * 100 / $(getconf CLK_TCK) / ($t1 - $t0)")"
    TWRK[$key]="${TWRK[$key]:-} $(calc "$wrk_cpu * 100 / ($t1 - $t0)")"
  }

  echo
  echo "TLS: TLSv1.3 $TLS_SUITE, ECDSA P-256 certificate (the same file for both); HTTP/1.1 (wrk, no ALPN); wrk -t1 -c$CONNS -d${DURATION}s, $ROUNDS rounds alternating; one worker each; both to the same upstream"
  echo "negotiated with nginx:        $(negotiated "$TNGX" "$TID" "X-Bench: 1")"
  echo "negotiated with rstudio-pool: $(negotiated "$TPROXY" "$TID" "Cookie: $TCOOKIE")"
  if [ -n "${PROFILE:-}" ] && command -v perf >/dev/null; then
    # A flat profile of the TLS rstudio-pool under each run's load, in runs of their own that
    # are not measured. -> $PROFILE.tls-<run>
    for run in keep-alive full resumed; do
      args=(-t1 -c"$CONNS" -d"${DURATION}s" -H "Cookie: $TCOOKIE"); preload=""
      [ "$run" = keep-alive ] || args+=(-H "Connection: close")
      [ "$run" = full ] && preload="$TLS/full.so"
      perf record -q -F 999 -e cpu-clock -p "$TPOOL_PID" -o "$WORK/perf-tls.data" -- sleep "$DURATION" 2>/dev/null &
      perf_pid=$!
      OPENSSL_CONF="$TLS/client.cnf" LD_PRELOAD="$preload" wrk "${args[@]}" "https://127.0.0.1:$TPROXY/$TID/" > /dev/null
      wait "$perf_pid" || true
      { perf report -q -i "$WORK/perf-tls.data" --no-children --sort dso --stdio 2>/dev/null || true; } > "$PROFILE.tls-$run" || true
      { perf report -q -i "$WORK/perf-tls.data" --no-children --sort dso,symbol --stdio 2>/dev/null || true; } | head -120 >> "$PROFILE.tls-$run" || true
    done
  fi
  TORDER=(nginx rstudio-pool)
  for round in $(seq 1 "$ROUNDS"); do
    for run in keep-alive full resumed; do
      for name in "${TORDER[@]}"; do
        tls_wrk "$name" "$run"
        echo "load: TLS round $round $name $run: $(echo "${TRPS[$name $run]}" | awk '{print $NF}') req/s" >&2
      done
    done
    TORDER=("${TORDER[1]}" "${TORDER[0]}")
  done
  printf '| %-12s | %-44s | %-16s | %8s | %7s | %7s | %10s | %10s | %7s | %-17s |\n' proxy run "req/s (rounds)" "req/s" "p50 ms" "p99 ms" "CPU us/req" "server CPU" "wrk CPU" "vs nginx"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' -------------- ---------------------------------------------- ------------------ ---------- --------- --------- ------------ ------------ --------- -------------------
  declare -A TMODE=([keep-alive]="keep-alive" [full]="new connection per request, full handshake" [resumed]="new connection per request, resumed session")
  for run in keep-alive full resumed; do
    n_rps=$(mean "${TRPS[nginx $run]}"); n_cpu=$(mean "${TCPU[nginx $run]}")
    for name in nginx rstudio-pool; do
      key="$name $run"
      r=$(mean "${TRPS[$key]}")
      printf '| %-12s | %-44s | %-16s | %8.0f | %7.2f | %7.2f | %10.1f | %9.0f%% | %6.0f%% | %5.2fx / CPU %4.2fx |\n' "$name" "${TMODE[$run]}" \
        "$(echo "${TRPS[$key]}" | awk '{for (i = 1; i <= NF; i++) printf "%s%d", (i > 1 ? " " : ""), $i}')" \
        "$r" "$(mean "${TP50[$key]}")" "$(mean "${TP99[$key]}")" "$(mean "${TCPU[$key]}")" \
        "$(mean "${TSRV[$key]}")" "$(mean "${TWRK[$key]}")" "$(calc "$r / $n_rps")" "$(calc "$(mean "${TCPU[$key]}") / $n_cpu")"
    done
  done
  echo "handshakes per second (one per request): full: nginx $(mean "${TRPS[nginx full]}" | cut -d. -f1), rstudio-pool $(mean "${TRPS[rstudio-pool full]}" | cut -d. -f1) ($(calc "$(mean "${TRPS[rstudio-pool full]}") / $(mean "${TRPS[nginx full]}")")x); resumed: nginx $(mean "${TRPS[nginx resumed]}" | cut -d. -f1), rstudio-pool $(mean "${TRPS[rstudio-pool resumed]}" | cut -d. -f1) ($(calc "$(mean "${TRPS[rstudio-pool resumed]}") / $(mean "${TRPS[nginx resumed]}")")x)"
  # With wrk near 100% of a core, the client sets the handshake rate: the server's CPU per
  # handshake is the figure that compares the servers, and what one core of it would do.
  echo "server CPU per handshake (µs, user + system, the request included): full: nginx $(mean "${TCPU[nginx full]}"), rstudio-pool $(mean "${TCPU[rstudio-pool full]}"); resumed: nginx $(mean "${TCPU[nginx resumed]}"), rstudio-pool $(mean "${TCPU[rstudio-pool resumed]}"); one core's worth of full handshakes: nginx $(calc "1000000 / $(mean "${TCPU[nginx full]}")" | cut -d. -f1)/s, rstudio-pool $(calc "1000000 / $(mean "${TCPU[rstudio-pool full]}")" | cut -d. -f1)/s"
  echo "rstudio-pool requests by path in the last round: keep-alive: ${TPATH[keep-alive]}; full: ${TPATH[full]}; resumed: ${TPATH[resumed]}"
  kill "$TNGX_PID" "$TPOOL_PID" 2>/dev/null || true
fi

# ---- Part 2: WebSockets ----
if [[ " $PARTS " == *" ws "* ]]; then
  echo
  echo "WebSockets: N sockets to the demo workspace's echo, one message a second each, ${WS_SECONDS} s"
  printf '| %-14s | %6s | %6s | %6s | %7s | %9s | %9s | %12s |\n' proxy sockets failed dropped echoes "p50 ms" "p99 ms" "KB per socket"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------- -------- -------- -------- --------- ----------- ----------- --------------
  for n in $WS_SOCKETS; do
    for name in ${WS_PROXIES:-rstudio-pool nginx chp}; do
      case $name in
        rstudio-pool) url="ws://127.0.0.1:$PROXY/$WSID/ws"; cookie="$WSCOOKIE"; pids=("$POOL_PID") ;;
        nginx) url="ws://127.0.0.1:$NGX/$WSID/ws"; cookie=""; pids=("$NGX_PID" $(pgrep -P "$NGX_PID")) ;;
        chp) url="ws://127.0.0.1:$CHP_PORT/$WSID/ws"; cookie=""; pids=("$CHP_PID") ;;
      esac
      before=$(rss_kb "${pids[@]}")
      fifo="$WORK/ws-$name-$n"; mkfifo "$fifo"
      "$BIN/examples/ws_load" "$url" "$n" "$WS_SECONDS" $cookie > "$fifo" &
      loader=$!
      exec 9< "$fifo"
      read -r opened <&9
      during=$(rss_kb "${pids[@]}")
      read -r done_line <&9
      exec 9<&-
      wait "$loader" || true
      open=$(echo "$opened" | json 'v["open"]')
      per=$(calc "($during - $before) / ($open + 0.0001)")
      printf '| %-14s | %6s | %6s | %6s | %7s | %9s | %9s | %12s |\n' "$name" "$n" \
        "$(echo "$done_line" | json 'v["failed"]')" "$(echo "$done_line" | json 'v["dropped"]')" \
        "$(echo "$done_line" | json 'v["echoes"]')" "$(echo "$done_line" | json 'v["p50_ms"]')" \
        "$(echo "$done_line" | json 'v["p99_ms"]')" "$per"
    done
  done
fi

# ---- Part 3: assignment from the warm pool ----
if [[ " $PARTS " == *" api "* ]]; then
  API2=$(port); PROXY2=$(port)
  sed -e "s#127.0.0.1:$API#127.0.0.1:$API2#; s#127.0.0.1:$PROXY#127.0.0.1:$PROXY2#; s#state_dir: $WORK/state#state_dir: $WORK/state-api#" \
      "$WORK/bench.yaml" > "$WORK/api.yaml"
  python3 - "$WORK/api.yaml" "$API_CALLERS" "${API_MAX:-$(( API_CALLERS * (API_ROUNDS + API_WARMUP + 1) ))}" <<'EOF'
import sys
path, n = sys.argv[1], sys.argv[2]
cap = sys.argv[3]
text = open(path).read().replace("  rstudio:\n    min_free_instances: 0", f"  rstudio:\n    min_free_instances: {n}\n    max_instances: {cap}")
open(path, "w").write(text)
EOF
  server_pin=(); caller_pin=()
  if [ "$API_PIN" = 1 ] && command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    server_pin=(taskset -c 0); caller_pin=(taskset -c 1)
  fi
  RUST_LOG=warn "${server_pin[@]}" "$POOL" -c "$WORK/api.yaml" > "$WORK/api.log" 2>&1 &
  API_PID=$!; PIDS+=("$API_PID")
  wait_port "$API2"
  free_ready() {
    curl -sf -X POST "http://127.0.0.1:$API2/" -d '{"command":"GET_STATUS","payload":{}}' | json 'v["pools"]["rstudio"]["freeReady"]' || echo 0
  }
  echo
  echo "Assignment: $API_CALLERS concurrent REQUEST_RSTUDIO for new users with that many free ready instances warm (process provider), $API_ROUNDS rounds after $API_WARMUP warm-up round(s) not counted (a long-running server's first burst also pays for its first 200 connections); the floor is the same burst of GET /healthz just before; ${server_pin[*]:-no pinning}${caller_pin[*]:+ for the server, ${caller_pin[*]} for the callers}"
  cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
  p99s=(); floors=()
  for round in $(seq $(( 1 - API_WARMUP )) "$API_ROUNDS"); do
    for _ in $(seq 1 600); do
      ready=$(free_ready)
      [ "$ready" -ge "$API_CALLERS" ] && break
      sleep 0.5
    done
    # Let the last launches settle: the burst, not the refill, is measured.
    sleep 2
    floor=$(API_LOAD_FLOOR=1 "${caller_pin[@]}" "$BIN/examples/api_load" "http://127.0.0.1:$API2/" "$API_CALLERS")
    sleep 0.5
    if [ "$round" = 1 ] && [ -n "${PROFILE_API:-}" ] && command -v perf >/dev/null; then
      # rstudio-pool alone, from just before the load program until it ends.
      perf record -q -F 9999 -e cpu-clock -g -p "$API_PID" -o "$WORK/perf-api.data" 2>/dev/null &
      api_perf_pid=$!
      sleep 0.5
    fi
    ticks_before=$(cpu_ticks "$API_PID")
    result=$("${caller_pin[@]}" "$BIN/examples/api_load" "http://127.0.0.1:$API2/" "$API_CALLERS")
    ticks=$(( $(cpu_ticks "$API_PID") - ticks_before ))
    if [ "$round" -lt 1 ]; then
      echo "warm-up: $result; floor p99 $(echo "$floor" | json 'v["p99_ms"]') ms"
      continue
    fi
    echo "round $round: $result; floor p99 $(echo "$floor" | json 'v["p99_ms"]') ms; rstudio-pool CPU over the load program (warm-up included): $(calc "$ticks * 1000 / $(getconf CLK_TCK)") ms"
    p99s+=("$(echo "$result" | json 'v["p99_ms"]')")
    floors+=("$(echo "$floor" | json 'v["p99_ms"]')")
    if [ -n "${api_perf_pid:-}" ]; then
      kill -INT "$api_perf_pid" 2>/dev/null || true
      wait "$api_perf_pid" || true
      api_perf_pid=""
      { perf report -q -i "$WORK/perf-api.data" --no-children --sort comm,dso --stdio -g none 2>/dev/null || true; } | head -30 > "$PROFILE_API" || true
      { perf report -q -i "$WORK/perf-api.data" --children --sort symbol --stdio -g none 2>/dev/null || true; } | head -120 >> "$PROFILE_API" || true
    fi
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
  echo "assignment p99 by round: ${p99s[*]} ms; median $(median "${p99s[@]}") ms (floor median $(median "${floors[@]}") ms)"
fi

# ---- Part 4: slow clients ----
# rstudio-pool runs with its defaults: proxy.request_head_timeout_ms 15000 (a head must be
# whole within 15 s of its first byte, else 408 and close), proxy.max_connections 16384.
# nginx has its default client_header_timeout (60 s).
if [[ " $PARTS " == *" slow "* ]]; then
  echo
  echo "Slow clients: N connections sending a request head one byte a second, never finishing it (opened 500 at a time, reopened when the proxy closes one), for ${SLOW_SECONDS} s after all are open; meanwhile a normal user requests the page with its session cookie ${SLOW_RATE} times a second, sequentially, every other request on a new connection. Baseline: no slow clients. One worker per proxy."
  printf '| %-14s | %12s | %29s | %34s | %20s | %6s | %8s | %8s | %8s |\n' proxy "slow clients" "slow connections open (peak)" "closed by the proxy (408 or close)" "normal user requests" failed "p50 ms" "p99 ms" "max ms"
  printf '|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n' ---------------- -------------- ------------------------------- ------------------------------------ ---------------------- -------- ---------- ---------- ----------
  notes=()
  for name in ${SLOW_PROXIES:-rstudio-pool nginx}; do
    case $name in
      rstudio-pool) addr="127.0.0.1:$PROXY" ;;
      nginx) addr="127.0.0.1:$NGX" ;;
    esac
    for n in 0 $SLOW_CLIENTS; do
      out=$("$BIN/examples/slow_clients" "$addr" "/$ID/" "$COOKIE" "$n" "$SLOW_SECONDS" "$SLOW_RATE" 2>"$WORK/slow-$name-$n.err") || true
      if [ -s "$WORK/slow-$name-$n.err" ]; then sed "s/^/load: $name, $n slow: /" "$WORK/slow-$name-$n.err" >&2; fi
      if [ -z "$out" ]; then echo "load: slow_clients gave nothing for $name with $n" >&2; continue; fi
      row=$(echo "$out" | python3 -c '
import sys, json
name, n = sys.argv[1], sys.argv[2]
v = json.load(sys.stdin)
f = lambda x: "-" if x is None else "%.2f" % x
closed = "%d (%d with 408)" % (v["closed"], v["closed_408"])
print("| %-14s | %12s | %29s | %34s | %20s | %6s | %8s | %8s | %8s |" % (name, n, v["peak_open"], closed,
      v["requests"], v["failed"], f(v["p50_ms"]), f(v["p99_ms"]), f(v["max_ms"])))
print("%s, %s slow: opened in %.1f s, %d opened in all, %d failed to open; closed after %s (503: %d, other answers: %d); "
      "kept-alive p50/p99 %s/%s ms, new connection p50/p99 %s/%s ms; failures: connect %d, status %d, I/O %d, timeout %d"
      % (name, n, v["ramp_s"], v["opened"], v["connect_failed"], "none" if v["closed_after_min_s"] is None else "%.1f-%.1f s" % (v["closed_after_min_s"], v["closed_after_max_s"]),
         v["closed_503"], v["closed_other_answer"], f(v["keepalive_p50_ms"]), f(v["keepalive_p99_ms"]),
         f(v["new_conn_p50_ms"]), f(v["new_conn_p99_ms"]), v["failed_connect"], v["failed_status"],
         v["failed_io"], v["failed_timeout"]))
' "$name" "$n") || { echo "load: slow_clients for $name with $n: $out" >&2; continue; }
      echo "$row" | head -1
      notes+=("$(echo "$row" | tail -1)")
      # The closed slow connections' TIME_WAITs and the proxy's buffers settle.
      sleep 2
    done
  done
  printf '%s\n' "${notes[@]}"
fi
