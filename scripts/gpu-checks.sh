#!/usr/bin/env bash
# Runs every GPU check on a machine with a GPU, from a bundle made by
# scripts/pack-gpu-bundle.sh; run from the repository root (fixtures are read from
# tests/golden). Logs go to OUT_DIR.
#   scripts/gpu-checks.sh BUNDLE_DIR OUT_DIR [TINYSTORIES_DIR]
set -uo pipefail
bundle=$(realpath "${1:?bundle dir}")
out=${2:?out dir}
tinystories=${3:-../shared/models/tinystories-656k}
mkdir -p "$out"
export LD_LIBRARY_PATH="$bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export KVGATE_SOURCE_DIR=$(pwd)
# The cpu/cuda "identical tokens" checks below compare float32 arithmetic on both sides;
# the bf16 default of the CUDA backend is measured by bench/gpu_engine_bench.sh.
export KVGATE_WEIGHT_DTYPE=fp32
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
echo "== cuda_backend_test (parity of every CUDA op with its CPU reference)"
"$bundle/bin/cuda_backend_test" > "$out/cuda_backend_test.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$out/cuda_backend_test.log" | sort | uniq -c | head -20
echo "== golden_model_test (cpu and cuda backends against transformers)"
"$bundle/bin/golden_model_test" > "$out/golden_model_test.log" 2>&1 || status=1
grep -E "golden\]|^\[  (PASSED|FAILED|SKIPPED) " "$out/golden_model_test.log"
echo "== kvgate generate on both backends (greedy, same tokens expected)"
for backend in cpu cuda; do
  "$bundle/bin/kvgate" generate --model "$tinystories" --prompt "One day, a little dog named Max" \
    --max-tokens 64 --ignore-eos --json --backend "$backend" > "$out/generate-$backend.json" || status=1
done
python3 - "$out" <<'PY' || status=1
import json, sys
out = sys.argv[1]
cpu = json.load(open(f"{out}/generate-cpu.json")); cuda = json.load(open(f"{out}/generate-cuda.json"))
print("cpu :", cpu["timings"]); print("cuda:", cuda["timings"])
same = cpu["token_ids"] == cuda["token_ids"]
print("identical greedy tokens on cpu and cuda:", same)
sys.exit(0 if same else 1)
PY
echo "== eviction policies over the head-paged cache on both backends (keep 0.3, greedy)"
for policy in streaming_llm snapkv sage_kv kvzip; do
  for backend in cpu cuda; do
    "$bundle/bin/kvgate" generate --model "$tinystories" \
      --prompt "Once upon a time, there was a little girl named Lily. She liked to play with her toys in the garden." \
      --max-tokens 48 --ignore-eos --json --backend "$backend" --policy "$policy" --keep-ratio 0.3 \
      > "$out/policy-$policy-$backend.json" || status=1
  done
done
python3 - "$out" <<'PY' || status=1
import json, sys
out, ok = sys.argv[1], True
for policy in ("streaming_llm", "snapkv", "sage_kv", "kvzip"):
    cpu = json.load(open(f"{out}/policy-{policy}-cpu.json")); cuda = json.load(open(f"{out}/policy-{policy}-cuda.json"))
    same = cpu["token_ids"] == cuda["token_ids"] and cpu["kv"]["kv_entries_kept"] == cuda["kv"]["kv_entries_kept"]
    ok &= same
    print(f"{policy:14s} kept {cuda['kv']['kv_entries_kept']}/{cuda['kv']['kv_entries_full']} "
          f"pages {cuda['kv']['pages_used']} identical cpu/cuda: {same}")
sys.exit(0 if ok else 1)
PY
echo "== overall status $status"
exit $status
