"""`python -m proxy usage [--key NAME] [--since 7d] [--by day|model|key]`: the ledger's totals as a table;
`python -m proxy migrate`: the ledger's schema brought up to date now (the workers also do it on their own).

Both read only the ledger's settings (DATA_DIR, DATABASE_URL; `.env` in the working directory counts), so
they run on the relay's host without its keys.
"""

from __future__ import annotations

import argparse
import os
import sys

import sqlalchemy as sa

from proxy.config import Config, ConfigError, ledger_settings, load_env_file
from proxy.ledger.database import SQLITE_FILE, create_engine, data_dir, database_url, migrate
from proxy.ledger.report import GROUPINGS, ReportError, parse_query, table, usage


def ledger_config() -> Config:
    load_env_file()
    return Config((), "", **ledger_settings(os.environ))


def usage_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy usage", description="Who used what, from the ledger.")
    parser.add_argument("--key", help="only this key's usage (its name)")
    parser.add_argument("--since", default="30d", help="7d (today and the 6 days before, UTC) or 2026-11-01")
    parser.add_argument("--by", default="day", choices=GROUPINGS, help="one line per day, model or key")
    args = parser.parse_args(argv)
    try:
        config = ledger_config()
        query = parse_query(args.since, args.key, args.by)
        # Reads only: it never makes a file (run as root, it would leave one the relay cannot write).
        if not config.database_url and not (data_dir(config) / SQLITE_FILE).is_file():
            print(f"no usage recorded yet (no {data_dir(config) / SQLITE_FILE})")
            return 0
        engine = create_engine(config)
        if not sa.inspect(engine).has_table("ledger_requests"):
            print("no usage recorded yet")
            return 0
        print(table(usage(engine, query), query.by), end="")
    except (ConfigError, ReportError) as exc:
        print(f"relay usage: {exc}", file=sys.stderr)
        return 2
    except sa.exc.SQLAlchemyError as exc:
        print(f"relay usage: cannot read the ledger: {type(exc).__name__}", file=sys.stderr)
        return 1
    return 0


def migrate_main(_argv: list[str]) -> int:
    try:
        config = ledger_config()
        migrate(create_engine(config))
    except ConfigError as exc:
        print(f"relay: ledger: {exc}", file=sys.stderr)
        return 2
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        where = "PostgreSQL (DATABASE_URL)" if config.database_url else database_url(config)
        print(f"relay: ledger: cannot migrate the database at {where}: {type(exc).__name__}; the workers "
              "retry on their own", file=sys.stderr)
        return 1
    return 0
