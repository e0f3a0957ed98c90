#!/usr/bin/env bash
# Proves the tests stand on the repository alone: clones HEAD into a fresh folder with no
# ../shared beside it, builds it (without CUDA: the gpu tests are not run here anyway) and
# runs every test that `make test` runs. Tests that need ../shared must report themselves
# skipped, and are listed; any failure fails this script.
#   scripts/test-without-shared.sh [WORK_DIR]
set -euo pipefail
source_dir=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d /tmp/kvgate-no-shared.XXXXXX)}
jobs=$(nproc)
clone="$work/kvgate"
rm -rf "$clone"
git clone -q --no-local "$source_dir" "$clone"
if [ -e "$work/shared" ]; then
  echo "test-without-shared: $work/shared exists; use an empty work folder" >&2
  exit 1
fi
cmake -S "$clone" -B "$clone/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVGATE_WITH_CUDA=OFF > "$work/configure.log"
cmake --build "$clone/build" -j "$jobs" > "$work/build.log" || { tail -50 "$work/build.log"; exit 1; }
cd "$clone/build"
# KVGATE_SHARED_DIR is unset on purpose: the tests look for ../shared beside the clone.
env -u KVGATE_SHARED_DIR ctest --output-on-failure -j "$jobs" -LE gpu 2>&1 | tee "$work/ctest.log"
echo "test-without-shared: skipped (need ../shared):"
grep -E "\*\*\*Skipped|Not Run" "$work/ctest.log" || echo "  none"
