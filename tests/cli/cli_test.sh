#!/usr/bin/env bash
# The kvgate binary as a user runs it: real processes, our bundled checkpoint
# (models/kvgate-tiny). Checks output shapes, exit codes and that every bad input gets a
# clear message (never a crash). cli_shared_test.sh does the checks that need ../shared.
#   cli_test.sh PATH_TO_KVGATE SOURCE_DIR
set -uo pipefail
kvgate=${1:?kvgate binary}
source_dir=${2:?source dir}
model="$source_dir/models/kvgate-tiny"
entries_per_token=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["num_hidden_layers"] * c["num_key_value_heads"])' "$model/config.json")
failures=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# expect_error EXIT_CODE MESSAGE_FRAGMENT -- ARGS...
expect_error() {
  local want_code=$1 want_message=$2
  shift 3
  "$kvgate" "$@" > "$tmp/out" 2> "$tmp/err"
  local code=$?
  if [ "$code" -ne "$want_code" ]; then fail "kvgate $* exited $code, want $want_code: $(cat "$tmp/err")"; return; fi
  if ! grep -qF -- "$want_message" "$tmp/err"; then fail "kvgate $*: stderr lacks '$want_message': $(cat "$tmp/err")"; fi
}

# Offline generation, JSON shape.
"$kvgate" generate --model "$model" --prompt "Once upon a time" --max-tokens 8 --json > "$tmp/gen.json" || fail "generate exited $?"
python3 - "$tmp/gen.json" "$entries_per_token" <<'PY' || fail "generate --json output"
import json, sys
r = json.load(open(sys.argv[1]))
for key in ("text", "token_ids", "finish_reason", "usage", "kv", "timings"):
    assert key in r, key
assert len(r["token_ids"]) == 8 and r["finish_reason"] == "length", r
prompt_tokens = r["usage"]["prompt_tokens"]
assert r["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8} and prompt_tokens > 1, r["usage"]
assert r["kv"]["kv_entries_full"] == int(sys.argv[2]) * prompt_tokens and r["kv"]["policy"] == "full", r["kv"]
assert r["timings"]["prefill_ms"] > 0
PY

# --prompt-ids are used exactly as given: same ids as the tokenized text, same output.
ids=$("$kvgate" tokenize --model "$model" --text "Once upon a time" --json | python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["ids"])))')
# The tokenizer's ids equal Hugging Face's: engine/tokenizer_test.cc and the golden
# corpora; here only that `tokenize` prints what `generate` encodes.
"$kvgate" generate --model "$model" --prompt-ids "$ids" --max-tokens 8 --json > "$tmp/gen_ids.json" || fail "generate --prompt-ids"
python3 -c 'import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); assert a["token_ids"]==b["token_ids"]' \
  "$tmp/gen.json" "$tmp/gen_ids.json" || fail "--prompt-ids and --prompt disagree"

# Sampling with a seed is reproducible.
a=$("$kvgate" generate --model "$model" --prompt "The cat" --max-tokens 16 --temperature 1 --top-k 40 --top-p 0.9 --seed 5 --json)
b=$("$kvgate" generate --model "$model" --prompt "The cat" --max-tokens 16 --temperature 1 --top-k 40 --top-p 0.9 --seed 5 --json)
[ "$(echo "$a" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')" = \
  "$(echo "$b" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')" ] || fail "seeded sampling not reproducible"

# Eviction: the kv object reports what was kept, and 70% eviction keeps about 30%.
"$kvgate" generate --model "$model" --prompt "Once upon a time, there was a little girl named Lily. She liked to play" \
  --max-tokens 8 --policy kvzip --keep-ratio 0.3 --json > "$tmp/evict.json" || fail "generate --policy kvzip exited $?"
