-- The writer schema's id, wide enough for schema registry ids (up to 2^31-1; `schema_version`
-- is a smallint). Runs with search_path set to the configured schema (AUDITFLOW_DB_SCHEMA).
--
-- A nullable column without a default: PostgreSQL adds it to `events` and every attached
-- partition as a catalog change only, no table rewrite, and existing rows read NULL.
--
--   writer_schema_id: the Confluent schema id the producer wrote: the registry's id when
--                     AUDITFLOW_SCHEMA_REGISTRY_URL is set, else the schemas/ file version.
--                     NULL in rows stored before this migration.
--   schema_version:   the schemas/ file version (audit_event.vN.avsc), as before; NULL when the
--                     schema came from a registry, since registry ids are not versions.
--
-- So COALESCE(writer_schema_id, schema_version) is the writer's id for every row.
ALTER TABLE events ADD COLUMN writer_schema_id bigint;

COMMENT ON COLUMN events.writer_schema_id IS
    'Confluent schema id the producer wrote: the schema registry id, or the schemas/ file version without a registry; NULL in rows stored before migration 0003 (see schema_version).';
COMMENT ON COLUMN events.schema_version IS
    'schemas/audit_event.vN.avsc version the producer wrote with; NULL when the writer schema came from a schema registry (see writer_schema_id).';

-- Retired partitions are detached, so the ALTER above did not reach them, and restoring one
-- (ATTACH) needs the same columns as events. Give the column to every table the partition
-- lifecycle knows that is not attached now.
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
              WHERE a.attrelid = c.oid AND a.attname = 'writer_schema_id' AND NOT a.attisdropped)
    LOOP
        EXECUTE format('ALTER TABLE %s ADD COLUMN writer_schema_id bigint', detached);
    END LOOP;
END
$$;
