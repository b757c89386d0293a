#!/usr/bin/env bash
# callcoach local development helper.
#
# Runs a private PostgreSQL and Redis under $ROOT/.dev/ (never the system-wide
# daemons) and runs the demo, the test suite or any command against them.
#
#   deploy/dev.sh demo          build release, start services, run `callcoach demo`, stop
#   deploy/dev.sh test [ARGS]   start services, `cargo nextest run --workspace --no-fail-fast [ARGS]`, stop
#                               (also creates .dev/sdk-venv with the anthropic Python SDK, schemathesis,
#                               websocket-client and honcho, installs Debian's chromium, and makes a
#                               self-signed CA + server certificate in .dev/tls)
#   deploy/dev.sh up            start services and print `export` lines (eval "$(deploy/dev.sh up)")
#   deploy/dev.sh down          stop the services
#   deploy/dev.sh env           print the `export` lines
#   deploy/dev.sh run CMD...    start services, run CMD with the env, stop
#   deploy/dev.sh status        show what is running
#
# Ports: CALLCOACH_DEV_PG_PORT (default 55432), CALLCOACH_DEV_REDIS_PORT (default 56379).
# Progress lines go to stderr prefixed with [dev]; only `export` lines go to stdout.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
DEV_DIR="$ROOT/.dev"
REDIS_DIR="$DEV_DIR/redis"
REDIS_CONF="$REDIS_DIR/redis.conf"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"
APT_LOG="$DEV_DIR/apt.log"
SDK_VENV="$DEV_DIR/sdk-venv"
SDK_SPEC='anthropic>=2,<3'
SCHEMATHESIS_SPEC='schemathesis>=4.3,<5'
WEBSOCKET_SPEC='websocket-client>=1.8,<2'
HONCHO_SPEC='honcho>=2,<3'
TLS_DIR="$DEV_DIR/tls"
PG_PORT="${CALLCOACH_DEV_PG_PORT:-55432}"
REDIS_PORT="${CALLCOACH_DEV_REDIS_PORT:-56379}"
PG_OS_USER=callcoach
DB_NAME=callcoach
WAIT_SECS=30

# Filled in by resolve_pg_paths / find_pg_bin.
PG_DIR="" PG_DATA="" PG_LOG="" PG_SOCK_DIR="" PG_BIN="" PSQL="" PG_ISREADY=""
STARTED_PG=0
NOTED_PG_DIR=0
STARTED_REDIS=0
APT_UPDATED=0
SUDO=()

log() { printf '[dev] %s\n' "$*" >&2; }
die() {
  printf '[dev] error: %s\n' "$*" >&2
  exit 1
}

is_root() { [[ $(id -u) -eq 0 ]]; }

for p in "$PG_PORT" "$REDIS_PORT"; do
  if ! [[ $p =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then die "invalid port '$p'"; fi
done

# ---------------------------------------------------------------- packages --

need_privileges() {
  if is_root; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    die "need root or sudo to install packages ($*); install them and retry"
  fi
}

apt_update_once() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; please install: $*"
  need_privileges "$@"
  if ((APT_UPDATED == 0)); then
    mkdir -p "$DEV_DIR"
    log "apt-get update (output in .dev/apt.log)"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$APT_LOG" 2>&1 || {
      tail -n 20 "$APT_LOG" >&2
      die "apt-get update failed (full log: $APT_LOG)"
    }
    APT_UPDATED=1
  fi
}

apt_install() {
  apt_update_once "$@"
  log "apt-get install $*"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"$APT_LOG" 2>&1 || {
    tail -n 20 "$APT_LOG" >&2
    die "apt-get install $* failed (full log: $APT_LOG)"
  }
}

apt_has() { apt-cache show "$1" >/dev/null 2>&1; }

ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server
  fi
  command -v redis-server >/dev/null 2>&1 || die "redis-server still not found after install"
  command -v redis-cli >/dev/null 2>&1 || die "redis-cli still not found after install"
}

