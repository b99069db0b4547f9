#!/bin/sh
# Creates and fills the demo table public.credentials under the old key.
# Runs in the postgres image with PGHOST, PGUSER, PGPASSWORD, PGDATABASE and
# SEED_ROWS set by compose.yaml. The old key comes from the seed-data volume,
# where seed-keys.sh wrote it.
set -eu

key_file=/seed-data/old-key
if [ ! -s "$key_file" ]; then
    echo "seed-db: $key_file is missing or empty. Run the seed-keys service first." >&2
    exit 1
fi

# seed.sql reads the key file itself, so the key never appears in a command line.
exec psql --no-psqlrc --set ON_ERROR_STOP=1 \
    --set key_file="$key_file" \
    --set row_count="${SEED_ROWS:-10000}" \
    --file /seed/seed.sql
