-- The hash chain over committed batches (see src/chain/mod.rs): every transaction that stores
-- rows appends one link to its publisher's chain in `batches`, and every row it stores names
-- that link. Runs with search_path set to the configured schema (AUDITFLOW_DB_SCHEMA), like 0001.

-- The link: the previous link's digest (or the chain's genesis), per UTC day the number of rows
-- and a digest over them, and the link's own digest over all of that. NULL on batches written
-- before this migration.
ALTER TABLE batches
    ADD COLUMN prev_digest bytea,
    ADD COLUMN digest bytea,
    ADD COLUMN days jsonb;

-- The link a row belongs to. The sink sets both per transaction (set_config(..., true)), so the
-- COPY and the INSERT of the staging path leave them to these defaults and the rows' encoding
-- does not change. Rows stored before this migration keep NULL: they predate the chain.
ALTER TABLE events
    ADD COLUMN publisher_id integer
        DEFAULT nullif(current_setting('auditflow.publisher_id', true), '')::integer,
    ADD COLUMN batch_seq bigint
        DEFAULT nullif(current_setting('auditflow.batch_seq', true), '')::bigint;

-- How many rows existed when the chain began: `auditflow verify` accepts exactly that many rows
-- that name no link, and reports them.
CREATE TABLE chain_meta (
    started_at timestamptz NOT NULL DEFAULT now(),
    rows_before_chain bigint NOT NULL
);

COMMENT ON COLUMN batches.digest IS
    'Hash chain link: SHA-256 over (publisher, batch_seq, prev_digest, days); see auditflow verify.';
COMMENT ON COLUMN batches.days IS
    '[{"day": "YYYY-MM-DD", "rows": n, "digest": hex}]: per UTC day, the rows this link stored and a digest over them.';
COMMENT ON TABLE chain_meta IS
    'When the hash chain began and how many rows were stored before it (they name no link).';

-- Partitions detached by retention (or restored from a dump of one) are not partitions now, so
-- the ALTER above did not reach them; give them the columns, so that `auditflow partitions
-- restore` can attach them again. Their rows predate the chain: NULL.
DO $$
DECLARE
    detached regclass;
BEGIN
    FOR detached IN
        SELECT c.oid::regclass
        FROM pg_class c
        JOIN partition_lifecycle l ON c.relname IN (l.partition_name, l.retired_name)
        WHERE c.relnamespace = current_schema()::regnamespace
          AND c.relkind = 'r'
          AND NOT c.relispartition
          AND NOT EXISTS (
              SELECT 1 FROM pg_attribute a
              WHERE a.attrelid = c.oid AND a.attname = 'publisher_id' AND NOT a.attisdropped)
    LOOP
        EXECUTE format('ALTER TABLE %s ADD COLUMN publisher_id integer, ADD COLUMN batch_seq bigint',
                       detached);
    END LOOP;
END
$$;

-- The rows stored so far: in `events` and in the retired tables `auditflow verify` reads.
DO $$
DECLARE
    retired regclass;
    n bigint;
    total bigint;
BEGIN
    SELECT count(*) INTO total FROM events;
    FOR retired IN
        SELECT c.oid::regclass
        FROM pg_class c
        WHERE c.relnamespace = current_schema()::regnamespace
          AND c.relkind = 'r'
          AND NOT c.relispartition
          AND c.relname LIKE 'retired\_events\_p%'
    LOOP
        EXECUTE format('SELECT count(*) FROM %s', retired) INTO n;
        total := total + n;
    END LOOP;
    INSERT INTO chain_meta (rows_before_chain) VALUES (total);
END
$$;