# Directory holding pg_ctl, initdb and postgres: pg_ctl on PATH first, else the
# newest /usr/lib/postgresql/*/bin.
find_pg_bin() {
  local cands=() p d
  if p=$(command -v pg_ctl 2>/dev/null); then
    cands+=("$(dirname "$(readlink -f "$p")")" "$(dirname "$p")")
  fi
  while IFS= read -r d; do
    [[ -n $d ]] && cands+=("$d")
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -V -r)
  for d in "${cands[@]}"; do
    if [[ -x $d/pg_ctl && -x $d/initdb && -x $d/postgres ]]; then
      printf '%s\n' "$d"
      return 0
    fi
  done
  return 1
}

ensure_postgres() {
  if ! PG_BIN=$(find_pg_bin); then
    apt_update_once postgresql
    if apt_has postgresql-15; then
      apt_install postgresql-15
    else
      apt_install postgresql
    fi
    PG_BIN=$(find_pg_bin) || die "PostgreSQL server binaries not found after install"
  fi
  PSQL="$PG_BIN/psql"
  [[ -x $PSQL ]] || PSQL=$(command -v psql) || die "psql not found"
  PG_ISREADY="$PG_BIN/pg_isready"
  [[ -x $PG_ISREADY ]] || PG_ISREADY=$(command -v pg_isready 2>/dev/null) || PG_ISREADY=""
}

# The official anthropic Python SDK (tests/integration/sdk.rs), schemathesis
# (tests/integration/openapi.rs), websocket-client (the DevTools driver of
# tests/integration/dashboard.rs) and honcho (tests/integration/procfile.rs) in
# $SDK_VENV. Reused when it already has all four.
ensure_sdk_venv() {
  local py="$SDK_VENV/bin/python"
  if [[ -x $py && -x $SDK_VENV/bin/schemathesis && -x $SDK_VENV/bin/honcho ]] && "$py" -c 'import anthropic, websocket, sys; sys.exit(anthropic.__version__.split(".")[0] != "2")' 2>/dev/null; then
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_install python3-venv
  mkdir -p "$DEV_DIR"
  log "creating $SDK_VENV with $SDK_SPEC $SCHEMATHESIS_SPEC $WEBSOCKET_SPEC $HONCHO_SPEC (output in .dev/sdk-venv.log)"
  { python3 -m venv --clear "$SDK_VENV" && "$SDK_VENV/bin/pip" install -q "$SDK_SPEC" "$SCHEMATHESIS_SPEC" "$WEBSOCKET_SPEC" "$HONCHO_SPEC"; } >"$DEV_DIR/sdk-venv.log" 2>&1 || {
    tail -n 20 "$DEV_DIR/sdk-venv.log" >&2
    die "could not install the Python test tools (full log: $DEV_DIR/sdk-venv.log)"
  }
}

# A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it, for
# the Redis-over-TLS test (tests/integration/tls.rs). Made once, reused while valid.
ensure_tls_certs() {
  command -v openssl >/dev/null 2>&1 || apt_install openssl
  if [[ -s $TLS_DIR/server.crt ]] && openssl x509 -checkend 86400 -noout -in "$TLS_DIR/server.crt" >/dev/null 2>&1; then
    return 0
  fi
  mkdir -p "$TLS_DIR"
  log "making a test CA and server certificate in $TLS_DIR"
  (
    cd "$TLS_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj '/CN=callcoach dev CA' \
      -keyout ca.key -out ca.crt &&
      openssl req -newkey rsa:2048 -nodes -subj '/CN=localhost' -keyout server.key -out server.csr &&
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >server.ext &&
      openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
        -extfile server.ext -out server.crt &&
      chmod 644 server.key
  ) >"$DEV_DIR/tls.log" 2>&1 || {
    tail -n 20 "$DEV_DIR/tls.log" >&2
    die "openssl could not make the test certificates (full log: $DEV_DIR/tls.log)"
  }
}

# promtool (Debian's prometheus package) for tests/integration/metrics.rs.
ensure_promtool() {
  command -v promtool >/dev/null 2>&1 || apt_install prometheus
}

# Debian's chromium for the headless browser test of the dashboard.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 || apt_install chromium
}

