#!/usr/bin/env bash
# Run a command with a throwaway PostgreSQL server on loopback, for the many-worker storage tests.
# Installs Debian's postgresql package when missing (root only); exports SLIMNAS_TEST_POSTGRES_URL.
# Without PostgreSQL (not root, no apt) the command runs anyway and those tests skip, except under CI.
set -euo pipefail

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(pg_bin)" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing PostgreSQL (Debian package)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
BIN=$(pg_bin)
if [ -z "$BIN" ] || ! id postgres >/dev/null 2>&1; then
  if [ "${CI:-}" = true ]; then echo "PostgreSQL is required in CI but could not be installed" >&2; exit 1; fi
  echo "PostgreSQL not available: its tests will be skipped"
  exec "$@"
fi

DATA=$(mktemp -d /tmp/slimnas-pg.XXXXXX)
PORT=${SLIMNAS_TEST_POSTGRES_PORT:-55432}
chown postgres "$DATA"
as_postgres() { su postgres -s /bin/bash -c "$*"; }
as_postgres "$BIN/initdb -D $DATA -A trust -U postgres" >/dev/null
as_postgres "$BIN/pg_ctl -D $DATA -l $DATA/server.log -w -o '-p $PORT -k $DATA -c listen_addresses=127.0.0.1' start" >/dev/null
trap 'as_postgres "$BIN/pg_ctl -D $DATA -m fast stop" >/dev/null; rm -rf "$DATA"' EXIT
as_postgres "$BIN/createdb -h 127.0.0.1 -p $PORT slimnas_test"
export SLIMNAS_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$PORT/slimnas_test"
echo "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT"
"$@"
