"""`python -m proxy run`: start the relay under gunicorn with the production config. (`doctor` and `keys`
are their own modules: `proxy/doctor.py`, `proxy/keys_cli.py`.)

With neither a `.env` file nor the variables set, it starts the clearly labelled demo mode with a generated
access key, so a newcomer sees it work; the app itself only enters demo mode when `RELAY_DEMO=1`.
"""

from __future__ import annotations

import os
import secrets
import sys

from proxy.config import PROJECT_ROOT, ConfigError, ServerSettings, run_environment


def run(extra_args: list[str]) -> None:
    env_file = PROJECT_ROOT / ".env"
    env = run_environment(os.environ, env_file)
    try:
        settings = ServerSettings.from_env(env)
    except ConfigError as exc:
        print(f"relay: refusing to start: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    if not env_file.exists() and not env.get("AUTHORIZATION_KEY") and not env.get("OPENAI_API_KEY"):
        key = secrets.token_urlsafe(24)
        env.update(RELAY_DEMO="1", AUTHORIZATION_KEY=key)
        print(demo_banner(settings, key), flush=True)
    command = [sys.executable, "-m", "gunicorn", "-c", str(PROJECT_ROOT / "deploy" / "gunicorn.conf.py"),
               "--chdir", str(PROJECT_ROOT), "wsgi:app", *extra_args]
    os.execvpe(command[0], command, env)  # noqa: S606 - replaces this process with gunicorn


def demo_banner(settings: ServerSettings, key: str) -> str:
    url = settings.url
    return (
        "\n  DEMO MODE: no .env and no OPENAI_API_KEY found, so answers come from a local stand-in model.\n"
        f"  Listening on {settings.bind}. Access key for this run: {key}\n"
        f"  Chat page: open {url} in a browser and enter the access key.\n"
        "  Or with curl:\n"
        f"    curl -N {url}chat -H 'Authorization: Bearer {key}' \\\n"
        "      -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}]}'\n"
        "  To chat for real: cp .env.example .env, fill in the keys, run again.\n"
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0] == "run":
        run(argv[1:])
        return 0
    if argv[0] == "doctor":
        from proxy.doctor import main as doctor

        return doctor(argv[1:])
    if argv[0] == "keys":
        from proxy.keys_cli import main as keys

        return keys(argv[1:])
    if argv[0] in ("usage", "migrate"):
        from proxy.ledger.cli import migrate_main, usage_main

        return usage_main(argv[1:]) if argv[0] == "usage" else migrate_main(argv[1:])
    print(f"usage: python -m proxy run [gunicorn options] | python -m proxy doctor URL KEY"
          " | python -m proxy keys create|list|revoke|hash"
          " | python -m proxy usage [--key NAME] [--since 7d] [--by day|model|key] | python -m proxy migrate"
          f"  (unknown command {argv[0]!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
