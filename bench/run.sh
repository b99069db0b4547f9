#!/usr/bin/env bash
# Measures `reencrypt run` against the floor of a plain UPDATE on one synthetic table.
#
#   bench/run.sh [ROWS ...]        (default 1000000)
#
# Given several sizes, it measures them in turn in one invocation, and ends
# with each setting's rows/s at every size as a share of the first size's.
#
# Builds a `credentials` table shaped like the application's (uuid key, a
# client_secret of about 113 characters encrypted under a random old key
# with pgcrypto) in the database reencrypt_bench, created if missing. Then, each
# time on a fresh copy of the table after VACUUM ANALYZE and CHECKPOINT:
#   1. the floor: one `UPDATE credentials SET client_secret = client_secret || ''`;
#   2. the release binary (or each of BENCH_BINARIES), once per scan order in
#      BENCH_ORDERS and writer count in BENCH_WRITERS;
# and prints rows/s, the ratio to the floor, the time spent before the first
# range, in the keyset pass and in the final sweep, batch latency percentiles,
# the pass's rows/s in each fifth of its rows, peak RSS, and how many updates
# were HOT (added no index entry). Each product run is checked: every row
# must read under the new key.
#
# Environment:
#   BENCH_SERVER   server URL without a database (default postgres://postgres@127.0.0.1:5432)
#   BENCH_WRITERS  --writers values to measure, e.g. "auto 1 2 4" (default 1)
#   BENCH_ORDERS   --scan-order values to measure, e.g. "auto key physical" (default key)
#   BENCH_ARGS     extra arguments for every product run, e.g. "--max-sweeps 0"
#   BENCH_KEEP     directory to keep logs and summaries in (default: a temporary one)
#   BENCH_NO_BUILD set to 1 to measure target/release/reencrypt as it is
#   BENCH_BINARIES paths of other builds to measure instead of the release
#                  binary, each in turn after the same floor, for a side by side
#                  comparison in one run (implies BENCH_NO_BUILD=1)
#   BENCH_ROUNDS   how many times to measure each size, the floor first each
#                  time (default 1). With more than one, the summary gives each
#                  setting's median rows/s and median ratio to its round's floor.
# Needs psql, openssl, python3, cargo and GNU time (/usr/bin/time, Debian package `time`),
# and PostgreSQL 14 or later (pg_stat_wal) with a superuser, because each
# measurement resets the server's shared statistics (pg_stat_reset_shared).
set -euo pipefail

usage() {
  echo "usage: $0 [ROWS ...], each a positive whole number" >&2
  exit 2
}
sizes=()
for size in "${@:-1000000}"; do
  case $size in '' | *[!0-9]*) usage ;; esac
  size=$((10#$size))
  [ "$size" -gt 0 ] || usage
  case " ${sizes[*]} " in *" $size "*) echo "error: the size $size is given twice" >&2; exit 2 ;; esac
  sizes+=("$size")
done
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
server=${BENCH_SERVER:-postgres://postgres@127.0.0.1:5432}
url="$server/reencrypt_bench"
binaries=("$repo/target/release/reencrypt")
if [ -n "${BENCH_BINARIES:-}" ]; then
  read -r -a binaries <<<"$BENCH_BINARIES"
fi
build=1
[ "${BENCH_NO_BUILD:-0}" != 1 ] && [ -z "${BENCH_BINARIES:-}" ] || build=0
if [ "$build" = 0 ]; then
  for binary in "${binaries[@]}"; do
    [ -f "$binary" ] && [ -x "$binary" ] || { echo "error: $binary is not an executable file; check BENCH_BINARIES" >&2; exit 2; }
  done
fi
# The settings are checked before the tables are built.
seen=" "
for order in ${BENCH_ORDERS:-key}; do
  case $order in auto | key | physical) ;; *) echo "error: BENCH_ORDERS lists '$order'; use auto, key or physical" >&2; exit 2 ;; esac
  case $seen in *" $order "*) echo "error: BENCH_ORDERS lists '$order' twice" >&2; exit 2 ;; esac
  seen+="$order "
done
seen=" "
for writers in ${BENCH_WRITERS:-1}; do
  case $writers in auto) ;; '' | *[!0-9]* | 0*) echo "error: BENCH_WRITERS lists '$writers'; use auto or whole numbers from 1" >&2; exit 2 ;; esac
  case $seen in *" $writers "*) echo "error: BENCH_WRITERS lists '$writers' twice" >&2; exit 2 ;; esac
  seen+="$writers "
done

rounds=${BENCH_ROUNDS:-1}
case $rounds in '' | *[!0-9]* | 0*) echo "error: invalid BENCH_ROUNDS '$rounds'; use a whole number of 1 or more" >&2; exit 2 ;; esac

