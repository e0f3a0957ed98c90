#!/usr/bin/env bash
# Proves the tests stand on the repository alone: clones HEAD into a fresh folder with no
# ../shared beside it, builds it (without CUDA: the gpu tests are not run here anyway) and
# runs every test that `make test` runs. Tests that need ../shared must report themselves
# skipped, and are listed; any failure fails this script.
#   scripts/test-without-shared.sh [--cmake-flags "FLAGS"] [--label-exclude REGEX] [--ctest-args "ARGS"] [WORK_DIR]
# --cmake-flags: extra configure flags (CI: "-DKVGATE_SANITIZE=address,undefined", so this
# clone is also the sanitizer build); --label-exclude: the ctest label regex left out
# (default "gpu"; CI: "gpu|integration"). ctest 3.25 honours only one -LE, so it is one
# option here, never a second -LE in --ctest-args; --ctest-args: other ctest arguments.
set -euo pipefail
source_dir=$(cd "$(dirname "$0")/.." && pwd)
cmake_flags=""
ctest_args=""
label_exclude="gpu"
while [ $# -gt 0 ]; do
  case "$1" in
    --cmake-flags) cmake_flags=$2; shift 2 ;;
    --ctest-args) ctest_args=$2; shift 2 ;;
    --label-exclude) label_exclude=$2; shift 2 ;;
    *) break ;;
  esac
done
work=${1:-$(mktemp -d /tmp/kvgate-no-shared.XXXXXX)}
jobs=$(nproc)
clone="$work/kvgate"
rm -rf "$clone"
git clone -q --no-local "$source_dir" "$clone"
if [ -e "$work/shared" ]; then
  echo "test-without-shared: $work/shared exists; use an empty work folder" >&2
  exit 1
fi
cmake -S "$clone" -B "$clone/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVGATE_WITH_CUDA=OFF $cmake_flags > "$work/configure.log"
cmake --build "$clone/build" -j "$jobs" > "$work/build.log" || { tail -50 "$work/build.log"; exit 1; }
cd "$clone/build"
# Sanitizer reports fail the test that triggered them, with a stack (cmake/sanitize.cmake).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$clone/sanitizers/lsan.supp}
# KVGATE_SHARED_DIR is unset on purpose: the tests look for ../shared beside the clone.
env -u KVGATE_SHARED_DIR ctest --output-on-failure -j "$jobs" -LE "$label_exclude" $ctest_args 2>&1 | tee "$work/ctest.log"
echo "test-without-shared: skipped (need ../shared):"
grep -E "\*\*\*Skipped|Not Run" "$work/ctest.log" || echo "  none"
