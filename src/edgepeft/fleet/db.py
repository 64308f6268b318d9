"""The registry's database: an engine for a URL, its schema brought to the newest Alembic revision, sessions.

SQLite (a file; the default, no set-up) and PostgreSQL (``postgresql+psycopg://user:pass@host/db``) are what is
tested. SQLite gets WAL journaling, foreign keys, a busy timeout and ``BEGIN IMMEDIATE`` on write transactions:
a transaction that reads and then writes would otherwise fail at once with "database is locked" when another
writer got there first, instead of waiting its turn.

Example:
    >>> import tempfile
    >>> db = Database.open(f"sqlite:///{tempfile.mkdtemp()}/fleet.db")
    >>> db.revision()
    '0002'
    >>> db.close()
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from edgepeft.core.errors import ConfigError

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_S = 30.0
_WRITE = "edgepeft_write"


def normalise_url(url: str) -> str:
    """``url`` with PostgreSQL's driver made explicit (psycopg 3: the one the ``fleet`` extra installs)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def create_registry_engine(url: str) -> Engine:
    """An engine for ``url`` with the settings the registry relies on (see the module docstring)."""
    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        raise ConfigError(f"--db {url!r} is not a database URL; use sqlite:///PATH/fleet.db or "
                          "postgresql://USER:PASSWORD@HOST:PORT/DB") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"database {parsed.get_backend_name()!r} is not supported; use sqlite:///PATH or "
                          "postgresql://...")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ConfigError("an in-memory SQLite registry would vanish with the process; give a file, "
                              "e.g. sqlite:///edgepeft-fleet/fleet.db")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            _sqlite_settings(engine)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise ConfigError(f"no database driver for {parsed.drivername} ({exc}); pip install 'edgepeft[fleet]'"
                          ) from None
    return engine


def _sqlite_settings(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own transaction handling would
        # start a deferred transaction lazily, and could not be told to take the write lock up front).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer
        cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged change survives a power cut
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def upgrade(engine: Engine) -> str:
    """Bring the schema to the newest revision shipped in the package (``alembic upgrade head``); return it."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()
    return current_revision(engine)


def current_revision(engine: Engine) -> str:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision() or ""


class Database:
    """An engine whose schema is up to date, and sessions on it: ``read()`` and ``write()`` (a transaction
    committed when the block ends, rolled back if it raises)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reads = sessionmaker(engine, expire_on_commit=False)
        self._writes = sessionmaker(engine.execution_options(**{_WRITE: True}), expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, migrate: bool = True) -> Database:
        """Connect to ``url`` and (by default) run the migrations; a database that cannot be reached is a
        :class:`ConfigError` naming it (without its password)."""
        engine = create_registry_engine(url)
        try:
            if migrate:
                upgrade(engine)
            else:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
        except OperationalError as exc:
            engine.dispose()
            shown = engine.url.render_as_string(hide_password=True)
            reason = " ".join(str(exc.orig).split())[:200]
            raise ConfigError(f"cannot open the registry database {shown} ({reason}); check --db") from None
        return cls(engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def revision(self) -> str:
        return current_revision(self.engine)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._reads() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._writes() as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()
