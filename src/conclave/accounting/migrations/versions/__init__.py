"""Alembic revision files (Alembic skips ``__init__``; it is here so the files ship)."""
