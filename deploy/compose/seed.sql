-- Demo data for compose.yaml: a table whose client_secret values are
-- encrypted under the old key the way the application encrypts them,
-- base64(iv) ':' base64(AES-256-CBC with PKCS#7 padding), with a random
-- 16-byte IV per value. Every 50th row is NULL.
--
-- psql variables: key_file (file holding the old key as 64 hex characters)
-- and row_count. Run by seed-db.sh.
--
-- The key reaches the server inside this script's SQL, so a server that logs
-- statements would log it. Acceptable for the throwaway demo database only.

\set ON_ERROR_STOP on
\set old_key `cat :'key_file'`

CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TABLE IF NOT EXISTS public.credentials (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_secret text
);

-- Only an empty table is filled, so a second `docker compose up` adds no rows
-- and never mixes in values under the keys of another seed run.
-- encode(..., 'base64') breaks lines every 76 characters, which translate()
-- removes to give the canonical single-line form.
INSERT INTO public.credentials (client_secret)
SELECT CASE
           WHEN source.n % 50 = 0 THEN NULL
           ELSE encode(source.iv, 'base64') || ':' ||
                translate(
                    encode(
                        encrypt_iv(convert_to(source.plaintext, 'UTF8'),
                                   decode(:'old_key', 'hex'),
                                   source.iv,
                                   'aes-cbc/pad:pkcs'),
                        'base64'),
                    E'\n', '')
       END
FROM (
    SELECT n,
           gen_random_bytes(16) AS iv,
           'demo-client-secret-' || encode(gen_random_bytes(24), 'hex') AS plaintext
    FROM generate_series(1, :row_count) AS n
) AS source
WHERE NOT EXISTS (SELECT 1 FROM public.credentials);

-- Fresh statistics give reencrypt an accurate row estimate for its progress.
ANALYZE public.credentials;

SELECT count(*) AS rows, count(client_secret) AS encrypted_values
FROM public.credentials;
