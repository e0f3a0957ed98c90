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
echo "== status $status"
exit $status