ensure_deps() {
  ensure_redis
  ensure_postgres
  log "deps ok: $(redis-server --version | awk '{print $1, $2, $3}'), $("$PG_BIN/postgres" --version)"
}

# ------------------------------------------------------------ pg user/paths --

# Postgres refuses to run as root: as root, run it as an unprivileged user.
ensure_pg_os_user() {
  is_root || return 0
  if ! id -u "$PG_OS_USER" >/dev/null 2>&1; then
    log "creating system user '$PG_OS_USER' to run postgres"
    useradd -r -m -s /bin/bash "$PG_OS_USER" >&2 || die "useradd $PG_OS_USER failed"
  fi
}

# Run a command as the postgres OS user (or as ourselves when not root).
pg_as() {
  if ! is_root; then
    (cd / && "$@")
  elif command -v runuser >/dev/null 2>&1; then
    (cd / && runuser -u "$PG_OS_USER" -- "$@")
  else
    (cd / && su "$PG_OS_USER" -s /bin/bash -c "$(printf '%q ' "$@")")
  fi
}

path_hash() { printf '%s' "$ROOT" | sha1sum | cut -c1-12; }

# PG_DIR is $ROOT/.dev/pg unless the postgres user cannot reach it (root-only
# parent directories), in which case a per-checkout dir under /var/tmp is used.
resolve_pg_paths() {
  PG_DIR="$DEV_DIR/pg"
  if is_root && id -u "$PG_OS_USER" >/dev/null 2>&1 && [[ -d $DEV_DIR ]]; then
    chmod a+rx "$DEV_DIR" 2>/dev/null || true
    if ! pg_as test -x "$DEV_DIR"; then
      PG_DIR="/var/tmp/callcoach-dev-$(path_hash)/pg"
      ((NOTED_PG_DIR++)) || log "note: user $PG_OS_USER cannot reach $DEV_DIR; keeping postgres in $PG_DIR"
    fi
  fi
  PG_DATA="$PG_DIR/data"
  PG_LOG="$PG_DIR/postgres.log"
  PG_SOCK_DIR="$PG_DIR/run"
  # Unix socket paths are limited to 107 bytes.
  if ((${#PG_SOCK_DIR} + 20 > 100)); then
    PG_SOCK_DIR="/tmp/callcoach-dev-$(path_hash)"
  fi
}

# --------------------------------------------------------------- utilities --

port_in_use() {
  timeout 2 bash -c ": </dev/tcp/127.0.0.1/$1" >/dev/null 2>&1
}

# pid_alive PIDFILE NAME: the pid in PIDFILE is a live process whose command line mentions NAME.
pid_alive() {
  local pid
  [[ -s $1 ]] || return 1
  pid=$(head -n1 "$1" | tr -dc '0-9')
  [[ -n $pid ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "$2"
}

# wait_for SECONDS LOGFILE WHAT CMD...
wait_for() {
  local secs=$1 logf=$2 what=$3
  shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      printf '[dev] error: %s not ready after %ss; last lines of %s:\n' "$what" "$secs" "$logf" >&2
      tail -n 25 "$logf" >&2 2>/dev/null || true
      exit 1
    fi
    sleep 0.3
  done
}

redis_ping() { [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]; }

pg_ready() {
  if [[ -n $PG_ISREADY ]]; then
    "$PG_ISREADY" -q -h 127.0.0.1 -p "$1" -U postgres -d postgres
  else
    "$PSQL" -X -h 127.0.0.1 -p "$1" -U postgres -d postgres -tAc 'select 1'
  fi
}

lock_dev() {
  mkdir -p "$DEV_DIR"
  exec 9>"$DEV_DIR/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 120 9 || die "another deploy/dev.sh holds $DEV_DIR/.lock"
  fi
}
unlock_dev() { exec 9>&-; }

# ------------------------------------------------------------------- redis --

redis_running_port() { sed -n 's/^port \([0-9]*\)$/\1/p' "$REDIS_CONF" 2>/dev/null | head -n1; }

start_redis() {
  mkdir -p "$REDIS_DIR"
  if pid_alive "$REDIS_PID" redis-server; then
    local running
    running=$(redis_running_port)
    [[ $running == "$REDIS_PORT" ]] ||
      die "our redis already runs on port ${running:-?} (requested $REDIS_PORT); run 'deploy/dev.sh down' first"
    log "redis already running on 127.0.0.1:$REDIS_PORT (reusing)"
  else
    rm -f "$REDIS_PID"
    port_in_use "$REDIS_PORT" &&
      die "port $REDIS_PORT is in use by another process; set CALLCOACH_DEV_REDIS_PORT to a free port"
    cat >"$REDIS_CONF" <<EOF
# Written by deploy/dev.sh on every start; edits are overwritten.
port $REDIS_PORT
bind 127.0.0.1
protected-mode yes
daemonize yes
pidfile "$REDIS_PID"
logfile "$REDIS_LOG"
dir "$REDIS_DIR"
save ""
appendonly no
databases 16
EOF
    log "starting redis on 127.0.0.1:$REDIS_PORT"
    redis-server "$REDIS_CONF" 9>&- >/dev/null 2>"$REDIS_DIR/start.err" || {
      cat "$REDIS_DIR/start.err" >&2
      tail -n 25 "$REDIS_LOG" >&2 2>/dev/null || true
      die "redis-server failed to start"
    }
    rm -f "$REDIS_DIR/start.err"
    STARTED_REDIS=1
  fi
  wait_for "$WAIT_SECS" "$REDIS_LOG" "redis on port $REDIS_PORT" redis_ping "$REDIS_PORT"
}

stop_redis() {
  if ! pid_alive "$REDIS_PID" redis-server; then
    rm -f "$REDIS_PID"
    log "redis not running"
    return 0
  fi
  local pid port
  pid=$(head -n1 "$REDIS_PID" | tr -dc '0-9')
  port=$(redis_running_port)
  log "stopping redis (pid $pid)"
  redis-cli -h 127.0.0.1 -p "${port:-$REDIS_PORT}" shutdown nosave >/dev/null 2>&1 || true
  local i
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    sleep 1
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$REDIS_PID"
}

# ---------------------------------------------------------------- postgres --

# "postgres (PostgreSQL) 15.18 (Debian ...)" -> 15
pg_major() { "$PG_BIN/postgres" --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/'; }

init_pg() {
  ensure_pg_os_user
  mkdir -p "$DEV_DIR"
  resolve_pg_paths
  mkdir -p "$PG_DIR" "$PG_SOCK_DIR"
  if is_root; then
    if [[ $(stat -c %U "$PG_DIR") != "$PG_OS_USER" ]]; then
      chown -R "$PG_OS_USER:" "$PG_DIR"
    fi
    chown "$PG_OS_USER:" "$PG_SOCK_DIR"
  fi
  chmod 700 "$PG_DIR" 2>/dev/null || true
  pg_as test -w "$PG_DIR" || die "$PG_DIR is not writable by the postgres OS user"

  if [[ ! -s $PG_DATA/PG_VERSION ]]; then
    # A half-initialised cluster from an interrupted initdb is ours to remove.
    rm -rf "$PG_DATA"
    log "initdb $PG_DATA (postgres $(pg_major))"
    pg_as "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C \
      >"$DEV_DIR/initdb.log" 2>&1 || {
      tail -n 25 "$DEV_DIR/initdb.log" >&2
      die "initdb failed (full log: $DEV_DIR/initdb.log)"
    }
    printf "\n# callcoach dev settings (rewritten by deploy/dev.sh on every start)\ninclude_if_exists = 'callcoach_dev.conf'\n" |
      pg_as tee -a "$PG_DATA/postgresql.conf" >/dev/null
  fi
  local have want
  have=$(cat "$PG_DATA/PG_VERSION")
  want=$(pg_major)
  [[ $have == "$want" ]] ||
    die "$PG_DATA was made by postgres $have but the server found is $want; run 'deploy/dev.sh down && rm -rf $PG_DIR'"
}

write_pg_conf() {
  pg_as tee "$PG_DATA/callcoach_dev.conf" >/dev/null <<EOF
# Written by deploy/dev.sh on every start; edits are overwritten.
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$PG_SOCK_DIR'
fsync = on
max_connections = 300
shared_buffers = 128MB
EOF
}

pg_running() { pid_alive "$PG_DATA/postmaster.pid" postgres; }
pg_running_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null | tr -dc '0-9'; }

start_pg() {
  init_pg
  if pg_running; then
    local running
    running=$(pg_running_port)
    [[ $running == "$PG_PORT" ]] ||
      die "our postgres already runs on port ${running:-?} (requested $PG_PORT); run 'deploy/dev.sh down' first"
    log "postgres already running on 127.0.0.1:$PG_PORT (reusing)"
  else
    port_in_use "$PG_PORT" &&
      die "port $PG_PORT is in use by another process; set CALLCOACH_DEV_PG_PORT to a free port"
    write_pg_conf
    log "starting postgres on 127.0.0.1:$PG_PORT"
    pg_as "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t "$WAIT_SECS" start 9>&- >/dev/null 2>"$DEV_DIR/pg_ctl.err" || {
      cat "$DEV_DIR/pg_ctl.err" >&2
      printf '[dev] last lines of %s:\n' "$PG_LOG" >&2
      tail -n 25 "$PG_LOG" >&2 2>/dev/null || true
      die "postgres failed to start"
    }
    rm -f "$DEV_DIR/pg_ctl.err"
    STARTED_PG=1
  fi
  wait_for "$WAIT_SECS" "$PG_LOG" "postgres on port $PG_PORT" pg_ready "$PG_PORT"
  local exists
  exists=$("$PSQL" -X -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tAc \
    "select 1 from pg_database where datname = '$DB_NAME'") || die "psql could not query postgres"
  if [[ $exists != 1 ]]; then
    log "creating database $DB_NAME"
    "$PSQL" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE $DB_NAME" >&2 ||
      die "CREATE DATABASE $DB_NAME failed"
  fi
}

stop_pg() {
  resolve_pg_paths
  if ! pg_running; then
    rm -f "$PG_DATA/postmaster.pid" 2>/dev/null || true
    log "postgres not running"
    return 0
  fi
  local pid
  pid=$(head -n1 "$PG_DATA/postmaster.pid" | tr -dc '0-9')
  log "stopping postgres (pid $pid)"
  if [[ -z $PG_BIN ]]; then PG_BIN=$(find_pg_bin) || true; fi
  if [[ -n $PG_BIN ]]; then
    pg_as "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t "$WAIT_SECS" stop >/dev/null 2>&1 || true
  fi
  if kill -0 "$pid" 2>/dev/null; then
    kill -INT "$pid" 2>/dev/null || true # fast shutdown
    local i
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then kill -QUIT "$pid" 2>/dev/null || true; fi
  fi
}

# ---------------------------------------------------------------- services --

start_services() {
  lock_dev
  start_pg
  start_redis
  unlock_dev
  log "services ready: postgres 127.0.0.1:$PG_PORT, redis 127.0.0.1:$REDIS_PORT"
}

stop_services() {
  lock_dev
  stop_redis
  stop_pg
  unlock_dev
}

# For `test` and `run`: stop what this invocation started; services that were
# already running (from `deploy/dev.sh up`) are left alone.
stop_started_services() {
  set +e
  if ((STARTED_REDIS)); then stop_redis; else log "leaving redis running (started earlier; 'deploy/dev.sh down' stops it)"; fi
  if ((STARTED_PG)); then stop_pg; else log "leaving postgres running (started earlier; 'deploy/dev.sh down' stops it)"; fi
}

# ---------------------------------------------------------------------- env --

env_pairs() {
  local rust_log_default=$1
  printf 'DATABASE_URL\tpostgres://postgres@127.0.0.1:%s/%s\n' "$PG_PORT" "$DB_NAME"
  printf 'REDIS_URL\tredis://127.0.0.1:%s/0\n' "$REDIS_PORT"
  printf 'CALLCOACH_TEST_ADMIN_URL\tpostgres://postgres@127.0.0.1:%s/postgres\n' "$PG_PORT"
  printf 'REDIS_SERVER_BIN\t%s\n' "$(command -v redis-server || echo redis-server)"
  printf 'RUST_LOG\t%s\n' "${RUST_LOG:-$rust_log_default}"
}

print_env() {
  local k v
  while IFS=$'\t' read -r k v; do
    printf 'export %s=%q\n' "$k" "$v"
  done < <(env_pairs "$1")
}

export_env() {
  local k v
  while IFS=$'\t' read -r k v; do
    export "$k=$v"
  done < <(env_pairs "$1")
}

# ----------------------------------------------------------------- commands --

cmd_demo() {
  ensure_deps
  cd "$ROOT"
  local locked=()
  [[ -f Cargo.lock ]] && locked=(--locked)
  log "cargo build --release ${locked[*]}"
  cargo build --release "${locked[@]}"
  trap 'rc=$?; stop_started_services; exit $rc' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  start_services
  export_env warn
  log "running callcoach demo"
  local rc=0
  "$ROOT/target/release/callcoach" demo "$@" || rc=$?
  exit "$rc"
}

cmd_test() {
  ensure_deps
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "cargo-nextest missing: cargo install cargo-nextest --locked"
    cargo install cargo-nextest --locked
  fi
  trap 'rc=$?; stop_started_services; exit $rc' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  ensure_sdk_venv
  ensure_promtool
  ensure_chromium
  ensure_tls_certs
  start_services
  export_env warn
  # The SDK test fails (rather than skips) when this Python cannot import the SDK.
  export CALLCOACH_SDK_PYTHON="$SDK_VENV/bin/python"
  export CALLCOACH_SCHEMATHESIS="$SDK_VENV/bin/schemathesis"
  # The Procfile test fails (rather than skips) without honcho.
  export CALLCOACH_HONCHO="$SDK_VENV/bin/honcho"
  # The Redis-over-TLS test starts its own redis-server (REDIS_SERVER_BIN) with these.
  export CALLCOACH_TLS_CA_FILE="$TLS_DIR/ca.crt"
  export CALLCOACH_TLS_CERT_FILE="$TLS_DIR/server.crt"
  export CALLCOACH_TLS_KEY_FILE="$TLS_DIR/server.key"
  # The metrics tests fail (rather than skip) without this promtool.
  export CALLCOACH_PROMTOOL="$(command -v promtool)"
  # The dashboard's browser test fails (rather than skips) without this chromium.
  export CALLCOACH_CHROMIUM="$(command -v chromium)"
  cd "$ROOT"
  log "cargo nextest run --workspace --no-fail-fast $*"
  local rc=0
  cargo nextest run --workspace --no-fail-fast "$@" || rc=$?
  log "tests finished with exit code $rc"
  exit "$rc"
}

cmd_up() {
  ensure_deps
  start_services
  print_env info
  log "load the env with: eval \"\$(deploy/dev.sh env)\"; stop with: deploy/dev.sh down"
}

cmd_down() {
  stop_services
  log "services stopped"
}

cmd_run() {
  (($# > 0)) || die "usage: deploy/dev.sh run CMD [ARGS...]"
  ensure_deps
  trap 'rc=$?; stop_started_services; exit $rc' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  start_services
  export_env info
  local rc=0
  "$@" || rc=$?
  exit "$rc"
}

cmd_status() {
  resolve_pg_paths
  if pg_running; then
    log "postgres: running (pid $(head -n1 "$PG_DATA/postmaster.pid"), port $(pg_running_port), data $PG_DATA)"
  else
    log "postgres: stopped"
  fi
  if pid_alive "$REDIS_PID" redis-server; then
    log "redis: running (pid $(head -n1 "$REDIS_PID"), port $(redis_running_port))"
  else
    log "redis: stopped"
  fi
}

usage() {
  sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

main() {
  local cmd=${1:-help}
  (($# > 0)) && shift
  case $cmd in
    demo) cmd_demo "$@" ;;
    test) cmd_test "$@" ;;
    up) cmd_up ;;
    down) cmd_down ;;
    env) print_env info ;;
    run) cmd_run "$@" ;;
    status) cmd_status ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      die "unknown command '$cmd'"
      ;;
  esac
}

main "$@"
