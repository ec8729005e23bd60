#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the ledger tests.
#
#   scripts/start-test-postgres.sh        start one (or reuse the one it started) and
#                                         print its URL on stdout, nothing else
#   scripts/start-test-postgres.sh stop   stop it and delete its data
#
# Idempotent. As root it installs Debian's postgresql package when no server
# binaries are found, and runs the server as the postgres user (initdb refuses
# root). The cluster lives in $TRAINGUARD_PG_STATE (default
# /tmp/trainguard-test-postgres) with a random password, listens on 127.0.0.1
# only, on a free port, and has one database, trainguard_test.
set -euo pipefail

STATE=${TRAINGUARD_PG_STATE:-/tmp/trainguard-test-postgres}
DATA=$STATE/data
DB=trainguard_test
ROLE=trainguard

log() { echo "start-test-postgres: $*" >&2; }

as_server_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

find_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
      return 0
    fi
  done
  dir=$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")
  if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
    echo "$dir"
    return 0
  fi
  return 1
}

# pg_ctl status alone is fooled by a killed server whose zombie nobody reaped
# (containers without an init), so the server must also answer.
running() {
  [ -f "$STATE/url" ] && [ -f "$STATE/port" ] && [ -d "$DATA" ] \
    && as_server_user "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1 \
    && "$BIN/pg_isready" -q -h 127.0.0.1 -p "$(cat "$STATE/port")" -t 5
}

stop() {
  if [ -d "$DATA" ] && as_server_user "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_server_user "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 30 stop >&2 \
      || log "the server did not stop cleanly; removing its data anyway"
  fi
  rm -rf "$STATE"
}

if ! BIN=$(find_bindir); then
  if [ "$(id -u)" -ne 0 ]; then
    log "no PostgreSQL server binaries (initdb, pg_ctl) found; install Debian's postgresql package"
    exit 1
  fi
  log "installing Debian's postgresql package"
  apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2
  BIN=$(find_bindir) || { log "postgresql installed but initdb not found"; exit 1; }
fi

if [ "${1:-start}" = "stop" ]; then
  stop
  log "stopped"
  exit 0
elif [ "${1:-start}" != "start" ]; then
  log "usage: $0 [start|stop]"
  exit 2
fi

if running; then
  log "reusing the server in $STATE"
  cat "$STATE/url"
  exit 0
fi
stop  # whatever a killed earlier run left behind

mkdir -p "$STATE"
chmod 700 "$STATE"
umask 077
PASSWORD=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
printf '%s\n' "$PASSWORD" >"$STATE/pwfile"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
if [ "$(id -u)" -eq 0 ]; then
  chown -R postgres: "$STATE"
fi

log "initdb in $DATA"
as_server_user "$BIN/initdb" -D "$DATA" -U "$ROLE" --pwfile="$STATE/pwfile" \
  --auth=scram-sha-256 --encoding=UTF8 --no-locale >"$STATE/initdb.log" 2>&1 \
  || { cat "$STATE/initdb.log" >&2; exit 1; }
rm -f "$STATE/pwfile"

log "starting on 127.0.0.1:$PORT"
as_server_user "$BIN/pg_ctl" -D "$DATA" -l "$STATE/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$STATE" \
  start >&2 || { cat "$STATE/server.log" >&2; exit 1; }

PGPASSWORD=$PASSWORD "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U "$ROLE" "$DB"
printf '%s\n' "$PORT" >"$STATE/port"
URL="postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
printf '%s\n' "$URL" >"$STATE/url"
echo "$URL"
