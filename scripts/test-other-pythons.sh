#!/usr/bin/env bash
# The test suite on other CPython versions than the machine's python3
# (Debian 12 has only 3.11). Not part of scripts/test.sh: it needs the
# interpreters, e.g. from pyenv, and run after scripts/setup.sh (the system
# packages). Each interpreter gets its own venv under build/pythons/:
#
#   bash scripts/test-other-pythons.sh ~/.pyenv/versions/3.10.13/bin/python \
#       ~/.pyenv/versions/3.12.1/bin/python ~/.pyenv/versions/3.13.0/bin/python
#
# On every version: CPython's own asyncio tests of that version on uringloop
# (tests/cpython) and the e2e tests (real apps and clients). From 3.11 on
# also the loop and server tests; these assert 3.11's asyncio semantics (its
# sslproto, sock_sendto), which 3.10's asyncio lacks too, so on 3.10 its own
# suite is the reference for the loop.
# The third-party suites that run from sdists in build/thirdparty (fetched
# for the versions in .venv) are left out; tornado's, which comes inside the
# tornado package, runs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 PYTHON..." >&2; exit 2; }

log() { printf '\n==> %s\n' "$*"; }
for python in "$@"; do
    ver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    venv=build/pythons/$ver
    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    log "Python $ver: pip install . (-Werror) and the test dependencies"
    "$venv/bin/python" -m pip install -q --upgrade pip
    if [ "$ver" = "3.10" ]; then
        # several test extras (uvicorn's suite's, Django 5) need 3.11: the
        # ones the CPython suite and e2e need, in versions that have 3.10
        URING_WERROR=ON "$venv/bin/python" -m pip install -q . "pytest>=8.0" "pytest-timeout>=2.3" \
            "httpx>=0.27" "aiohttp>=3.9" "websockets>=13" "fastapi>=0.115" "starlette>=0.40" \
            "python-multipart>=0.0.9" "django>=4.2,<5" "quart>=0.20" "gunicorn>=23" "uvicorn[standard]>=0.30"
        log "Python $ver: CPython's asyncio tests on uringloop, e2e"
        # and, of the loop tests, the one for code written for 3.10 alone
        # (its SSLProtocol's resume of a paused TCP transport at close())
        "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/cpython e2e \
            tests/test_loop_tls.py::test_late_data_is_dropped_while_the_app_has_reading_paused
    else
        URING_WERROR=ON "$venv/bin/python" -m pip install -q ".[test]"
        log "Python $ver: CPython's asyncio tests, the loop and server tests, e2e"
        "$venv/bin/python" -m pytest -q -p no:cacheprovider tests e2e \
            --ignore=tests/test_anyio_suite.py --ignore=tests/test_uvicorn_suite.py --ignore=tests/test_aiohttp_suite.py \
            --ignore=tests/test_redis_suite.py --ignore=tests/test_uvloop_suite.py \
            --ignore=tests/test_library_suites.py
    fi
done
log "all versions passed"
