#!/usr/bin/env bash
# Static analysis of the C sources (loop/, http/, server/) with GCC's
# -fanalyzer and clang's analyzer: any finding fails the run. Both look for
# NULL dereferences, leaks, double frees and use after free along each path
# through a function (GCC's found a NULL item reaching Py_DECREF in the
# datagram reader's drain after a failed allocation). Called by scripts/test.sh;
# takes about a minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYINC=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
INCLUDES=(-I loop -I http -I server -I /usr/share/include/llhttp -I "$PYINC")
SOURCES=$(git ls-files 'loop/*.c' 'http/*.c' 'server/*.c')
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for f in $SOURCES; do
    gcc -fanalyzer -O1 -c "${INCLUDES[@]}" "$f" -o /dev/null 2>>"$out"
    clang --analyze "${INCLUDES[@]}" "$f" -o /dev/null 2>>"$out"
done
if grep -q "warning:" "$out"; then
    cat "$out"
    echo "static analysis: $(grep -c 'warning:' "$out") finding(s)" >&2
    exit 1
fi
echo "static analysis: no findings in $(echo "$SOURCES" | wc -w) files (gcc -fanalyzer, clang --analyze)"
