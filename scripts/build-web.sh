#!/bin/sh
# Builds the chat page's bundle into proxy/web/static/dist/ (gitignored) from proxy/web/src/ and the
# npm packages pinned in proxy/web/package-lock.json. Skips work that is already up to date:
# `npm ci` only when the lockfile changed, esbuild only when a source is newer than the bundle.
set -eu
cd "$(dirname "$0")/../proxy/web"

if ! command -v npm >/dev/null 2>&1; then
    echo "build-web: npm is missing; install Node.js 18+ (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi

stale=0
for bundle in static/dist/app.js static/dist/app.css; do
    [ -f "$bundle" ] || stale=1
done
if [ "$stale" -eq 0 ] && [ -n "$(find src package-lock.json -newer static/dist/app.js -print -quit)" ]; then
    stale=1
fi
if [ "$stale" -eq 1 ]; then
    npm run --silent build
fi
