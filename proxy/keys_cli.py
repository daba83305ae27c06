"""`python -m proxy keys create|list|revoke|hash`: access keys that are never stored.

    python -m proxy keys create alice --daily-spend 2 --monthly-spend 20 --models 'gpt-4o*'
    python -m proxy keys list
    python -m proxy keys revoke alice
    python -m proxy keys hash          # convert a file's clear-text keys to hashes, in place

The file is KEYS_FILE (from the environment, or `.env` beside the relay as `python -m proxy run` reads it),
or `--file PATH`. Run it as the user that owns the file (`sudo -u relay ...`). A running relay rereads the
file within a second: a created key works, a revoked one is refused (an open WebSocket on it is closed with
1008), without a restart. `create` prints the key once; only its SHA-256 hash and its first characters
(`prefix`, to recognize it) are written.

`list` shows each key's last use and this month's spend from where the relay counts them: with
RATE_LIMIT_STORAGE_URI=redis://... in Redis; with the default memory storage in the host's file
DATA_DIR/limits.db (`proxy/host_counters.py`), read-only (a missing file is read as empty, never created).
Spend is counted there for keys with a budget (a key without one shows 0).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.budgets import spend_counter, utc_month
from proxy.config import PROJECT_ROOT, SETTINGS, ConfigError, ledger_settings, read_settings, run_environment
from proxy.host_counters import SQLITE_FILE, HostCounters
from proxy.keyfile import (
    KeyFileEditError,
    add_entry,
    check,
    editing,
    hash_entries,
    new_key,
    read_text,
    remove_entry,
    replace_file,
)
from proxy.keys import KeyPolicy, KeysFileError, env_key_policies, load_keys_file
from proxy.limits import Counters

# The limits `create` accepts: option, KEYS_FILE setting, type.
LIMIT_OPTIONS: tuple[tuple[str, str, type], ...] = (
    ("--requests-per-minute", "requests_per_minute", int),
    ("--requests-per-day", "requests_per_day", int),
    ("--daily-tokens", "daily_tokens", int),
    ("--max-streams", "max_streams", int),
    ("--daily-spend", "daily_spend", float),
    ("--monthly-spend", "monthly_spend", float),
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m proxy keys", description="Access keys in KEYS_FILE.")
    top.add_argument("--file", type=Path, help="the keys file (default: KEYS_FILE)")
    commands = top.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="make a new key, print it once, store only its hash")
    create.add_argument("name")
    for option, _setting, kind in LIMIT_OPTIONS:
        create.add_argument(option, type=kind, metavar="N" if kind is int else "AMOUNT")
    create.add_argument("--models", help="comma-separated model names or globs the key may use")
    commands.add_parser("list", help="names, prefixes, limits, last use and this month's spend")
    revoke = commands.add_parser("revoke", help="remove a key (every worker refuses it within a second)")
    revoke.add_argument("name")
    commands.add_parser("hash", help="replace the file's clear-text keys by their hashes, in place")
    return top


# The relay's settings this command reads, with the relay's rules (empty means the default; a bad value is
# one line naming the variable): which file, and, for `list`, where the counters live.
CLI_SETTINGS = ("KEYS_FILE", "RATE_LIMIT_STORAGE_URI")


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    args = parser().parse_args(argv)
    env = dict(environ if environ is not None else _environment())
    try:
        settings = read_settings(tuple(s for s in SETTINGS if s.env in CLI_SETTINGS), env)
        if args.command == "list":
            settings.update(ledger_settings(env))
    except ConfigError as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 2
    path: Path | None = args.file or settings.get("keys_file")
    if path is None:
        print("keys: KEYS_FILE is not set (in the environment or .env); pass --file PATH", file=sys.stderr)
        return 2
    try:
        if args.command == "list":
            return list_keys(path, settings)
        with editing(path):
            return edit(args, path, env)
    except (KeyFileEditError, KeysFileError, OSError) as exc:
        print(f"keys: {exc}", file=sys.stderr)
        return 1


def edit(args: argparse.Namespace, path: Path, env: Mapping[str, str]) -> int:
    text = read_text(path)
    reserved = frozenset(policy.name for policy in env_key_policies(_csv(env.get("AUTHORIZATION_KEY", ""))))
    if args.command == "create":
        limits: dict[str, object] = {setting: getattr(args, setting) for _option, setting, _kind in LIMIT_OPTIONS}
        if args.models:
            limits["models"] = _csv(args.models)
        key = new_key()
        text = add_entry(text, args.name, key, limits)
        check(text, path.parent, reserved)
        replace_file(path, text)
        print(f"created keys.{args.name} in {path}. Its key, shown this once (only its hash is stored):\n\n"
              f"    {key}\n\nA running relay accepts it within a second.")
    elif args.command == "revoke":
        text = remove_entry(text, args.name)
        check(text, path.parent, reserved)
        replace_file(path, text)
        print(f"revoked keys.{args.name}: every worker refuses it within a second; open WebSockets on it close.")
    else:
        text, converted = hash_entries(text)
        if not converted:
            print(f"{path}: no clear-text keys to convert")
            return 0
        check(text, path.parent, reserved)
        replace_file(path, text)
        print(f"{path}: replaced the clear-text keys of {', '.join(converted)} by their hashes; they keep working")
    return 0


def list_keys(path: Path, settings: Mapping[str, Any]) -> int:
    """The keys of `path`, with last use and spend from the counters `settings` (read by `main`) point at."""
    policies = load_keys_file(path) if path.exists() else ()
    storage = settings.get("rate_limit_storage_uri") or "memory://"
    counters: Counters | HostCounters
    if storage != "memory://":
        counters = Counters(storage)
    else:
        counters = HostCounters(settings["data_dir"] / SQLITE_FILE, read_only=True)
    month = utc_month()
    rows = [("NAME", "PREFIX", "LIMITS", "LAST USE (UTC)", f"SPEND {month}")]
    for policy in policies:
        rows.append((policy.name, policy.prefix or ("(clear text)" if policy.key else "-"), describe_limits(policy),
                     *usage_columns(counters, policy, month)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if isinstance(counters, HostCounters):
        print(f"\nlast use and spend: from {counters.path} (this host's workers; spend of keys with a budget)")
    return 0


def describe_limits(policy: KeyPolicy) -> str:
    parts = [f"{value:g}{unit}" for value, unit in (
        (policy.requests_per_minute, "/min"), (policy.requests_per_day, "/day"),
        (policy.daily_tokens, " tokens/day"), (policy.max_streams, " streams"),
        (policy.daily_spend, " spend/day"), (policy.monthly_spend, " spend/month")) if value is not None]
    if policy.models:
        parts.append("models " + ",".join(policy.models))
    return "; ".join(parts) or "defaults"


def usage_columns(counters: Counters | HostCounters, policy: KeyPolicy, month: str) -> tuple[str, str]:
    try:
        last = counters.last_use(policy.name)
        spent, _held = counters.amounts([spend_counter(policy.name, month)])[0]
    except sqlite3.Error:  # unreadable (or locked) file: the list still shows the keys
        return "-", "-"
    when = datetime.fromtimestamp(last, UTC).strftime("%Y-%m-%d %H:%M") if last is not None else "never"
    return when, f"{spent:.4f}"


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _environment() -> dict[str, str]:
    return run_environment(os.environ, PROJECT_ROOT / ".env")
