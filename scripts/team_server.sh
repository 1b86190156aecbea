#!/usr/bin/env bash
# A team's MLflow tracking server: runs in PostgreSQL, artifacts proxied to one folder.
#
# One machine that the lab's machines can reach runs this. Every other machine needs only
#     export MLFLOW_TRACKING_URI=http://<this host>:5000
# and neither the database password nor the artifact folder: clients upload artifacts through
# the server (proxied artifact storage, --artifacts-destination), which stores them there and
# hands them back (runs:/..., models:/...).
#
# Optuna studies live in the same PostgreSQL, in a database of their own (MLflow and Optuna each
# keep an `alembic_version` table, so they cannot share one database). Search workers open it
# directly, from any machine:
#     python entrypoints/search.py --storage postgresql+psycopg://ser@<db host>:5432/optuna ...
# with the password in ~/.pgpass (`<db host>:5432:*:ser:<password>`, mode 0600) or PGPASSWORD,
# never in the URL: the URL is logged and shows up in `ps`.
#
# Usage (run from anywhere; the repository's .venv is used):
#   DB_PASSWORD=... scripts/team_server.sh init   # once: the role and the two databases (psql)
#   scripts/team_server.sh                         # the server, in the foreground (Ctrl-C stops)
#
# `init` runs psql as the PostgreSQL superuser (default: `sudo -u postgres psql`, the local
# server's Unix socket; set PSQL to reach another one, e.g. PSQL="psql -h db.lab -U postgres").
# The database admin also lets the lab in: `listen_addresses` in postgresql.conf, and in
# pg_hba.conf a line such as `host  mlflow,optuna  ser  10.0.0.0/8  scram-sha-256`.
#
# The server itself has no login: anyone who reaches PORT can read and write runs. Keep it on
# the lab's network (or add MLflow's `--app-name basic-auth`). MLflow refuses requests whose
# Host header is not localhost or a private IP unless ALLOWED_HOSTS names it (with the port,
# e.g. ALLOWED_HOSTS=mlflow.lab.example:5000).
#
# Settings (environment, defaults after :-):
set -euo pipefail

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
MLFLOW=${MLFLOW:-$REPO/.venv/bin/mlflow}
DB_HOST=${DB_HOST:-127.0.0.1}            # where PostgreSQL listens, as this machine sees it
DB_PORT=${DB_PORT:-5432}
DB_USER=${DB_USER:-ser}                  # the role MLflow and the workers log in as
MLFLOW_DB=${MLFLOW_DB:-mlflow}           # MLflow's runs, metrics, models, registry
OPTUNA_DB=${OPTUNA_DB:-optuna}           # Optuna's studies (the workers' --storage)
ARTIFACTS=${ARTIFACTS:-/srv/ser/mlflow-artifacts}  # a local path, or s3://..., gs://...
HOST=${HOST:-0.0.0.0}                    # 0.0.0.0: every interface; 127.0.0.1: this machine
PORT=${PORT:-5000}
WORKERS=${WORKERS:-4}                    # server processes; each holds a connection pool
ALLOWED_HOSTS=${ALLOWED_HOSTS:-}
PSQL=${PSQL:-sudo -u postgres psql}
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: no job-runner processes (MLflow's GenAI jobs, such as
# online scoring of traces; ser uses none), a lighter server.

if [ "${1:-}" = init ]; then
    : "${DB_PASSWORD:?set DB_PASSWORD: the password the role ${DB_USER} gets}"
    # psql substitutes :"name" (an identifier) and :'name' (a literal), quoted safely.
    $PSQL -v ON_ERROR_STOP=1 -v user="$DB_USER" -v password="$DB_PASSWORD" \
        -v mlflow_db="$MLFLOW_DB" -v optuna_db="$OPTUNA_DB" <<'SQL'
CREATE ROLE :"user" LOGIN PASSWORD :'password';
CREATE DATABASE :"mlflow_db" OWNER :"user";
CREATE DATABASE :"optuna_db" OWNER :"user";
SQL
    echo "created role ${DB_USER} and databases ${MLFLOW_DB}, ${OPTUNA_DB}" >&2
    exit 0
fi

# The password comes from DB_PASSWORD, else from ~/.pgpass (libpq reads it), never the command
# line. The driver is psycopg 3 (a dependency of ser): SQLAlchemy's dialect postgresql+psycopg.
if [ -n "${DB_PASSWORD:-}" ]; then
    export PGPASSWORD="$DB_PASSWORD"
fi
args=(
    --backend-store-uri "postgresql+psycopg://${DB_USER}@${DB_HOST}:${DB_PORT}/${MLFLOW_DB}"
    --artifacts-destination "$ARTIFACTS"  # implies --serve-artifacts: clients go through us
    --host "$HOST" --port "$PORT" --workers "$WORKERS"
)
if [ -n "$ALLOWED_HOSTS" ]; then
    args+=(--allowed-hosts "$ALLOWED_HOSTS")
fi
case "$ARTIFACTS" in
    *://*) ;;
    *) mkdir -p "$ARTIFACTS" ;;
esac
# The first start creates MLflow's tables (some seconds). After upgrading MLflow, back up the
# database and run `$MLFLOW db upgrade <backend URI>` before starting the server again: it
# refuses an out-of-date schema. SIGTERM (Ctrl-C) stops the server and its workers.
exec "$MLFLOW" server "${args[@]}"
