#!/usr/bin/env bash
# Run a command with what the tests need from outside Python:
#   - a throwaway PostgreSQL server on loopback, for the many-worker storage tests (exports SLIMNAS_TEST_POSTGRES_URL);
#   - Debian's chromium and chromium-driver, for the report page opened in a headless browser.
# Installs the missing Debian packages (root only). Without them (not root, no apt) the command runs anyway and
# those tests skip, except under CI.
# The server listens on the first free port from 55432 to 55451 (SLIMNAS_TEST_POSTGRES_PORT: that port only), so
# runs side by side do not collide; a server a killed run left behind (its script gone) is stopped and removed.
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
as_postgres() { su postgres -s /bin/bash -c "$*"; }

# Each run's folder holds its script's pid (owner) and the server's data (data/). A folder whose owner is gone is
# what a killed run left: its server is stopped and the folder removed. Runs still going are left alone.
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }  # not a zombie
for stale in /tmp/slimnas-pg.*; do
  owner=$(cat "$stale/owner" 2>/dev/null || true)
  if [ -z "$owner" ] || alive "$owner"; then continue; fi
  if [ -f "$stale/data/postmaster.pid" ]; then
    as_postgres "$BIN/pg_ctl -D $stale/data -m immediate stop" >/dev/null 2>&1 || true
  fi
  rm -rf "$stale"
done

RUN=$(mktemp -d /tmp/slimnas-pg.XXXXXX)
echo $$ >"$RUN/owner"
chmod 755 "$RUN"
DATA=$RUN/data
trap 'as_postgres "$BIN/pg_ctl -D $DATA -m fast stop" >/dev/null 2>&1 || true; rm -rf "$RUN"' EXIT
trap 'exit 130' INT TERM HUP  # the EXIT trap stops the server on Ctrl-C and kill too
mkdir "$DATA" && chown postgres "$DATA"
as_postgres "$BIN/initdb -D $DATA -A trust -U postgres" >/dev/null
start() {
  local options="-p $1 -k $DATA -c listen_addresses=127.0.0.1 -c max_connections=300"
  as_postgres "$BIN/pg_ctl -D $DATA -l $DATA/server.log -w -o '$options' start" >/dev/null
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=
for port in ${SLIMNAS_TEST_POSTGRES_PORT:-$(seq 55432 55451)}; do
  if ! listening "$port" && start "$port"; then PORT=$port; break; fi  # a run starting beside this one may win a port
done
if [ -z "$PORT" ]; then
  echo "PostgreSQL could not start on a free port: $(tail -n 1 "$DATA/server.log" 2>/dev/null)" >&2
  exit 1
fi
as_postgres "$BIN/createdb -h 127.0.0.1 -p $PORT slimnas_test"
export SLIMNAS_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$PORT/slimnas_test"
echo "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT"
"$@"
