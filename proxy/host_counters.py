"""The budget counters of one host: `DATA_DIR/limits.db`, one SQLite file every worker of the relay shares.

With the default `memory://` storage, rates and stream slots count in each worker's memory, but a key's
budgets (tokens per UTC day, spend per UTC day and month) and its last use live here, so a money limit
holds across the gunicorn workers of one VPS without Redis. Each reservation is one `BEGIN IMMEDIATE`
transaction (SQLite's write lock, taken before reading): it reads what every budget has committed, applies
`proxy/budgets.py`'s rule (`refused_by`, the one MemoryCounters applies and Redis's Lua script spells again)
and reserves in every budget or in none. Settling is one transaction too.

A counter row is kept until `expires` (its period's TTL, as Redis's EXPIRE); expired rows are ignored by
reads and deleted by the writes (an indexed range delete, nothing to do most of the time).

Under gevent each call runs in gevent's threadpool (a real thread), as the ledger's reads do, so waiting for
the file's lock (at most BUSY_TIMEOUT_SECONDS) waits only the request that asked. Errors reach the caller
(`proxy/limits.py`'s Counters), which falls back to the process's memory, logged once.
"""

from __future__ import annotations

import fcntl
import sqlite3
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import TypeVar

from proxy.budgets import Charge, Hold, refused_by
from proxy.config import Config

SQLITE_FILE = "limits.db"
BUSY_TIMEOUT_SECONDS = 1.0  # a reservation holds the lock for microseconds: longer than this is a stuck file
LAST_USE_PREFIX = "last-use:"  # last use rows share the table: spent is the time, never reserved
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    spent REAL NOT NULL DEFAULT 0,
    held REAL NOT NULL DEFAULT 0,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS counters_expires ON counters (expires);
"""


def host_file(config: Config) -> Path | None:
    """DATA_DIR/limits.db, beside the ledger's file (`proxy/ledger/database.py`'s DATA_DIR); None for a
    Config without DATA_DIR (built directly, as in-process tests do): counters then stay in memory."""
    # Not through proxy/ledger/database.py's data_dir(): that module imports SQLAlchemy, which gunicorn's
    # master must not (see there); from_env resolves DATA_DIR (the variable, StateDirectory, ./data) for both.
    return config.data_dir / SQLITE_FILE if config.data_dir is not None else None


class HostCounters:
    """Budget counters and last uses in one SQLite file (the interface of MemoryCounters' budget half).
    `read_only`: never creates or writes the file (`keys list`); a missing file reads as empty."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._ready = False  # this process has made the directory, the schema and WAL mode

    # -- the interface Counters uses

    def amounts(self, counters: Sequence[str], now: float | None = None) -> list[tuple[float, float]]:
        """(spent, reserved) of each counter."""
        return self._run(lambda: self._amounts(counters, now if now is not None else time.time()))

    def reserve(self, holds: Sequence[Hold], now: float | None = None) -> int:
        """0 with every hold reserved, or the 1-based index of the first budget without room (nothing held)."""
        return self._run(lambda: self._reserve(holds, now if now is not None else time.time()))

    def settle(self, held: Sequence[tuple[str, float]], charges: Sequence[Charge], now: float | None = None) -> None:
        """Give back reserved amounts and add spent ones, in one transaction."""
        self._run(lambda: self._settle(held, charges, now if now is not None else time.time()))

    def touch(self, name: str, when: float, ttl: int) -> None:
        """Record the key's last use (kept `ttl` seconds); a later one never goes back in time."""
        def touch(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO counters (name, spent, expires) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                       "SET spent = MAX(spent, excluded.spent), expires = excluded.expires",
                       (LAST_USE_PREFIX + name, when, when + ttl))

        self._run(lambda: self._write(touch, when))

    def last_use(self, name: str) -> float | None:
        spent, _ = self.amounts([LAST_USE_PREFIX + name])[0]
        return spent or None

    # -- in the calling thread (a real one under gevent)

    def _amounts(self, counters: Sequence[str], now: float) -> list[tuple[float, float]]:
        if self.read_only and not self.path.exists():
            return [(0.0, 0.0) for _ in counters]
        with closing(self._connect()) as db:
            return _committed(db, counters, now)

    def _reserve(self, holds: Sequence[Hold], now: float) -> int:
        def reserve(db: sqlite3.Connection) -> int:
            found = _committed(db, [hold.counter for hold in holds], now)
            refused = refused_by(holds, [spent + held for spent, held in found])
            if not refused:
                db.executemany(
                    "INSERT INTO counters (name, held, expires) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                    "held = MAX(0, held) + excluded.held, expires = MAX(expires, excluded.expires)",
                    [(hold.counter, hold.amount, now + hold.ttl) for hold in holds])
            return refused

        return self._write(reserve, now)

    def _settle(self, held: Sequence[tuple[str, float]], charges: Sequence[Charge], now: float) -> None:
        def settle(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE counters SET held = MAX(0, held - ?) WHERE name = ?",
                           [(amount, counter) for counter, amount in held])
            db.executemany(
                "INSERT INTO counters (name, spent, expires) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "spent = spent + excluded.spent, expires = MAX(expires, excluded.expires)",
                [(counter, amount, now + ttl) for counter, amount, ttl in charges])

        self._write(settle, now)

    def _write(self, change: Callable[[sqlite3.Connection], T], now: float | None = None) -> T:
        """One BEGIN IMMEDIATE transaction: the write lock is taken before anything is read, so no other
        process writes between this one's read and its write. Expired counters are dropped first."""
        if self.read_only:
            raise sqlite3.OperationalError("the limits file is opened read-only")
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                if now is not None:
                    db.execute("DELETE FROM counters WHERE expires <= ?", (now,))
                result = change(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result

    def _connect(self) -> sqlite3.Connection:
        """A connection for this call (each real thread opens its own; opening one costs microseconds)."""
        if self.read_only:
            return sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                   timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        if not self._ready:
            self._set_up()
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")  # WAL's safe setting: a power cut may lose the last write
        return db

    def _set_up(self) -> None:
        """The directory, WAL mode and the table, once per process. Workers starting together would race to
        switch the journal mode (SQLite answers "locked" at once, whatever the busy timeout): a file lock
        beside the file, held for milliseconds, lets one do it while the others wait."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.setup-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)) as db:
                    if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        db.execute("PRAGMA journal_mode=WAL")  # kept in the file; readers never wait for writers
                    db.executescript(_SCHEMA)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        self._ready = True

    def _run(self, call: Callable[[], T]) -> T:
        """Under gevent, in its threadpool (a real thread): SQLite's waits never block the hub."""
        from gevent import get_hub, monkey

        if monkey.is_module_patched("threading"):
            result: T = get_hub().threadpool.apply(call)
            return result
        return call()


def _committed(db: sqlite3.Connection, counters: Sequence[str], now: float) -> list[tuple[float, float]]:
    """(spent, reserved) of each counter still in its period."""
    found: dict[str, tuple[float, float]] = {}
    for name in set(counters):
        row = db.execute("SELECT spent, held FROM counters WHERE name = ? AND expires > ?", (name, now)).fetchone()
        if row is not None:
            found[name] = (float(row[0]), max(0.0, float(row[1])))
    return [found.get(name, (0.0, 0.0)) for name in counters]
