-- Least privilege: the role `auditflow run` connects with (the writer) owns nothing and cannot
-- create tables, yet ingest must create the partition of a day it has not seen. It does so
-- through this function, owned by the schema's owner (who runs `auditflow migrate`) and run
-- with the owner's rights. Its arguments can only name a date and one of three interval words:
-- the partition's name and bounds are computed here, so no identifier from outside reaches the
-- DDL. `auditflow migrate --grant-writer ROLE` grants EXECUTE on it. Runs with search_path set to
-- the configured schema (AUDITFLOW_DB_SCHEMA), like 0001; the function's own search_path is
-- pinned to that schema with pg_temp last, so no temporary object can stand in for `events`.

DO $migration$
BEGIN
    EXECUTE format($create$
        CREATE FUNCTION auditflow_create_partition(start date, step text) RETURNS text
        LANGUAGE plpgsql
        SECURITY DEFINER
        SET search_path = %I, pg_temp
        AS $body$
        DECLARE
            finish date;
            name text;
        BEGIN
            IF start IS NULL OR step IS NULL THEN
                RAISE EXCEPTION 'auditflow_create_partition: start and step are required';
            END IF;
            IF start < date '1000-01-01' OR start > date '9998-12-01' THEN
                RAISE EXCEPTION 'auditflow_create_partition: %% is out of range', start;
            END IF;
            CASE step
                WHEN 'day' THEN
                    finish := start + 1;
                    name := 'events_p' || to_char(start, 'YYYYMMDD');
                WHEN 'week' THEN
                    IF extract(isodow FROM start) <> 1 THEN
                        RAISE EXCEPTION 'auditflow_create_partition: a week starts on a Monday, not %%', start;
                    END IF;
                    finish := start + 7;
                    name := 'events_p' || to_char(start, 'IYYY') || 'w' || to_char(start, 'IW');
                WHEN 'month' THEN
                    IF extract(day FROM start) <> 1 THEN
                        RAISE EXCEPTION 'auditflow_create_partition: a month starts on its first day, not %%', start;
                    END IF;
                    finish := (start + interval '1 month')::date;
                    name := 'events_p' || to_char(start, 'YYYYMM');
                ELSE
                    RAISE EXCEPTION 'auditflow_create_partition: step must be day, week or month';
            END CASE;
            EXECUTE format('CREATE TABLE %%I.%%I (LIKE %%I.events INCLUDING ALL EXCLUDING INDEXES)',
                           %L, name, %L);
            EXECUTE format('CREATE TRIGGER auditflow_no_truncate BEFORE TRUNCATE ON %%I.%%I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION %%I.auditflow_refuse_change()',
                           %L, name, %L);
            EXECUTE format('ALTER TABLE %%I.events ATTACH PARTITION %%I.%%I FOR VALUES FROM (%%L) TO (%%L)',
                           %L, %L, name, start::text || ' 00:00:00+00', finish::text || ' 00:00:00+00');
            RETURN name;
        END
        $body$
    $create$,
    current_schema(),
    current_schema(), current_schema(),
    current_schema(), current_schema(),
    current_schema(), current_schema());
END
$migration$;

REVOKE ALL ON FUNCTION auditflow_create_partition(date, text) FROM PUBLIC;

COMMENT ON FUNCTION auditflow_create_partition(date, text) IS
    'Creates and attaches the events partition of one day, ISO week or month starting at start; runs as the owner (SECURITY DEFINER). Granted to the writer role by auditflow migrate --grant-writer.';
