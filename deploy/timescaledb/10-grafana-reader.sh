#!/bin/sh
# Run once by the TimescaleDB/PostgreSQL image when it initialises an empty data directory
# (/docker-entrypoint-initdb.d, after the image's own TimescaleDB scripts): Grafana's login role,
# read-only on every table present and future (PostgreSQL 14+'s predefined role pg_read_all_data).
# Grafana's PostgreSQL data source runs whatever SQL a dashboard editor types; this role cannot write.
set -eu
: "${IOTJX_GRAFANA_DB_USER:?}" "${IOTJX_GRAFANA_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v reader="$IOTJX_GRAFANA_DB_USER" -v secret="$IOTJX_GRAFANA_DB_PASSWORD" <<'SQL'
CREATE ROLE :"reader" LOGIN PASSWORD :'secret' CONNECTION LIMIT 20;
GRANT pg_read_all_data TO :"reader";
ALTER ROLE :"reader" SET default_transaction_read_only = on;
ALTER ROLE :"reader" SET statement_timeout = '30s';
SQL
