-- Least privilege for the local stack (docker-compose.yml runs this once, at the database's
-- first start): the owner migrates and runs retention, the writer is what `auditflow run` uses.
-- See the README's "Deploying with least privilege". Local passwords only: change them anywhere
-- else.
CREATE ROLE auditflow_owner LOGIN PASSWORD 'owner-local-only';
CREATE ROLE auditflow_writer LOGIN PASSWORD 'writer-local-only';
GRANT CREATE ON DATABASE postgres TO auditflow_owner;
