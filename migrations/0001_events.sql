-- The audit table. Runs with search_path set to the configured schema (AUDITFLOW_DB_SCHEMA),
-- so every name here is unqualified and lands in that schema, as does sqlx's migration history.

CREATE TABLE events (
    event_id         uuid        NOT NULL,
    occurred_at      timestamptz NOT NULL,
    tenant_id        text        NOT NULL,
    actor_id         text        NOT NULL,
    actor_type       text        NOT NULL CHECK (actor_type IN ('USER', 'SERVICE', 'SYSTEM')),
    actor_ip         text,
    actor_user_agent text,
    action           text        NOT NULL,
    resource_type    text        NOT NULL,
    resource_id      text        NOT NULL,
    outcome          text        NOT NULL CHECK (outcome IN ('SUCCESS', 'FAILURE', 'DENIED')),
    reason           text,
    trace_id         text,
    details          jsonb       CHECK (details IS NULL OR jsonb_typeof(details) = 'object'),
    session_id       text,
    -- First 16 bytes of SHA-256 over the decoded event: tells a true duplicate from an id reused
    -- with different content.
    content_hash     bytea       NOT NULL,
    schema_version   smallint,
    kafka_topic      text        NOT NULL,
    kafka_partition  integer     NOT NULL,
    kafka_offset     bigint      NOT NULL,
    kafka_timestamp  timestamptz,
    ingested_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

COMMENT ON TABLE events IS
    'Audit events written by auditflow; one partition per day, created ahead by auditflow, no default partition.';

CREATE INDEX events_tenant_time_idx ON events (tenant_id, occurred_at);
CREATE INDEX events_resource_time_idx ON events (resource_type, resource_id, occurred_at);
