-- The committed-batch log: one row per sink transaction that stored rows, written in that same
-- transaction, so the table says exactly what was committed. Readers of the audit table (`auditflow
-- serve`) reconcile the invalidation messages they received against it: a batch here that no
-- message announced was missed, and what it touched is flushed. Runs with search_path set to the
-- configured schema (AUDITFLOW_DB_SCHEMA), like 0001.

-- One row per sink process start (per store stream): the epoch named `publisher` in the
-- invalidation messages.
CREATE TABLE publishers (
    publisher_id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    publisher uuid NOT NULL UNIQUE,           -- the epoch in the messages
    instance text NOT NULL,                    -- AUDITFLOW_INSTANCE_ID
    started_at timestamptz NOT NULL DEFAULT now()
);

-- batch_seq is gapless per publisher: the store takes max + 1 inside the batch's transaction,
-- so a rolled-back or unknown-outcome commit never leaves a hole, and a hole in the sequence of
-- messages a reader received always means a lost message.
CREATE TABLE batches (
    publisher_id integer NOT NULL REFERENCES publishers,
    batch_seq bigint NOT NULL,
    committed_at timestamptz NOT NULL DEFAULT statement_timestamp(),
    row_count integer NOT NULL,
    summary jsonb NOT NULL,                    -- per tenant: from, to, count; truncated flag
    PRIMARY KEY (publisher_id, batch_seq)
);

-- Reconciliation reads the recent tail by time. A btree, not BRIN: committed_at is only roughly
-- ordered across concurrent replicas, and the table is small (one row per batch of up to
-- thousands of events).
CREATE INDEX batches_committed_at ON batches (committed_at);

COMMENT ON TABLE publishers IS
    'One row per auditflow sink process start: the publisher epoch of its invalidation messages.';
COMMENT ON TABLE batches IS
    'One row per committed sink transaction that stored rows, written in that transaction; readers reconcile invalidations against it.';
COMMENT ON COLUMN batches.summary IS
    '{"tenants": {"<tenant>": {"from": RFC 3339, "to": RFC 3339, "count": n}}, "truncated": bool}; truncated: the tenant list was cut, so the batch may touch any tenant.';
