#!/usr/bin/env bash
# ThreadSanitizer run of the service tests (issue 17): builds kvgate and the integration
# tests with -DKVGATE_SANITIZE=thread (no CUDA) and runs the tests that stress threads
# (64 concurrent streams, cancel, deadline, a killed worker, shutdown, the 400-request
# burst). The spawned `kvgate` processes inherit TSAN_OPTIONS, so every process writes
# its reports to WORK/tsan.<pid>; the summary goes to WORK/summary.md (bench/results/tsan.md
# keeps the runs worth recording).
# With --deps-prefix (scripts/build-tsan-deps.sh's PREFIX) kvgate links abseil and gRPC
# built with ThreadSanitizer, which the reports need to be about kvgate (bench/results/tsan.md).
#   scripts/tsan-service-tests.sh [--build-dir DIR] [--filter REGEX] [--work DIR] [--deps-prefix DIR]
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build="$src/build-tsan"
filter='ConcurrencyTest|CancelTest|WorkerFailureTest|ManagerFailureTest|ShutdownTest|BurstTest'
work=""
deps=""
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build=$2; shift 2 ;;
    --filter) filter=$2; shift 2 ;;
    --work) work=$2; shift 2 ;;
    --deps-prefix) deps=$2; shift 2 ;;
    *) echo "tsan-service-tests: unknown argument $1" >&2; exit 2 ;;
  esac
done
work=${work:-$(mktemp -d /tmp/kvgate-tsan.XXXXXX)}
mkdir -p "$work"
deps_flags=()
if [ -n "$deps" ]; then
  deps_flags=(-DCMAKE_PREFIX_PATH="$deps" -DCMAKE_BUILD_RPATH="$deps/lib")
  export PKG_CONFIG_PATH="$deps/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
fi
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVGATE_WITH_CUDA=OFF \
  -DKVGATE_SANITIZE=thread "${deps_flags[@]}" > "$work/configure.log"
cmake --build "$build" -j "$(nproc)" --target kvgate integration_test > "$work/build.log" ||
  { tail -50 "$work/build.log"; exit 1; }
# Reports do not stop the process (all of them are collected); sanitizers/tsan.supp holds
# only system-library entries, each with why.
# Only the tests load the instrumented libraries (the build's protoc plugin must not).
[ -n "$deps" ] && export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Streams and queues wait 5x longer (the release bounds the tests assert stay as they are).
export KVGATE_TEST_TIME_SCALE=5
export TSAN_OPTIONS="log_path=$work/tsan halt_on_error=0 second_deadlock_stack=1 suppressions=$src/sanitizers/tsan.supp"
start=$(date +%s)
status=0
(cd "$build" && ctest --output-on-failure -L integration -R "$filter" --timeout 600) > "$work/ctest.log" 2>&1 || status=$?
elapsed=$(( $(date +%s) - start ))
reports=$(cat "$work"/tsan.* 2>/dev/null | grep -c "WARNING: ThreadSanitizer" || true)
summary=$(grep -E "tests passed|tests failed" "$work/ctest.log" | tail -1)
{
  echo "# ThreadSanitizer: service tests (scripts/tsan-service-tests.sh)"
  echo
  echo "Run $(date -u +%Y-%m-%dT%H:%M:%SZ) at $(git -C "$src" rev-parse --short HEAD) on $(nproc) cores;"
  echo "tests matching \`$filter\`, ${elapsed} s: $summary; ThreadSanitizer reports: $reports; abseil and gRPC: ${deps:-the system packages (uninstrumented)}."
  echo
  if [ "$reports" -gt 0 ]; then
    echo "First lines of each distinct report:"
    echo '```'
    cat "$work"/tsan.* | grep -A3 "WARNING: ThreadSanitizer" | head -80
    echo '```'
  fi
} > "$work/summary.md"
echo "tsan-service-tests: $summary; $reports reports (logs in $work)"
[ "$status" = 0 ] && [ "$reports" = 0 ]
