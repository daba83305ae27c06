"""`python -m proxy run`: start the relay under gunicorn with the production config.

With neither a `.env` file nor the variables set, it starts the clearly labelled demo mode with a generated
access key, so a newcomer sees it work; the app itself only enters demo mode when `RELAY_DEMO=1`.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(extra_args: list[str]) -> None:
    env = dict(os.environ)
    if not (ROOT / ".env").exists() and not env.get("AUTHORIZATION_KEY") and not env.get("OPENAI_API_KEY"):
        key = secrets.token_urlsafe(24)
        env.update(RELAY_DEMO="1", AUTHORIZATION_KEY=key)
        bind = env.get("GUNICORN_BIND", "127.0.0.1:8000")
        print(
            "\n  DEMO MODE: no .env and no OPENAI_API_KEY found, so answers come from a local stand-in model.\n"
            f"  Access key for this run: {key}\n"
            "  Try it:\n"
            f"    curl -N http://{bind}/chat -H 'Authorization: Bearer {key}' \\\n"
            "      -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello!\"}]}'\n"
            "  To chat for real: cp .env.example .env, fill in the keys, run again.\n",
            flush=True,
        )
    command = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py"),
               "--chdir", str(ROOT), "wsgi:app", *extra_args]
    os.execvpe(command[0], command, env)  # noqa: S606 - replaces this process with gunicorn


def main(argv: list[str]) -> int:
    if not argv or argv[0] == "run":
        run(argv[1:])
        return 0
    if argv[0] == "doctor":
        from proxy.doctor import main as doctor

        return doctor(argv[1:])
    print(f"usage: python -m proxy run [gunicorn options] | python -m proxy doctor URL KEY"
          f"  (unknown command {argv[0]!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
