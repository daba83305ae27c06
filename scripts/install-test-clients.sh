#!/bin/sh
# Installs the real client programs the tests drive against the relay (tests/test_codex_cli.py: OpenAI's
# Codex CLI; tests/test_claude_code.py: Claude Code; both npm packages carry their native binary in a
# per-platform optional package, which Claude Code's postinstall links into its bin/) from the exact
# versions pinned in tests/clients/package-lock.json into the gitignored tests/clients/node_modules/.
# Quick when up to date: `npm ci` only when the lockfile changed. Nothing is downloaded at test time.
set -eu
cd "$(dirname "$0")/../tests/clients"

if ! command -v npm >/dev/null 2>&1; then
    echo "install-test-clients: npm is missing; install Node.js 18+ (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi

# The official OpenAI JS SDK for the browser test (tests/browser/test_js_sdk.py): `openai` and esbuild pinned by
# tests/browser/jssdk/package-lock.json, the page's script bundled into the gitignored tests/browser/pages/dist/.
# `npm ci` only when the lockfile changed, esbuild only when a source is newer than the bundle.
cd ../browser/jssdk
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
bundle=../pages/dist/js_sdk.js
if [ ! -f "$bundle" ] || [ -n "$(find src package-lock.json -newer "$bundle" -print -quit)" ]; then
    npm run --silent build
fi
