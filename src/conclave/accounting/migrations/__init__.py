"""Alembic migrations of the PostgreSQL ledger, run by ``PostgresLedger.open``.

They are plain Alembic (``env.py`` + ``versions/``), run programmatically with
the schema chosen at open time as the search path, so one migration serves any
schema.  To author a new one: copy the latest file in ``versions/``, bump
``revision``/``down_revision``, and write ``upgrade``/``downgrade`` with
``op.execute``.
"""
