#!/usr/bin/env bash
# Set-up, then the bundled example: a TCP echo server on uringloop
# (sock_accept/sock_recv/sock_sendall on io_uring), until Ctrl-C.
# Try it from another shell:  printf 'hello\n' | nc -q1 127.0.0.1 8000
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> .venv/bin/python examples/echo_server.py --host ${HOST:-127.0.0.1} --port ${PORT:-8000}"
exec .venv/bin/python examples/echo_server.py --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}"