tools=(psql openssl python3 /usr/bin/time)
[ "$build" = 0 ] || tools+=(cargo)
for tool in "${tools[@]}"; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (see the header of $0)" >&2; exit 2; }
done

work=${BENCH_KEEP:-$(mktemp -d)}
mkdir -p "$work"
[ -n "${BENCH_KEEP:-}" ] || trap 'rm -rf "$work"' EXIT
openssl rand -hex 32 >"$work/old.key"
openssl rand -hex 32 >"$work/new.key"
old_key=$(cat "$work/old.key")
new_key=$(cat "$work/new.key")

if [ "$build" = 1 ]; then
  echo "building the release binary"
  (cd "$repo" && cargo build --release --quiet)
fi
export PGOPTIONS="-c client_min_messages=warning"

psql -qAt "$server/postgres" -c "SELECT 1" >/dev/null || {
  echo "error: cannot connect to $server/postgres; check BENCH_SERVER (a server URL without a database or trailing slash)" >&2
  exit 2
}
psql -qAt "$server/postgres" -c "SELECT 1 FROM pg_database WHERE datname = 'reencrypt_bench'" | grep -q 1 ||
  psql -q "$server/postgres" -c "CREATE DATABASE reencrypt_bench"

echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)," \
  "$(psql -qAt "$url" -c "SHOW server_version"), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "server $server: shared_buffers $(psql -qAt "$url" -c "SHOW shared_buffers"), max_wal_size $(psql -qAt "$url" -c "SHOW max_wal_size")"

# Builds the template table of `rows` rows. It is encrypted once, and each
# measurement starts from a copy of it, because copying is much faster than
# encrypting again.
template() {
  echo "building the template table: $rows rows"
  psql -q -v ON_ERROR_STOP=1 "$url" -v rows="$rows" -v oldkey="$old_key" <<'SQL'
CREATE EXTENSION IF NOT EXISTS pgcrypto;
DROP TABLE IF EXISTS credentials_template;
CREATE TABLE credentials_template (
  id uuid PRIMARY KEY,
  agent_id uuid NOT NULL,
  client_secret text NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now()
);
-- 'sk_live_' and 48 hex characters, stored as base64(IV):base64(ciphertext),
-- about 100 characters, as the application writes them.
INSERT INTO credentials_template (id, agent_id, client_secret)
SELECT gen_random_uuid(), gen_random_uuid(),
       replace(encode(iv, 'base64'), E'\n', '') || ':' ||
       replace(encode(encrypt_iv(convert_to('sk_live_' || encode(gen_random_bytes(24), 'hex'), 'UTF8'),
                                 decode(:'oldkey', 'hex'), iv, 'aes-cbc/pad:pkcs'), 'base64'), E'\n', '')
FROM (SELECT gen_random_bytes(16) AS iv FROM generate_series(1, :rows)) AS s;
SQL
}

# Replaces `credentials` with a copy of the template and drops the checkpoint
# schema, so that each run starts a new job.
fresh() {
  psql -q -v ON_ERROR_STOP=1 "$url" >/dev/null <<'SQL' || return 1
DROP SCHEMA IF EXISTS reencrypt CASCADE;
DROP TABLE IF EXISTS credentials;
CREATE TABLE credentials (LIKE credentials_template INCLUDING ALL);
INSERT INTO credentials SELECT * FROM credentials_template;
SQL
  psql -q -v ON_ERROR_STOP=1 "$url" -c "VACUUM ANALYZE credentials" -c "CHECKPOINT" \
    -c "SELECT $reset_statistics" >/dev/null
}

# PostgreSQL 17 moved the checkpoint counts to pg_stat_checkpointer and the
# writes by backends to pg_stat_io.
# NOTE: that branch has not been run: the benchmarks here ran on PostgreSQL 15.
if [ "$(psql -qAt "$server/postgres" -c "SHOW server_version_num")" -ge 170000 ]; then
  reset_statistics="pg_stat_reset_shared('wal'), pg_stat_reset_shared('checkpointer'), pg_stat_reset_shared('io')"
  statistics="SELECT w.wal_bytes, w.wal_fpi, c.num_timed + c.num_requested,
      (SELECT coalesce(sum(writes), 0) FROM pg_stat_io WHERE backend_type = 'client backend')
    FROM pg_stat_wal AS w, pg_stat_checkpointer AS c"
else
  reset_statistics="pg_stat_reset_shared('wal'), pg_stat_reset_shared('bgwriter')"
  statistics="SELECT w.wal_bytes, w.wal_fpi, b.checkpoints_timed + b.checkpoints_req, b.buffers_backend
    FROM pg_stat_wal AS w, pg_stat_bgwriter AS b"
fi

