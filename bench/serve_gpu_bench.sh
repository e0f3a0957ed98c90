#!/usr/bin/env bash
# `kvgate serve --backend cuda` under concurrent streams, measured with the project's own
# client (`kvgate bench`): the issue-10 figure "48 concurrent 2k-token prompts, 128 new
# tokens" on the 8-layer Llama-3.1-8B-shaped random checkpoint of gpu_engine_bench.py
# (written here when absent). Also samples the GPU memory of the server process, and
# bench/serve_gpu_report.py measures the floors in the same run and writes
# serve-gpu.md/.json (the prefill worker stages prompts of at most prompt + 256 tokens:
# --max-prompt-tokens, instead of one whole 128k-token context).
# Run from the repository root on the GPU machine; BUNDLE as in gpu_engine_bench.sh.
#   bench/serve_gpu_bench.sh BUNDLE OUT_DIR [--concurrency N=48] [--requests N=96]
#       [--prompt-tokens N=2048] [--max-tokens N=128] [--policy-mix MIX=full:1]
#       [--kv-cache-dtype auto|float32|bf16 (serve's flag; auto = bf16 on cuda)]
set -uo pipefail
bundle=${1:?bundle}
out=${2:?out dir}
shift 2
concurrency=48 requests=96 prompt_tokens=2048 max_tokens=128 policy_mix="full:1" kv_dtype=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --concurrency) concurrency=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --prompt-tokens) prompt_tokens=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --policy-mix) policy_mix=$2; shift 2 ;;
    --kv-cache-dtype) kv_dtype=$2; shift 2 ;;
    *) echo "serve_gpu_bench: unknown flag $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
if [[ "$bundle" == *.tar.xz ]]; then
  [[ -d /tmp/$(basename "${bundle%.tar.xz}") ]] || tar -C /tmp -xJf "$bundle"
  bundle=/tmp/$(basename "${bundle%.tar.xz}")
fi
bundle=$(realpath "$bundle")
export LD_LIBRARY_PATH="$bundle/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
model=/tmp/kvgate-llama31-8l
if [[ ! -f $model/model.safetensors ]]; then
  python3 -c "import sys; sys.path.insert(0, 'bench'); import gpu_engine_bench as g; \
g.write_checkpoint(g.make_weights(), '$model')" || exit 1
fi
port=18000
# The decode pool: every stream's prompt and output, 16-token pages per (layer, kv head)
# of the 8-layer, 8-kv-head model, plus 10% (the checkpoint's context is 128k tokens, so
# --kv-sequences would size the pool for 128k-token sequences).
kv_pages=$(( (concurrency + 2) * ((prompt_tokens + max_tokens + 15) / 16) * 64 * 11 / 10 ))
"$bundle/bin/kvgate" serve --model "$model" --backend cuda --port $port --host 127.0.0.1 \
  --kv-pages "$kv_pages" --max-in-flight $((concurrency + 8)) --max-prompt-tokens $((prompt_tokens + 256)) \
  --kv-cache-dtype "$kv_dtype" > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2> /dev/null && break
  kill -0 $server 2> /dev/null || { echo "serve exited:"; tail -20 "$out/serve.log"; exit 1; }
  sleep 0.5
done
(
  while kill -0 $server 2> /dev/null; do
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | \
      awk -v p=$server -F', ' '$1 == p {print $2}'
    sleep 0.5
  done
) > "$out/serve-memory-mib.txt" &
sampler=$!
start=$(date +%s.%N)
"$bundle/bin/kvgate" bench --server 127.0.0.1:$port --concurrency "$concurrency" --requests "$requests" \
  --warmup 2 --prompt-tokens "$prompt_tokens" --max-tokens "$max_tokens" --policy-mix "$policy_mix" \
  --json "$out/serve-bench.json" --name "serve-cuda-c$concurrency" 2>&1 | tail -30
status=${PIPESTATUS[0]}
echo "bench wall: $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
kill $server 2> /dev/null
wait $server 2> /dev/null
kill $sampler 2> /dev/null
peak=$(sort -n "$out/serve-memory-mib.txt" | tail -1)
echo "peak GPU memory of serve: ${peak:-?} MiB"
if [[ $status -eq 0 ]]; then
  python3 bench/serve_gpu_report.py "$out" --commit "$(cat "$bundle/COMMIT")" --concurrency "$concurrency" \
    --requests "$requests" --prompt-tokens "$prompt_tokens" --max-tokens "$max_tokens" --policy-mix "$policy_mix" \
    ${peak:+--peak-mib "$peak"} \
    --serve-flags "--kv-pages $kv_pages --max-in-flight $((concurrency + 8)) --max-prompt-tokens $((prompt_tokens + 256)) --kv-cache-dtype $kv_dtype" \
    > /dev/null || status=1
  cat "$out/serve-gpu.md"
fi
exit $status
