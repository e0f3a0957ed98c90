#!/usr/bin/env bash
# Runs every libFuzzer target of fuzz/ (or one) from its committed seed corpus, for a
# fixed time or number of executions each, and records the result in
# bench/results/fuzz.md and fuzz.json (date, commit, machine, execs, execs/s, coverage,
# features, corpus size). A crash, leak, timeout or sanitizer report fails the script and
# leaves the input in WORK/artifacts/.
#
#   fuzz/run_all.sh [--build] [--build-dir DIR] [--seconds N | --runs N] [--only TARGET]
#                   [--work DIR] [--no-record | --append] [--jobs N]
#
#   --build       configure (clang, -DKVGATE_FUZZ=ON, ASan+UBSan, no CUDA) and build only
#                 the fuzz targets and the libraries they link into --build-dir
#   --build-dir   default: build-fuzz
#   --seconds N   per target (default 60); --runs N: executions per target instead
#   --only A,B    these targets only
#   --no-record   do not write bench/results/fuzz.{md,json} (CI's smoke run)
#   --append      add this run to fuzz.md / fuzz.json instead of replacing them
# The committed corpora are read, never written: each run grows a copy under WORK.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build_dir="$src/build-fuzz"
seconds=60
runs=""
only=""
work=""
record=1
append=0
do_build=0
jobs=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --build) do_build=1 ;;
    --build-dir) build_dir=$2; shift ;;
    --seconds) seconds=$2; shift ;;
    --runs) runs=$2; shift ;;
    --only) only=$2; shift ;;
    --work) work=$2; shift ;;
    --no-record) record=0 ;;
    --append) append=1 ;;
    --jobs) jobs=$2; shift ;;
    *) echo "run_all: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
targets=(tokenizer_fuzz safetensors_fuzz model_config_fuzz handoff_fuzz chunk_stream_fuzz
         proto_convert_fuzz generate_request_fuzz)
if [ -n "$only" ]; then IFS=, read -r -a targets <<< "$only"; fi
work=${work:-$(mktemp -d /tmp/kvgate-fuzz.XXXXXX)}
mkdir -p "$work/artifacts"

if [ "$do_build" = 1 ]; then
  CC=clang CXX=clang++ cmake -S "$src" -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DKVGATE_WITH_CUDA=OFF -DKVGATE_SANITIZE=address,undefined -DKVGATE_FUZZ=ON > "$work/configure.log"
  cmake --build "$build_dir" -j "$jobs" --target "${targets[@]}" > "$work/build.log" ||
    { tail -50 "$work/build.log"; exit 1; }
fi

export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$src/sanitizers/lsan.supp}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

# One line per target: name execs seconds execs_per_s cov ft corpus_files corpus_bytes status
results=()
failed=0
for t in "${targets[@]}"; do
  bin="$build_dir/fuzz/$t"
  [ -x "$bin" ] || { echo "run_all: $bin not built" >&2; exit 1; }
  corpus="$work/corpus/$t"
  mkdir -p "$corpus"
  args=(-artifact_prefix="$work/artifacts/$t-" -print_final_stats=1 -timeout=25 -rss_limit_mb=4096
        -max_len=65536)
  [ -f "$src/fuzz/$t.dict" ] && args+=(-dict="$src/fuzz/$t.dict")
  if [ -n "$runs" ]; then args+=(-runs="$runs"); else args+=(-max_total_time="$seconds"); fi
  echo "run_all: $t ${runs:+$runs runs}${runs:-$seconds s}"
  start=$(date +%s)
  status=ok
  seeds=()
  [ -d "$src/fuzz/${t}_corpus" ] && seeds=("$src/fuzz/${t}_corpus")
  "$bin" "${args[@]}" "$corpus" "${seeds[@]}" > "$work/$t.log" 2>&1 || status=FAILED
  elapsed=$(( $(date +%s) - start ))
  done_line=$(grep -E "^#[0-9]+.*(DONE|cov:)" "$work/$t.log" | tail -1 || true)
  execs=$(grep -oE "stat::number_of_executed_units: +[0-9]+" "$work/$t.log" | grep -oE "[0-9]+$" || echo 0)
  eps=$(grep -oE "stat::average_exec_per_sec: +[0-9]+" "$work/$t.log" | grep -oE "[0-9]+$" || echo 0)
  cov=$(echo "$done_line" | grep -oE "cov: [0-9]+" | grep -oE "[0-9]+" || echo 0)
  ft=$(echo "$done_line" | grep -oE "ft: [0-9]+" | grep -oE "[0-9]+" || echo 0)
  files=$(find "$corpus" "${seeds[@]}" -type f | wc -l)
  bytes=$(find "$corpus" "${seeds[@]}" -type f -exec cat {} + | wc -c)
  results+=("$t $execs $elapsed $eps $cov $ft $files $bytes $status")
  echo "run_all: $t $status: $execs execs in ${elapsed}s ($eps/s), cov $cov, ft $ft, corpus $files files"
  if [ "$status" != ok ]; then
    failed=1
    grep -E "ERROR|SUMMARY|fuzz check failed|Test unit written" "$work/$t.log" | head -20 >&2
  fi
