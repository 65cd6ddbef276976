#!/usr/bin/env bash
# Run a command with what the tests need from outside Python:
#   - a throwaway PostgreSQL server on loopback, for the many-worker storage tests (exports SLIMNAS_TEST_POSTGRES_URL);
#   - Debian's chromium and chromium-driver, for the report page opened in a headless browser.
# Installs the missing Debian packages (root only). Without them (not root, no apt) the command runs anyway and
# those tests skip, except under CI.
set -euo pipefail

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

missing=()
[ -n "$(pg_bin)" ] || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${missing[*]} (Debian packages)"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
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
