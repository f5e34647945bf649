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
findings=$(mktemp -d)
trap 'rm -rf "$findings"' EXIT
# One file per job, as many jobs as cores (each analyzer is single-threaded;
# one file after another took two minutes on 2 cores). Each file's
# messages go to a file of their own, so that two jobs' never interleave; a
# compiler that fails (an error, not a finding) fails the run too.
analyze_one() {
    local f=$1 log
    log="$FINDINGS/$(echo "$f" | tr / _)"
    gcc -fanalyzer -O1 -c $INCLUDES_WORDS "$f" -o /dev/null 2>>"$log" &&
        clang --analyze $INCLUDES_WORDS "$f" -o /dev/null 2>>"$log"
}
export -f analyze_one
export FINDINGS=$findings INCLUDES_WORDS="${INCLUDES[*]}"  # no path here has a space
status=0
printf '%s\n' $SOURCES | xargs -P "$(nproc)" -n 1 bash -c 'analyze_one "$1"' _ || status=$?
out="$findings/all"
cat "$findings"/* > "$out" 2>/dev/null || true
if [ "$status" -ne 0 ] || grep -q "warning:" "$out"; then
    cat "$out"
    echo "static analysis: $(grep -c 'warning:' "$out" || true) finding(s), analyzer exit status $status" >&2
    exit 1
fi
echo "static analysis: no findings in $(echo "$SOURCES" | wc -w) files (gcc -fanalyzer, clang --analyze)"
