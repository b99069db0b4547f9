#!/bin/sh
# Writes the demo's two keys to OpenBao as KV v2 versions of one secret:
# version 1 is the old key and version 2 the new key, the state that step 1
# of docs/runbook.md leaves behind. Runs in the openbao image with BAO_ADDR
# and BAO_TOKEN set by compose.yaml.
#
# The keys are also kept as files old-key and new-key in the seed-data volume
# (SEED_DATA_DIR, /seed-data by default). A restarted dev server loses
# everything, and these files give it the same keys back, so they still match
# the rows that seed-db encrypted. The plaintext key files exist only because
# this is a throwaway demo.
set -eu

mount=secret
path=agentidp/encryption-key
field=encryptionKey
data_dir="${SEED_DATA_DIR:-/seed-data}"

if bao kv get -mount="$mount" -version=2 "$path" >/dev/null 2>&1; then
    echo "seed-keys: $mount/$path already has versions 1 and 2; nothing to do"
    exit 0
fi

umask 077
for name in old-key new-key; do
    if [ ! -s "$data_dir/$name" ]; then
        # 32 random bytes as 64 lowercase hex characters, without a newline,
        # because `field=@file` stores the file's bytes as they are.
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$data_dir/$name"
        echo "seed-keys: generated $data_dir/$name"
    fi
done

# A half-written secret (one version only) would shift the version numbers, so
# start from no versions at all.
bao kv metadata delete -mount="$mount" "$path" >/dev/null 2>&1 || true

bao kv put -mount="$mount" "$path" "$field=@$data_dir/old-key" >/dev/null
bao kv put -mount="$mount" "$path" "$field=@$data_dir/new-key" >/dev/null
echo "seed-keys: wrote $mount/$path field $field: version 1 (old key), version 2 (new key)"
