#!/usr/bin/env bash
# Installs every system and Python package uringserve needs and builds it into
# .venv. Idempotent; prints what it does. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*"; }

APT_PACKAGES=(build-essential pkg-config cmake ninja-build liburing-dev node-llhttp
              python3 python3-dev python3-venv strace wrk clang clang-format util-linux nginx redis-server
              libclang-rt-dev linux-perf)  # libclang-rt-dev: the libFuzzer and sanitizer runtimes for clang;
                                           # linux-perf: bench/perf_split.py
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "system packages already installed"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $($PYTHON --version 2>&1) ($(command -v "$PYTHON"))"
    "$PYTHON" -m venv .venv
fi
# CPython's own asyncio tests (test.test_asyncio) ship with python.org and
# pyenv builds; Debian's python3 keeps them in a separate package.
if ! .venv/bin/python -c "import test.test_asyncio.test_events" 2>/dev/null; then
    ver=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    log "apt-get install libpython${ver}-testsuite (CPython's test.test_asyncio)"
    apt-get install -y -qq --no-install-recommends "libpython${ver}-testsuite" >/dev/null
fi

log "pip install .[test,bench] (builds the C extension with scikit-build-core + CMake)"
.venv/bin/python -m pip install -q --upgrade pip
URING_WERROR=${URING_WERROR:-ON} .venv/bin/python -m pip install -q ".[test,bench]"
log "installed: $(.venv/bin/python -c 'import uringloop; print("uringloop", uringloop.__version__, uringloop.__file__)')"

# anyio's, uvicorn's, aiohttp's, redis-py's, uvloop's, aiosmtplib's, asyncssh's,
# aioquic's and pyzmq's own test suites, run on uringloop by tests/test_*_suite.py:
# the sdists of the installed versions (their wheels have no tests). uvloop's
# and pyzmq's source packages are left out of the unpacked trees: uncompiled,
# they would shadow the installed packages that their tests import.
for project in anyio uvicorn aiohttp redis uvloop aiosmtplib asyncssh aioquic pyzmq; do
    version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$project'))")
    if [ ! -d "build/thirdparty/$project-$version/tests" ]; then
        log "pip download $project==$version (sdist, for its test suite) into build/thirdparty"
        mkdir -p build/thirdparty
        .venv/bin/python -m pip download -q --no-deps --no-binary :all: "$project==$version" -d build/thirdparty
        case $project in
            uvloop) source_package=uvloop ;;
            pyzmq) source_package=zmq ;;
            *) source_package= ;;
        esac
        tar -xzf "build/thirdparty/$project-$version.tar.gz" -C build/thirdparty \
            ${source_package:+"--exclude=$project-$version/$source_package"}
    fi
done