done

if [ "$record" = 1 ]; then
  out="$src/bench/results"
  mkdir -p "$out"
  commit=$(git -C "$src" rev-parse --short HEAD)
  dirty=$(git -C "$src" status --porcelain --untracked-files=no | grep -q . && echo true || echo false)
  machine="$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1 /proc/loadavg)), $(clang --version | head -1)"
  # The rows go through a file: python's stdin carries the script itself.
  printf '%s\n' "${results[@]}" > "$work/results.txt"
  if [ -n "$runs" ]; then budget="--runs $runs"; else budget="--seconds $seconds"; fi
  python3 - "$out" "$commit" "$dirty" "$machine" "$budget" "$append" \
      "$work/results.txt" <<'PY'
import datetime, json, os, sys
out, commit, dirty, machine, budget, append, results = sys.argv[1:8]
rows = []
for line in open(results).read().split("\n"):
    if not line.strip():
        continue
    t, execs, secs, eps, cov, ft, files, size, result = line.split()
    rows.append(dict(target=t, result=result, execs=int(execs), seconds=int(secs), execs_per_s=int(eps),
                     cov=int(cov), ft=int(ft), corpus_files=int(files), corpus_bytes=int(size)))
run = dict(date=datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"), commit=commit,
           dirty=dirty == "true", machine=machine, budget=budget, targets=rows)
jpath, mpath = os.path.join(out, "fuzz.json"), os.path.join(out, "fuzz.md")
runs = []
if append == "1" and os.path.exists(jpath):
    runs = json.load(open(jpath))["runs"]
runs.append(run)
json.dump({"runs": runs}, open(jpath, "w"), indent=1)
md = ["# Fuzzing: fuzz/run_all.sh", "",
      "libFuzzer with ASan + UBSan (+ LeakSanitizer), one process per target, from the committed",
      "seed corpus. cov = covered edges, ft = libFuzzer features, corpus = seeds + inputs kept.",
      "Raw numbers: `fuzz.json`."]
for r in runs:
    md += ["", "## %s at %s%s" % (r["date"], r["commit"], " (+ uncommitted changes)" if r["dirty"] else ""), "",
           "`fuzz/run_all.sh %s` on %s." % (r["budget"], r["machine"]), "",
           "| target | result | execs | seconds | execs/s | cov | ft | corpus files | corpus bytes |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    md += ["| %(target)s | %(result)s | %(execs)d | %(seconds)d | %(execs_per_s)d | %(cov)d | %(ft)d | %(corpus_files)d | %(corpus_bytes)d |" % t
           for t in r["targets"]]
open(mpath, "w").write("\n".join(md) + "\n")
PY
  echo "run_all: wrote $out/fuzz.md and fuzz.json"
fi
exit $failed
