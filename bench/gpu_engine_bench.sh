#!/usr/bin/env bash
# The GPU engine benchmark in one call on the GPU machine, from the repository root:
# parity tests of the bf16 ops and of the whole CUDA backend, then
# bench/gpu_engine_bench.py (kvgate fp32 and bf16, pure PyTorch, transformers, floors).
# BUNDLE is a folder or .tar.xz from scripts/pack-gpu-bundle.sh; logs and results go to
# OUT_DIR; further arguments go to the .py (e.g. --prefill 2048,8192).
#   bench/gpu_engine_bench.sh BUNDLE OUT_DIR [args...]
set -uo pipefail
bundle=${1:?bundle}
out=${2:?out dir}
shift 2
mkdir -p "$out"
if [[ "$bundle" == *.tar.xz ]]; then
  tar -C /tmp -xJf "$bundle"
  bundle=/tmp/$(basename "${bundle%.tar.xz}")
fi
bundle=$(realpath "$bundle")
export LD_LIBRARY_PATH="$bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
export KVGATE_SOURCE_DIR=$(pwd)
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
for t in cuda_bf16_ops_test cuda_backend_test; do
  [[ -x "$bundle/bin/$t" ]] || continue
  echo "== $t"
  "$bundle/bin/$t" > "$out/$t.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]" "$out/$t.log" | sort | uniq -c | head -30
done
# The previous head-paged decode core (KVGATE_TILED_DECODE=0) against the same references.
if [[ -x "$bundle/bin/cuda_backend_test" ]]; then
  echo "== cuda_backend_test, KVGATE_TILED_DECODE=0"
  KVGATE_TILED_DECODE=0 "$bundle/bin/cuda_backend_test" --gtest_filter='*HeadPaged*' > "$out/cuda_backend_test_untiled.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]" "$out/cuda_backend_test_untiled.log" | sort | uniq -c | head -30
fi
# The handoff, batch and transport invariants of the pool, on the cuda backend against itself.
for t in kv_handoff_test decode_batch_test tcp_transport_test decode_step_tables_test; do
  [[ -x "$bundle/bin/$t" ]] || continue
  echo "== $t (KVGATE_TEST_BACKEND=cuda)"
  KVGATE_TEST_BACKEND=cuda "$bundle/bin/$t" > "$out/${t}_cuda.log" 2>&1 || status=1
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]" "$out/${t}_cuda.log" | sort | uniq -c | head -30
done
if [[ -x "$bundle/bin/golden_model_test" ]]; then
  # The CUDA backend now defaults to bf16 weights; the fp32 run is the path before.
  for dtype in bf16 fp32; do
    echo "== golden_model_test, cuda weights $dtype"
    if [[ $dtype == fp32 ]]; then
      KVGATE_WEIGHT_DTYPE=fp32 "$bundle/bin/golden_model_test" > "$out/golden_model_test_$dtype.log" 2>&1 || status=1
    else
      "$bundle/bin/golden_model_test" > "$out/golden_model_test_$dtype.log" 2>&1 || status=1
    fi
    grep -E "golden\]|^\[  (PASSED|FAILED|SKIPPED) " "$out/golden_model_test_$dtype.log" | head -20
  done
fi
echo "== bench"
python3 bench/gpu_engine_bench.py --bench-bin "$bundle/bin/gpu_engine_bench" --out-dir "$out" \
  --commit "$(cat "$bundle/COMMIT")" "$@" 2> "$out/bench.log" || status=1
tail -5 "$out/bench.log"
if [[ -n "${KVGATE_BENCH_PROFILE:-}" ]] && command -v ncu > /dev/null; then
  # Kernel time of one bf16 prefill of $KVGATE_BENCH_PROFILE tokens (the second forward:
  # the first warms up), summed per kernel name.
  echo "== ncu: one bf16 prefill of $KVGATE_BENCH_PROFILE tokens"
  timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
    --launch-skip 131 --launch-count 131 \
    "$bundle/bin/gpu_engine_bench" --model /tmp/kvgate-llama31-8l --weights bf16 \
    --prefill "$KVGATE_BENCH_PROFILE" --decode 16 --decode-steps 1 --repeats 1 > "$out/ncu.log" 2>&1 || true
  grep -E "^  [A-Za-z_].*\(|gpu__time_duration.sum" "$out/ncu.log" | paste - - | \
    awk '{print}' | cut -c1-200 | head -40
  # Speed of light, compute, memory and occupancy of one attention launch (layer 2).
  echo "== ncu: one AttentionBf16 launch"
  timeout 120 ncu --clock-control none --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section Occupancy -k regex:AttentionBf16Kernel --launch-skip 9 \
    --launch-count 1 "$bundle/bin/gpu_engine_bench" --model /tmp/kvgate-llama31-8l --weights bf16 \
    --prefill "$KVGATE_BENCH_PROFILE" --decode 16 --decode-steps 1 --repeats 1 >> "$out/ncu.log" 2>&1 || true
  grep -E "Throughput|Pipe|Occupancy|Registers|Duration|Issue|Bank" "$out/ncu.log" | tail -30
fi
if [[ -n "${KVGATE_BENCH_PROFILE_DECODE:-}" ]] && command -v ncu > /dev/null; then
  # Kernel times of one bf16 decode step at a context of $KVGATE_BENCH_PROFILE_DECODE
  # tokens: every launch of the run (the context's prefill, then 3 steps) is timed, and
  # the launches after the last EmbedBf16 (the last step) are listed in order.
  echo "== ncu: one bf16 decode step at $KVGATE_BENCH_PROFILE_DECODE"
  timeout 300 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
    "$bundle/bin/gpu_engine_bench" --model /tmp/kvgate-llama31-8l --weights bf16 --prefill "" \
    --decode "$KVGATE_BENCH_PROFILE_DECODE" --decode-steps 1 --repeats 1 > "$out/ncu_decode.csv" 2>&1 || true
  python3 - "$out/ncu_decode.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and r[0].strip('"').isdigit()]
header_name, value = 4, -1
last = max(i for i, r in enumerate(rows) if "Embed" in r[header_name])
step = rows[last:]
total = collections.OrderedDict()
for r in step:
    name = r[header_name].replace("void ", "").replace("(anonymous namespace)::", "")
    name = name.split("(")[0].split("<")[0][-60:]
    scale = {"nsecond": 1.0, "usecond": 1e3, "msecond": 1e6}.get(r[value - 1], 1.0)
    total[name] = total.get(name, 0.0) + float(r[value].replace(",", "")) * scale
print(f"launches in the step: {len(step)}; kernel time {sum(total.values()) / 1e3:.1f} us")
for name, t in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"  {t / 1e3:9.1f} us  {name}")
PY
fi
echo "== status $status"
exit $status
