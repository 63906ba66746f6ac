"""Alembic migrations of the node database (run by `Database.upgrade`)."""
