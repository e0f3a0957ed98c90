#!/usr/bin/env bash
# The README's demo: starts `kvgate serve` (every role in one process) in the background,
# sends one request whose KV cache is compressed at 70% eviction before it crosses from
# the prefill to the decode worker, prints the text and the KV accounting, and stops the
# server. Usage: scripts/demo.sh BUILD_DIR MODEL_DIR PROMPT POLICY [extra serve flags...]
set -euo pipefail
build_dir=$1 model=$2 prompt=$3 policy=$4
shift 4
kvgate="$build_dir/cli/kvgate"
log=$(mktemp)
"$kvgate" serve --model "$model" --port 0 "$@" >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
port=""
for _ in $(seq 1 200); do
  port=$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -n1)
  [ -n "$port" ] && break
  kill -0 $server 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$port" ] || { echo "demo: the server did not start" >&2; cat "$log" >&2; exit 1; }
echo "demo: kvgate serve is listening on 127.0.0.1:$port (router, kv-manager, prefill and decode in one process)"
request=(generate --server "127.0.0.1:$port" --prompt "$prompt" --max-tokens 120 --temperature 0.7 --top-p 0.9
         --seed 1 --stop "<|end_story|>" --policy "$policy" --keep-ratio 0.3)
# Until the workers have registered with the KV manager the server answers UNAVAILABLE.
for attempt in $(seq 1 50); do
  if out=$("$kvgate" "${request[@]}" --json 2>&1); then break; fi
  case "$out" in *UNAVAILABLE*) sleep 0.1 ;; *) echo "$out" >&2; exit 1 ;; esac
done
echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
kv, t, n = r["kv"], r["timings"], r["usage"]["completion_tokens"]
print(r["text"].strip())
print()
print("KV policy %s: kept %d of %d entries (%.0f%%); moved %d bytes from the prefill to the decode worker "
      "instead of %d" % (kv["policy"], kv["kv_entries_kept"], kv["kv_entries_full"], 100 * kv["keep_fraction"],
                         kv["bytes_transferred"], kv["bytes_full"]))
print("%d tokens (%s); time to first token %.1f ms, %.2f ms per output token"
      % (n, r["finish_reason"], t["time_to_first_token_ms"], t["time_per_output_token_ms"]))
'
