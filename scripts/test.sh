#!/usr/bin/env bash
# Set-up, then the whole test suite: formatting, static analysis, the C
# engine tests (ctest), the Python tests (pytest, each loop test on uringloop
# and on asyncio, plus CPython's own asyncio tests), and both again under
# ASan+UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

log() { printf '\n==> %s\n' "$*"; }
PY=.venv/bin/python
# pytest in two worker processes (pytest-xdist): most tests wait on sockets,
# timers and child processes, so two workers on two cores halve the wall time
# (10:43 -> 5:52 for the normal run, 13:11 -> 7:14 under ASan, 2026-12-04).
# Every test picks its own ports and cleans up after itself, so any split works.
PYTEST=($PY -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}")
C_SOURCES=$(git ls-files 'loop/*.[ch]' 'http/*.[ch]' 'server/*.[ch]' 'tests/c/*.[ch]' 'tests/fuzz/*.c' 'bench/*.c' 2>/dev/null || true)

log "clang-format --dry-run --Werror (C sources)"
clang-format --dry-run --Werror $C_SOURCES

log "static analysis (gcc -fanalyzer, clang --analyze)"
bash scripts/analyze.sh

log "C engine tests (ctest, -Werror)"
cmake -S . -B build/ctest -G Ninja -DURING_BUILD_TESTS=ON -DURING_BUILD_MODULE=OFF -DURING_WERROR=ON >/dev/null
ninja -C build/ctest >/dev/null
(cd build/ctest && ctest --output-on-failure)

log "libFuzzer: the http/ codec for ${FUZZ_SECONDS:-60} s (clang, ASan+UBSan)"
cmake -S . -B build/fuzz -G Ninja -DCMAKE_C_COMPILER=clang -DURING_FUZZ=ON -DURING_BUILD_MODULE=OFF >/dev/null
ninja -C build/fuzz fuzz_http >/dev/null
rm -rf build/fuzz/corpus && mkdir -p build/fuzz/corpus
build/fuzz/fuzz_http -max_total_time="${FUZZ_SECONDS:-60}" -max_len=4096 -print_final_stats=1 \
    build/fuzz/corpus tests/fuzz/seeds 2>&1 | tail -4

log "Python tests (pytest; installed package)"
"${PYTEST[@]}" tests e2e

log "ASan+UBSan: C engine tests"
cmake -S . -B build/asan-ctest -G Ninja -DURING_BUILD_TESTS=ON -DURING_BUILD_MODULE=OFF \
      -DURING_SANITIZE=ON -DURING_WERROR=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
ninja -C build/asan-ctest >/dev/null
(cd build/asan-ctest && ctest --output-on-failure)

log "ASan+UBSan: Python tests against a sanitized build of the extension"
cmake -S . -B build/asan -G Ninja -DURING_SANITIZE=ON -DURING_WERROR=ON -DCMAKE_BUILD_TYPE=Debug \
      -DPython_EXECUTABLE="$PWD/$PY" >/dev/null
ninja -C build/asan >/dev/null
rm -rf build/asan/pkg && mkdir -p build/asan/pkg
cp -r python/uringloop python/uringserve build/asan/pkg/
rm -f build/asan/pkg/uringloop/_core*.so
cp build/asan/_core*.so build/asan/pkg/uringloop/
ASAN_RT=$(gcc -print-file-name=libasan.so)
UBSAN_RT=$(gcc -print-file-name=libubsan.so)
export LD_PRELOAD="$ASAN_RT:$UBSAN_RT" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
    UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONPATH="$PWD/build/asan/pkg"
# the sanitized module, not the one installed in .venv, is what the tests import
$PY -c "import uringloop._core as c, sys; p = c.__file__; print('testing', p); sys.exit(not p.startswith('$PWD/build/asan/pkg'))"
"${PYTEST[@]}" tests e2e
unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS PYTHONPATH
log "all tests passed"
