-- The worker's own tables. Applied by the binary into its schema (default
-- "reencrypt") with search_path set to that schema, so names are unqualified.

-- One row per job: what it rotates and with which keys (fingerprints only).
CREATE TABLE jobs (
    job                   text PRIMARY KEY,
    targets               text[] NOT NULL,
    new_key_fingerprint   text NOT NULL,
    old_key_fingerprints  text[] NOT NULL,
    new_key_version       bigint,
    old_key_versions      bigint[] NOT NULL DEFAULT '{}',
    key_origins           jsonb NOT NULL DEFAULT '[]',
    shard_count           integer NOT NULL,
    writers               integer NOT NULL,
    status                text NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    finished_at           timestamptz
);

-- The single-runner guard: one lease per job and shard, renewed by a
-- heartbeat. Works through transaction-pooling proxies, unlike session locks.
CREATE TABLE leases (
    job           text NOT NULL REFERENCES jobs (job) ON DELETE CASCADE,
    shard         integer NOT NULL,
    holder        text NOT NULL,
    host          text NOT NULL,
    pid           integer NOT NULL,
    acquired_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (job, shard)
);

-- One row per key range of a target. A range covers keys in
-- (lower_key, upper_key]; NULL lower_key means from the first key. The
-- counts are updated in the same transaction as the batch they describe.
CREATE TABLE ranges (
    job             text NOT NULL REFERENCES jobs (job) ON DELETE CASCADE,
    target          text NOT NULL,
    range_index     integer NOT NULL,
    key_columns     text[] NOT NULL,
    lower_key       text[],
    upper_key       text[],
    last_key        text[],
    status          text NOT NULL DEFAULT 'pending',
    rows_estimated  bigint NOT NULL DEFAULT 0,
    rows_scanned    bigint NOT NULL DEFAULT 0,
    reencrypted     bigint NOT NULL DEFAULT 0,
    current         bigint NOT NULL DEFAULT 0,
    null_values     bigint NOT NULL DEFAULT 0,
    not_in_format   bigint NOT NULL DEFAULT 0,
    undecryptable   bigint NOT NULL DEFAULT 0,
    ambiguous       bigint NOT NULL DEFAULT 0,
    deleted         bigint NOT NULL DEFAULT 0,
    write_rejected  bigint NOT NULL DEFAULT 0,
    conflicts       bigint NOT NULL DEFAULT 0,
    batches         bigint NOT NULL DEFAULT 0,
    sweep_reencrypted bigint NOT NULL DEFAULT 0,
    started_at      timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    PRIMARY KEY (job, target, range_index)
);

-- Rows that need an operator's attention, by key (never values). A
-- one-column key is stored as its text form, a composite key as a JSON array.
CREATE TABLE attention (
    job          text NOT NULL REFERENCES jobs (job) ON DELETE CASCADE,
    target       text NOT NULL,
    key          text NOT NULL,
    outcome      text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job, target, key)
);

-- Evidence of each run and verification, for audits.
CREATE TABLE runs (
    id           bigserial PRIMARY KEY,
    job          text NOT NULL,
    command      text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    operator     text NOT NULL,
    host         text NOT NULL,
    exit_code    integer NOT NULL,
    report       jsonb NOT NULL
);
