"""Alembic environment: run migrations on the connection handed in by Conclave.

Concurrency: four server processes may start at once and all run ``upgrade
head``.  The first statement of the migration transaction takes a PostgreSQL
advisory transaction lock keyed on the schema, so the others wait; when they
get the lock the version table already says ``head`` and they do nothing.
The schema is created under the same lock (``CREATE SCHEMA IF NOT EXISTS`` is
not race-free on its own).  Everything runs in one transaction: PostgreSQL DDL
is transactional, so a failed migration leaves nothing half-applied.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

config = context.config
connection = config.attributes["connection"]
schema: str = config.attributes["schema"]

context.configure(
    connection=connection,
    version_table="alembic_version_accounting",
    version_table_schema=schema,
    transactional_ddl=True,
)

with context.begin_transaction():
    connection.execute(
        text("SELECT pg_advisory_xact_lock(hashtext(:name))"),
        {"name": f"conclave.accounting.migrate:{schema}"},
    )
    connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    connection.execute(text(f'SET LOCAL search_path TO "{schema}"'))
    context.run_migrations()
