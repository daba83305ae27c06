"""Where the ledger lives and how its schema gets there.

SQLite by default: `DATA_DIR/ledger.db` in WAL mode (readers never wait for the writer, and the writer
waits up to `BUSY_TIMEOUT_MS` for another process' write). PostgreSQL (psycopg 3) when DATABASE_URL is
set, so several relay instances share one ledger.

The schema is Alembic's (`proxy/ledger/migrations`): `migrate` runs `upgrade head` inside one transaction
holding a lock (an advisory lock on PostgreSQL, a file lock beside the SQLite file), so every gunicorn
worker's ledger thread (before its first insert), a second instance and `python -m proxy migrate` may all
call it at once: one migrates, the others then find the schema current. gunicorn's master never imports
SQLAlchemy (it imports ssl, which the gevent workers must patch first).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from proxy.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_FILE = "ledger.db"
BUSY_TIMEOUT_MS = 30_000
# pg_advisory_xact_lock's key for the migration: any constant this database's other users do not pick.
MIGRATION_LOCK = 0x7265_6C61_79  # "relay"


def database_url(config: Config) -> str:
    """DATABASE_URL (already spelled for psycopg 3), else the SQLite file in DATA_DIR."""
    if config.database_url:
        return config.database_url
    return f"sqlite:///{(data_dir(config) / SQLITE_FILE).resolve()}"


def data_dir(config: Config) -> Path:
    return config.data_dir if config.data_dir is not None else Path("data")


def create_engine(config: Config) -> sa.Engine:
    """A connection-per-use engine (NullPool): each thread that uses it opens its own connection, and no
    pool lock is shared between the workers' greenlets and the ledger's own thread."""
    url = database_url(config)
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, poolclass=sa.NullPool,
                                  connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, poolclass=sa.NullPool, connect_args={"connect_timeout": 5})


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # kept in the file; readers never block the writer
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL's safe setting: a power cut may lose the last batch only
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.close()


def migrate(engine: sa.Engine) -> None:
    """`alembic upgrade head`, once whoever else is calling it at the same moment. SQLite's directory is
    made here, in the ledger's own thread, so one that cannot be made fails the ledger, not the relay."""
    if engine.dialect.name == "sqlite" and engine.url.database:
        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
    with _migration_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        settings = AlembicConfig()
        settings.set_main_option("script_location", str(MIGRATIONS))
        settings.attributes["connection"] = connection
        command.upgrade(settings, "head")


@contextmanager
def _migration_lock(engine: sa.Engine) -> Iterator[None]:
    """SQLite cannot hold a lock across Alembic's DDL and its version check: a file lock beside it does."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database:
        yield
        return
    with open(f"{database}.migrate-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