python3 - "$tmp/evict.json" <<'PY' || fail "generate --policy kvzip output"
import json, sys
kv = json.load(open(sys.argv[1]))["kv"]
assert kv["policy"] == "kvzip", kv
assert kv["kv_entries_kept"] < kv["kv_entries_full"], kv
assert abs(kv["keep_fraction"] - kv["kv_entries_kept"] / kv["kv_entries_full"]) < 1e-9, kv
assert 0.2 < kv["keep_fraction"] < 0.45, kv
assert kv["bytes_kept"] * kv["kv_entries_full"] == kv["bytes_full"] * kv["kv_entries_kept"], kv
assert kv["pages_used"] > 0, kv
PY

# Bad inputs: exit 1 (runtime) or 2 (usage), with a message naming the problem.
mkdir -p "$tmp/bad"
expect_error 1 "does not exist" -- generate --model "$tmp/missing" --prompt hi
expect_error 1 "config.json" -- generate --model "$tmp/bad" --prompt hi
cp "$model"/config.json "$model"/tokenizer.json "$tmp/bad/"
expect_error 1 "model.safetensors" -- generate --model "$tmp/bad" --prompt hi
head -c 1000 "$model/model.safetensors" > "$tmp/bad/model.safetensors"
expect_error 1 "INVALID_ARGUMENT" -- generate --model "$tmp/bad" --prompt hi
sed 's/LlamaForCausalLM/GPTNeoXForCausalLM/' "$model/config.json" > "$tmp/bad/config.json"
expect_error 1 "GPTNeoXForCausalLM' is not supported" -- generate --model "$tmp/bad" --prompt hi
expect_error 1 "outside the vocabulary" -- generate --model "$model" --prompt-ids 1,4096
expect_error 1 "outside the vocabulary" -- generate --model "$model" --prompt-ids 1,-3
long_ids=$(python3 -c 'print(",".join(["5"] * 4100))')
expect_error 1 "context is 4096" -- generate --model "$model" --prompt-ids "$long_ids"
expect_error 1 "max_tokens" -- generate --model "$model" --prompt hi --max-tokens 4100
expect_error 2 "--max-tokens must be at least 1" -- generate --model "$model" --prompt hi --max-tokens 0
expect_error 1 "temperature" -- generate --model "$model" --prompt hi --temperature nan
expect_error 1 "top_p" -- generate --model "$model" --prompt hi --top-p 1.5
expect_error 2 "exactly one of --prompt" -- generate --model "$model"
expect_error 2 "unknown flag --bogus" -- generate --model "$model" --prompt hi --bogus
expect_error 2 "not an integer" -- generate --model "$model" --prompt-ids 1,x
# --backend cuda works on a GPU machine; elsewhere it says why (never crashes).
if ! "$kvgate" generate --model "$model" --prompt hi --backend cuda > /dev/null 2> "$tmp/err"; then
  grep -qE "UNIMPLEMENTED|UNAVAILABLE" "$tmp/err" || fail "--backend cuda without a GPU: $(cat "$tmp/err")"
fi
expect_error 2 "unknown eviction policy 'h2o'" -- generate --model "$model" --prompt hi --policy h2o
expect_error 2 "--keep-ratio must be in (0, 1]" -- generate --model "$model" --prompt hi --policy snapkv --keep-ratio 0
expect_error 2 "--keep-ratio must be in (0, 1], got 1.5" -- generate --model "$model" --prompt hi --policy snapkv --keep-ratio 1.5
expect_error 2 "budget_tokens" -- generate --model "$model" --prompt hi --policy snapkv --budget-tokens -4
expect_error 2 "needs trained gate weights" -- generate --model "$model" --prompt hi --policy fast_kvzip
expect_error 1 "cannot open" -- generate --model "$model" --prompt hi --policy attention_gate --gates "$tmp/missing.safetensors"
expect_error 1 "unknown backend" -- generate --model "$model" --prompt hi --backend tpu
expect_error 2 "unknown command" -- frobnicate

if [ "$failures" -ne 0 ]; then
  echo "$failures failure(s)"
  exit 1
fi
echo "cli_test: all checks passed"
