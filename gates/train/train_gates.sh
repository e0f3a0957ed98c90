#!/bin/sh
# Trains both learned gates of kvgate for one Hugging Face Llama-family checkpoint, on contexts
# the model samples itself (in-distribution; temperature 0.8, as bench/eval_kl), in one command:
#
#   gates/train/train_gates.sh MODEL_DIR OUT_DIR [cpu|cuda]
#
# writes OUT_DIR/{attention_gate,fast_kvzip}.safetensors, their .log.jsonl training logs and
# contexts.json (the sampled token ids, shared by both trainers). Environment overrides:
# PYTHON, CONTEXTS (sampled sequences, default 576), CONTEXT_TOKENS (default 512, capped by the
# trainers at the model's range), AG_ARGS / FK_ARGS (extra trainer flags). For text instead
# of sampled contexts, call the trainers directly with --data FILES.
set -eu
MODEL=$1
OUT=$2
DEVICE=${3:-cuda}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Attention-Gate: in-context eviction with the gates in the loop (recipe in gates/README.md).
$PY "$HERE/train_attention_gate.py" --model "$MODEL" --data "self:${CONTEXTS:-576}" \
  --context-tokens "${CONTEXT_TOKENS:-512}" --val-contexts 32 --steps 6000 --batch-size 16 --lr 1e-2 \
  --target-keep 0.3 --rate-weight 5 --rate-warmup 0.3 --device "$DEVICE" \
  --dump-contexts "$OUT/contexts.json" --out "$OUT/attention_gate.safetensors" ${AG_ARGS:-}
# Fast KVzip: KVzip targets on the same contexts, cut so that context + reconstruction fit the
# model's positions; the authors' SGD recipe.
$PY "$HERE/train_fast_kvzip_gate.py" --model "$MODEL" --data "$OUT/contexts.json" \
  --context-tokens "${CONTEXT_TOKENS:-512}" --steps 5000 --device "$DEVICE" \
  --out "$OUT/fast_kvzip.safetensors" ${FK_ARGS:-}
