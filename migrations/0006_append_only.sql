-- Append-only storage: the audit trail and its hash chain refuse UPDATE, DELETE and TRUNCATE, for
-- every role, the owner included. Retention still works: it detaches whole partitions (DDL, not
-- row changes) and records each step in partition_lifecycle. Runs with search_path set to the
-- configured schema (AUDITFLOW_DB_SCHEMA), like 0001.
--
-- The one deliberate way around it is the owner's (or a superuser's) own: ALTER TABLE ... DISABLE
-- TRIGGER, which `auditflow verify` reports while it lasts, or a superuser session with
-- session_replication_role = replica. Either way the hash chain still shows every row changed.

CREATE FUNCTION auditflow_refuse_change() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    RAISE EXCEPTION 'auditflow: % on %.% refused: the audit trail is append-only',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'retention detaches whole partitions: auditflow partitions apply';
END
$$;

-- Row triggers on the partitioned table are cloned onto every partition, present and future.
CREATE TRIGGER auditflow_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION auditflow_refuse_change();
-- TRUNCATE triggers are per table: the parent here, each partition below and at its creation.
CREATE TRIGGER auditflow_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION auditflow_refuse_change();

CREATE TRIGGER auditflow_append_only BEFORE UPDATE OR DELETE ON batches
    FOR EACH ROW EXECUTE FUNCTION auditflow_refuse_change();
CREATE TRIGGER auditflow_no_truncate BEFORE TRUNCATE ON batches
    FOR EACH STATEMENT EXECUTE FUNCTION auditflow_refuse_change();
CREATE TRIGGER auditflow_append_only BEFORE UPDATE OR DELETE ON publishers
    FOR EACH ROW EXECUTE FUNCTION auditflow_refuse_change();
CREATE TRIGGER auditflow_no_truncate BEFORE TRUNCATE ON publishers
    FOR EACH STATEMENT EXECUTE FUNCTION auditflow_refuse_change();

DO $$
DECLARE
    partition regclass;
BEGIN
    FOR partition IN
        SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'events'::regclass
    LOOP
        EXECUTE format('CREATE TRIGGER auditflow_no_truncate BEFORE TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION auditflow_refuse_change()', partition);
    END LOOP;
END
$$;
