"""Alembic environment of the fleet registry, run programmatically by :func:`edgepeft.fleet.db.upgrade`.

The caller hands over an open connection in ``config.attributes["connection"]``: the server migrates through
the same engine (and driver settings) it serves with, and no alembic.ini is needed. With the alembic CLI
(``alembic -x url=sqlite:///fleet.db ...`` from this folder's parent, for writing a new revision), the URL comes
from ``-x url=``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from edgepeft.fleet.models import Model

config = context.config
target_metadata = Model.metadata


def run(connection: object) -> None:
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table, so later revisions that
    # change a column run on SQLite and PostgreSQL alike.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database URL: alembic -x url=sqlite:///fleet.db upgrade head")
    engine = create_engine(url)
    with engine.begin() as conn:
        run(conn)
