#!/bin/sh
# The listening votes' database and its own role (tasks/listening/store.py): the cpu hosts get this role's
# password (LISTENING_DB_PASSWORD), never the superuser's, which also owns MLflow's and Prefect's stores.
# Runs once, at the volume's first start (docker-entrypoint-initdb.d), after postgres-init.sql.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$LISTENING_DB_PASSWORD" --username "$POSTGRES_USER" --dbname postgres <<'SQL'
CREATE ROLE listening LOGIN NOSUPERUSER PASSWORD :'pw';
CREATE DATABASE listening OWNER listening;
SQL
