#!/usr/bin/env bash
# The compiled reader under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds walcache/shm/_creader.c with -fsanitize=address,undefined into a temporary copy
# of src/ (the working tree's own build is left alone), then runs the C reader's fuzz,
# equivalence, model, thread and unit tests against that build. The fuzz reads every
# garbage table from a malloc'd bytes object of exactly the segment's size
# (PYTHONMALLOC=malloc), so a read one byte past the segment hits an ASan redzone and
# aborts the run.
#
# First, a control: the same build with the record bounds check compiled out
# (WALCACHE_TEST_DROP_BOUNDS_CHECK) must be caught by ASan, or this script fails: a
# sanitizer run that cannot fail proves nothing.
#
# Usage: scripts/asan_fuzz.sh [extra pytest args]      (PYTHON, CC and
# WALCACHE_FUZZ_SEEDS override the interpreter, the compiler and the seeds per fuzz test)
# Needs gcc (or clang) with its ASan runtime; about 30 s on 2 cores (fits in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CC=${CC:-gcc}

libasan=$("$CC" -print-file-name=libasan.so)
if [ ! -e "$libasan" ]; then
    echo "asan_fuzz: no AddressSanitizer runtime for $CC (install libasan / gcc)" >&2
    exit 2
fi
inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
ext=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

build() {  # build <dest src dir> [extra cflags]
    local dest=$1
    shift
    cp -r src "$dest"
    find "$dest" -name '_creader*.so' -delete
    "$CC" -shared -fPIC -std=c11 -O1 -g -fno-omit-frame-pointer \
        -fsanitize=address,undefined -fno-sanitize-recover=undefined "$@" \
        -I"$inc" src/walcache/shm/_creader.c -o "$dest/walcache/shm/_creader$ext" -lrt
}

run() {  # run <src dir> <pytest args...>
    local srcdir=$1
    shift
    env PYTHONPATH="$srcdir" PYTHONMALLOC=malloc LD_PRELOAD="$libasan" \
        ASAN_OPTIONS=detect_leaks=0:exitcode=86 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=87 \
        "$PY" -m pytest -p no:cacheprovider --capture=sys -q "$@"
}

echo "== control: bounds check compiled out; ASan must catch the overrun"
build "$tmp/control" -DWALCACHE_TEST_DROP_BOUNDS_CHECK
ls /dev/shm >"$tmp/shm.before" 2>/dev/null || true
set +e
run "$tmp/control" tests/shm_c/test_fuzz_c.py -x -k "garbage_records" >"$tmp/control.log" 2>&1
code=$?
set -e
# The aborted test could not unlink its segments (its fixture's tag is "garbager").
ls /dev/shm 2>/dev/null | grep -Fxv -f "$tmp/shm.before" | grep '^wctest-garbager-' | while read -r name; do
    rm -f "/dev/shm/$name"
done
if [ "$code" -ne 86 ] || ! grep -q "ERROR: AddressSanitizer" "$tmp/control.log"; then
    tail -60 "$tmp/control.log"
    echo "asan_fuzz: the control was NOT caught (exit $code): this run could not detect an overrun" >&2
    exit 1
fi
grep -m1 "ERROR: AddressSanitizer" "$tmp/control.log"
echo "   caught, as it must be"

echo "== the real reader under ASan/UBSan"
build "$tmp/asan"
loaded=$(env PYTHONPATH="$tmp/asan" LD_PRELOAD="$libasan" ASAN_OPTIONS=detect_leaks=0 \
    "$PY" -c 'import walcache.shm._creader as m; print(m.__file__)')
case "$loaded" in
    "$tmp/asan/"*) ;;
    *) echo "asan_fuzz: imported $loaded, not the sanitized build" >&2; exit 1 ;;
esac
run "$tmp/asan" tests/shm_c/test_fuzz_c.py tests/shm_c/test_equivalence.py tests/shm_c/test_table_c.py \
    tests/shm_c/test_model_c.py tests/shm_c/test_threads_c.py \
    tests/shm_c/test_hash_and_constants.py tests/shm_c/test_build_c.py tests/shm_c/test_result_cache.py "$@"
echo "asan_fuzz: clean"
