#!/usr/bin/env bash
# Set-up, then uringserve serving the bundled example app (examples/app.py, a
# small FastAPI app) on http://127.0.0.1:8000 until Ctrl-C.
# Try it from another shell:  curl 'http://127.0.0.1:8000/items/3?q=x'
# (examples/echo_server.py is a plain uringloop example: a TCP echo server.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> .venv/bin/uringserve app:app --app-dir examples --host ${HOST:-127.0.0.1} --port ${PORT:-8000}"
exec .venv/bin/uringserve app:app --app-dir examples --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
