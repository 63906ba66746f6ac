"""Alembic environment for the node's database.

`Database.upgrade` passes an open connection in `config.attributes["connection"]`; the
plain `alembic -c dicom_node/alembic.ini ...` command line uses `sqlalchemy.url` (or env
CTMTL_DATABASE__URL) instead.
"""

from __future__ import annotations

import logging
import os

from alembic import context
from sqlalchemy import create_engine

from dicom_node.db import Base

logger = logging.getLogger(__name__)

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return os.environ.get("CTMTL_DATABASE__URL") or config.get_main_option("sqlalchemy.url") or ""


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade head --sql`)."""
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url())
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
