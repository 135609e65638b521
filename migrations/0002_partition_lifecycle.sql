-- Partition lifecycle bookkeeping and legal holds. Runs with search_path set to the configured
-- schema (AUDITFLOW_DB_SCHEMA), like 0001.

-- One row per partition auditflow has retired (and possibly restored or dropped since). Retiring
-- detaches a partition and renames it `retired_<name>` in the same schema, rows kept; this table
-- remembers its range, so it can be restored (re-attached with the same bounds) and dropped once
-- the grace period is over. Rows of dropped partitions stay as the record of what was dropped.
CREATE TABLE partition_lifecycle (
    -- The name while attached, e.g. events_p20250101; names come from dates only.
    partition_name text        PRIMARY KEY,
    -- The name while retired: 'retired_' || partition_name.
    retired_name   text        NOT NULL UNIQUE CHECK (retired_name = 'retired_' || partition_name),
    range_from     timestamptz NOT NULL,
    range_to       timestamptz NOT NULL,
    -- retiring: recorded, detach not finished (maintenance finishes it); retired: detached and
    -- renamed; restored: attached again under partition_name; dropped: gone.
    state          text        NOT NULL CHECK (state IN ('retiring', 'retired', 'restored', 'dropped')),
    -- The maintenance clock when the retirement started; the grace period counts from here.
    retired_at     timestamptz NOT NULL,
    restored_at    timestamptz,
    dropped_at     timestamptz,
    CHECK (range_from < range_to)
);

-- A legal hold on a time range: while it is not released, no partition overlapping the range
-- is retired or dropped. Holds are never deleted, only released.
CREATE TABLE legal_holds (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    range_from  timestamptz NOT NULL,
    range_to    timestamptz NOT NULL,
    reason      text        NOT NULL CHECK (btrim(reason) <> ''),
    created_at  timestamptz NOT NULL DEFAULT now(),
    created_by  text        NOT NULL DEFAULT current_user,
    released_at timestamptz,
    released_by text,
    CHECK (range_from < range_to)
);

CREATE INDEX legal_holds_active_idx ON legal_holds (range_from, range_to) WHERE released_at IS NULL;

COMMENT ON TABLE events IS
    'Audit events written by auditflow; one partition per day, week or month (AUDITFLOW_PARTITION_INTERVAL), created ahead and retired by auditflow, no default partition.';