# Prints the WAL, full-page images, checkpoints and buffers written by
# backends since `fresh`.
wal_figures() {
  psql -qAt -F ' ' "$url" -c "$statistics" |
    while read -r bytes fpi checkpoints backend; do
      printf '  WAL: %.0f MB, %.2f full-page images per row; checkpoints: %d; buffers written by backends: %d\n' \
        "$(python3 -c "print($bytes / 1e6)")" "$(python3 -c "print($fpi / $rows)")" "$checkpoints" "$backend"
    done
}

# Waits up to 10 s for the product's sessions to end, so that the server
# has their statistics.
wait_for_product_sessions() {
  local _
  for _ in $(seq 1 100); do
    [ "$(psql -qAt "$url" -c "SELECT count(*) FROM pg_stat_activity
      WHERE datname = current_database() AND application_name = 'reencrypt'")" = 0 ] && return 0
    sleep 0.1
  done
  echo "warning: the product's sessions were still open after 10 s; its WAL and write figures may be incomplete" >&2
}

# Records a failed run of a setting, which the cross-size table shows as failed.
record_failure() {
  local binary=$1 order=$2 writers=$3
  printf '%s\t%s\t%s\t%s\tfailed\t%s\t-\n' "$rows" "$binary" "$order" "$writers" "$floor_rate" >>"$work/rates.tsv"
}

now() { date +%s.%N; }

# Prints the machine's busy and total CPU time so far, in clock ticks,
# from the first line of /proc/stat: user, nice, system, idle, I/O wait,
# interrupts and steal. Busy is the time spent in user, nice, system and
# interrupts. The guest fields after them are already counted in user and nice.
cpu_ticks() {
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat
}

# The CPUs that /proc/stat counts.
cpus=$(grep -c '^cpu[0-9]' /proc/stat)

# Prints the share of the machine's CPU time that was busy between two
# readings of cpu_ticks, with every process on the machine counted.
busy_share() {
  local busy_before total_before busy_after total_after
  read -r busy_before total_before <<<"$1"
  read -r busy_after total_after <<<"$2"
  python3 -c "print(f'{100 * ($busy_after - $busy_before) / max($total_after - $total_before, 1):.0f}%')"
}
rate() { python3 -c "print(round($rows / ($2 - $1)))"; }

# Counts the rows whose client_secret decrypts under the new key to the
# template's plaintext pattern. pgcrypto raises an error for a value that
# does not decrypt, so each value is tried on its own.
readable_under_new() {
  psql -qAt -v ON_ERROR_STOP=1 "$url" <<SQL
CREATE FUNCTION pg_temp.reads_under_new(value text) RETURNS boolean LANGUAGE plpgsql AS \$\$
BEGIN
  RETURN convert_from(decrypt_iv(decode(split_part(value, ':', 2), 'base64'), decode('$new_key', 'hex'),
         decode(split_part(value, ':', 1), 'base64'), 'aes-cbc/pad:pkcs'), 'UTF8') LIKE 'sk_live_%';
EXCEPTION WHEN others THEN
  RETURN false;
END
\$\$;
SELECT count(*) FROM credentials WHERE pg_temp.reads_under_new(client_secret);
SQL
}

# Measures the floor on a fresh copy of the template and sets floor_rate.
floor() {
  fresh || return 1
  local start end ticks_before ticks_after
  ticks_before=$(cpu_ticks)
  start=$(now)
  psql -q -v ON_ERROR_STOP=1 "$url" -c "UPDATE credentials SET client_secret = client_secret || ''" || return 1
  end=$(now)
  ticks_after=$(cpu_ticks)
  floor_rate=$(rate "$start" "$end")
  printf 'floor: one UPDATE over %d rows: %.2f s, %d rows/s\n' "$rows" "$(python3 -c "print($end - $start)")" "$floor_rate"
  echo "  machine CPU busy: $(busy_share "$ticks_before" "$ticks_after") of $cpus CPUs"
  wal_figures
  printf '%s\tfloor\t-\t-\t%s\t%s\t-\n' "$rows" "$floor_rate" "$floor_rate" >>"$work/rates.tsv"
}

