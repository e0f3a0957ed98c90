#!/usr/bin/env bash
# The README's demo: starts `kvgate serve` (router, KV manager, prefill and decode worker in
# one process) in the background, sends one request whose KV cache is compressed before it
# crosses from the prefill to the decode worker, prints the answer and the KV accounting,
# and stops the server.
#   scripts/demo.sh BUILD_DIR MODEL_DIR POLICY KEEP_RATIO PROMPT_KIND [serve flags...]
# PROMPT_KIND `needle` builds a needle-in-a-haystack question (bench/retrieval_tasks.md, the
# built-in haystack: nothing from ../shared) of about 2000 tokens; any other value is used
# as the prompt text itself (a story opening for TinyStories).
set -euo pipefail
build_dir=$1 model=$2 policy=$3 keep=$4 prompt_kind=$5
shift 5
kvgate="$build_dir/cli/kvgate"
log=$(mktemp)
"$kvgate" serve --model "$model" --port 0 "$@" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 1 300); do
  port=$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -n1)
  [ -n "$port" ] && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "demo: the server did not start" >&2; cat "$log" >&2; exit 1; }
echo "demo: kvgate serve is listening on 127.0.0.1:$port (router, KV manager, prefill and decode worker in one process)"
if [ "$prompt_kind" = needle ]; then
  key=falcon-472 value=5821934
  prompt=$(python3 -c '
import sys
filler = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
sentences = [filler[i % 5] for i in range(400)]
sentences.insert(int(0.35 * len(sentences)), "The special magic number for %s is %s." % (sys.argv[1], sys.argv[2]))
print(" ".join(sentences) + "\nQuestion: What is the special magic number for %s?\nAnswer:" % sys.argv[1], end="")
' "$key" "$value")
  echo "demo: a haystack of filler sentences hides \"The special magic number for $key is $value.\" at 35% depth;"
  echo "      the question at the end asks for it. Policy $policy keeps $keep of the prompt's KV cache."
  request=(--max-tokens 16 --stop $'\n')
else
  prompt=$prompt_kind
  request=(--max-tokens 120 --temperature 0.7 --top-p 0.9 --seed 1 --stop "<|end_story|>")
fi
request=(generate --server "127.0.0.1:$port" --prompt "$prompt" "${request[@]}" --policy "$policy" --keep-ratio "$keep" --json)
# Until the workers have registered with the KV manager the server answers UNAVAILABLE.
for _ in $(seq 1 100); do
  if out=$("$kvgate" "${request[@]}" 2>&1); then break; fi
  case "$out" in *UNAVAILABLE*) sleep 0.1 ;; *) echo "$out" >&2; exit 1 ;; esac
done
echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
kv, t, n = r["kv"], r["timings"], r["usage"]["completion_tokens"]
print("answer:" if sys.argv[1] == "needle" else "text:", r["text"].strip())
print()
print("prompt %d tokens; KV policy %s kept %d of %d entries (%.0f%%): %d bytes moved from the prefill to the "
      "decode worker instead of %d" % (r["usage"]["prompt_tokens"], kv["policy"], kv["kv_entries_kept"],
      kv["kv_entries_full"], 100 * kv["keep_fraction"], kv["bytes_transferred"], kv["bytes_full"]))
print("%d tokens (%s); time to first token %.1f ms, %.2f ms per output token"
      % (n, r["finish_reason"], t["time_to_first_token_ms"], t["time_per_output_token_ms"]))
' "$prompt_kind"
