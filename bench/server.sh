#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL server for benchmarks, sized so that
# the benchmark's tables fit in its shared buffers.
#
#   bench/server.sh start [PORT]   (default port 5433)
#   bench/server.sh stop
#
# The server listens on 127.0.0.1 only, trusts local connections, and keeps
# its data in BENCH_SERVER_DIR (default /tmp/reencrypt-bench-server), created
# afresh by `start` and removed by `stop`. Its settings:
#   shared_buffers  BENCH_SHARED_BUFFERS (default 4GB)
#   max_wal_size    BENCH_MAX_WAL_SIZE (default 16GB)
#   autovacuum      off, as on the default benchmark server
# Then measure with, for example:
#   BENCH_SERVER=postgres://postgres@127.0.0.1:5433 bench/run.sh 1000000 5000000
# With the tables in shared buffers, `--scan-order auto` takes key order at
# both sizes, so these figures do not compare with those of the default
# server (128 MB of shared buffers). Where /tmp is a tmpfs, the data and the
# WAL are in memory: set BENCH_SERVER_DIR to a directory on disk.
# Needs PostgreSQL's server programs (initdb, pg_ctl). Run as root, it runs
# them as the user postgres, because initdb does not run as root.
set -euo pipefail

action=${1:-}
port=${2:-5433}
dir=${BENCH_SERVER_DIR:-/tmp/reencrypt-bench-server}
usage() {
  echo "usage: $0 start [PORT] | stop" >&2
  exit 2
}
case $action in start | stop) ;; *) usage ;; esac
if [ "$action" = start ]; then
  [ "$#" -le 2 ] || usage
else
  [ "$#" -le 1 ] || usage
fi
case $port in '' | *[!0-9]*) usage ;; esac

# The newest installed server, unless pg_config names one.
bin=$(pg_config --bindir 2>/dev/null || true)
if [ ! -x "$bin/initdb" ]; then
  bin=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
[ -x "$bin/initdb" ] || { echo "error: initdb not found; install PostgreSQL's server package" >&2; exit 2; }

# Runs a command as the user postgres when this script runs as root.
as_owner() {
  if [ "$(id -u)" = 0 ]; then
    su postgres -c "$(printf '%q ' "$@")"
  else
    "$@"
  fi
}

# Shows why a start failed, then stops the server and removes its directory.
abandon() {
  echo "error: the benchmark server did not start; the end of its logs follows" >&2
  tail -n 5 "$dir/initdb.log" "$dir/server.log" >&2 2>/dev/null || true
  as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
}

case $action in
  start)
    [ ! -e "$dir" ] || { echo "error: $dir exists; run '$0 stop' first" >&2; exit 2; }
    mkdir -p "$dir"
    [ "$(id -u)" != 0 ] || chown postgres "$dir"
    # A failed start shows the server's last log lines and leaves nothing
    # behind, so that the next start can begin.
    trap abandon EXIT
    as_owner "$bin/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log"
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o \
      "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir \
       -c shared_buffers=${BENCH_SHARED_BUFFERS:-4GB} -c max_wal_size=${BENCH_MAX_WAL_SIZE:-16GB} -c autovacuum=off" \
      start >/dev/null
    trap - EXIT
    echo "started: postgres://postgres@127.0.0.1:$port (data in $dir)"
    ;;
  stop)
    [ -d "$dir/data" ] || { echo "error: no benchmark server in $dir" >&2; exit 2; }
    # A server that is not running (it failed, or the machine restarted)
    # still has its directory removed.
    as_owner "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null || true
    rm -rf "$dir"
    echo "stopped and removed $dir"
    ;;
esac