# Runs a build of the product with the given scan order and writer count and prints its figures.
measure() {
  local binary=$1 order=$2 writers=$3 n=$4
  local name="$work/$rows-$n-$order-$writers"
  local log="$name.log" summary="$name.json" timing="$name.time"
  if ! fresh; then
    echo "error: could not copy the template table" >&2
    record_failure "$binary" "$order" "$writers"
    return 1
  fi
  local start end code=0 ticks_before ticks_after
  ticks_before=$(cpu_ticks)
  start=$(now)
  # shellcheck disable=SC2086 # BENCH_ARGS is a list of arguments.
  RUST_LOG=info,sqlx=warn,reencrypt::pipeline=debug /usr/bin/time -v -o "$timing" \
    "$binary" --log-format json run \
    --database-url "$url" --target credentials.client_secret \
    --old-key-file "$work/old.key" --new-key-file "$work/new.key" \
    --metrics-listen off --progress off --format json --scan-order "$order" --writers "$writers" ${BENCH_ARGS:-} \
    >"$summary" 2>"$log" || code=$?
  end=$(now)
  ticks_after=$(cpu_ticks)
  if [ "$code" -ne 0 ]; then
    echo "error: $binary, $order order, $writers writer(s), $rows rows: the product exited with $code." \
      "The end of its log follows, and BENCH_KEEP=DIR keeps the whole log." >&2
    tail -5 "$log" >&2
    record_failure "$binary" "$order" "$writers"
    return 1
  fi
  local product_rate readable chosen chosen_writers
  product_rate=$(rate "$start" "$end")
  # The order and writers the run took, which `auto` chooses by the table's size.
  log_field() {
    python3 -c 'import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    if sys.argv[2] in line:
        print(json.loads(line).get(sys.argv[3], "?"))
        break
else:
    print("?")' "$log" "$1" "$2"
  }
  chosen=$(log_field "Scan order." order)
  chosen_writers=$(log_field "Job started." writers)
  wait_for_product_sessions
  # Read before the check below, whose scan of the table writes too.
  local figures
  figures=$(wal_figures)
  readable=$(readable_under_new) || readable=""
  if [ -z "$readable" ]; then
    echo "error: $binary, $order order, $writers writer(s), $rows rows: could not count the rows readable under the new key" >&2
    record_failure "$binary" "$order" "$writers"
    return 1
  fi
  printf 'product %s, %s order (%s), %s writer(s) (%s): %.2f s, %d rows/s, %.2f x the floor, rows readable under the new key: %d of %d\n' \
    "$binary" "$order" "$chosen" "$writers" "$chosen_writers" "$(python3 -c "print($end - $start)")" "$product_rate" \
    "$(python3 -c "print($product_rate / $floor_rate)")" "$readable" "$rows"
  python3 "$here/batch_stats.py" "$log" "$start" "$end" "$timing"
  echo "  machine CPU busy: $(busy_share "$ticks_before" "$ticks_after") of $cpus CPUs"
  psql -qAt -F ' ' "$url" -c "SELECT n_tup_upd, n_tup_hot_upd, pg_size_pretty(pg_table_size('credentials'))
    FROM pg_stat_user_tables WHERE relid = 'credentials'::regclass" |
    while read -r updates hot size; do
      printf '  updates: %d, HOT: %d (%.0f%%), table after the run: %s\n' "$updates" "$hot" \
        "$(python3 -c "print(100 * $hot / max($updates, 1))")" "$size"
    done
  echo "$figures"
  if [ "$readable" -ne "$rows" ]; then
    echo "error: $binary, $order order, $writers writer(s): $((rows - readable)) of $rows rows do not read under the new key" >&2
    record_failure "$binary" "$order" "$writers"
    return 1
  fi
  # For `--writers auto`, the count taken goes with the order, since it may
  # differ between sizes.
  [ "$writers" != auto ] || chosen="$chosen, $chosen_writers writer(s)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rows" "$binary" "$order" "$writers" "$product_rate" "$floor_rate" "$chosen" >>"$work/rates.tsv"
}

failed=0
: >"$work/rates.tsv"
for rows in "${sizes[@]}"; do
  if ! template; then
    echo "error: could not build the template table at $rows rows; going on with the next size" >&2
    failed=1
    continue
  fi
  for round in $(seq 1 "$rounds"); do
    [ "$rounds" = 1 ] || echo "round $round of $rounds at $rows rows"
    if ! floor; then
      echo "error: could not measure the floor at $rows rows; going on with the next round" >&2
      failed=1
      # The round's runs count as failed, with no floor to compare them with.
      floor_rate=0
      printf '%s\tfloor\t-\t-\tfailed\t0\t-\n' "$rows" >>"$work/rates.tsv"
      for order in ${BENCH_ORDERS:-key}; do
        for writers in ${BENCH_WRITERS:-1}; do
          for binary in "${binaries[@]}"; do
            record_failure "$binary" "$order" "$writers"
          done
        done
      done
      continue
    fi
    for order in ${BENCH_ORDERS:-key}; do
      for writers in ${BENCH_WRITERS:-1}; do
        n=0
        for binary in "${binaries[@]}"; do
          n=$((n + 1))
          measure "$binary" "$order" "$writers" "$n-$round" || failed=1
        done
      done
    done
  done
done
python3 "$here/across_sizes.py" "$work/rates.tsv"
exit "$failed"
