#!/usr/bin/env bash
# `kvgate eval --server` against a real `kvgate serve` (CPU backend, models/kvgate-tiny)
# on loopback, beside the offline `kvgate eval` on the same prompts:
# - one request in flight: every answer and every kept fraction equals the offline run's
#   (the served path is the offline engine split across processes);
# - four in flight (batched decode): every request answers and evicts exactly as offline
#   (eviction is decided at prefill, one prompt at a time);
# - a usage error exits 2, a server that is not there exits 1.
# usage: cli/eval_server_test.sh KVGATE_BINARY SOURCE_DIR
set -euo pipefail
kvgate="$1"
src="$2"
work="$(mktemp -d)"
source "$src/tests/testing/serve_on_loopback.sh"
trap 'stop_kvgate_serve; rm -rf "$work"' EXIT

model="$src/models/kvgate-tiny"
start_kvgate_serve "$kvgate" "$work/serve.log" --model "$model" --backend cpu --kv-sequences 8 \
    --shutdown-grace-ms 1000

common=(--model "$model" --tasks niah_single,kv_lookup --contexts 512 --samples 3
        --policies full,snapkv,sage_kv,streaming_llm --keep-ratios 0.5 --quiet)
"$kvgate" eval "${common[@]}" --backend cpu --json "$work/offline.json" >/dev/null
"$kvgate" eval "${common[@]}" --server "127.0.0.1:$port" --concurrency 1 --json "$work/one.json" >/dev/null
"$kvgate" eval "${common[@]}" --server "127.0.0.1:$port" --concurrency 4 --json "$work/four.json" \
    --markdown "$work/four.md" >/dev/null
set +e
"$kvgate" eval "${common[@]}" --server "127.0.0.1:$port" --backend cpu >/dev/null 2>"$work/usage.err"; usage_rc=$?
"$kvgate" eval "${common[@]}" --server 127.0.0.1:1 --timeout-ms 5000 >/dev/null 2>"$work/down.err"; down_rc=$?
set -e

python3 - "$work" "$usage_rc" "$down_rc" <<'PY'
import json, sys
work, usage_rc, down_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
offline, one, four = (json.load(open(f"{work}/{n}.json")) for n in ("offline", "one", "four"))
failures = []
def check(cond, what):
    print(("PASS " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)
key = lambda r: (r["policy"], r["keep_ratio"])
runs = {name: {key(r): r for r in report["runs"]} for name, report in (("offline", offline), ("one", one), ("four", four))}
check(set(runs["offline"]) == set(runs["one"]) == set(runs["four"]) and len(runs["offline"]) == 4,
      f"the same four runs ({sorted(runs['offline'])})")
check(one["backend"] == "server" and one["server"].startswith("127.0.0.1:") and four["concurrency"] == 4,
      "the report names the server and its concurrency")
check([s["prompt_tokens"] for s in offline["sample_list"]] == [s["prompt_tokens"] for s in one["sample_list"]],
      "the same prompts")
for k, ref in runs["offline"].items():
    served = runs["one"][k]
    check(served["outputs"] == ref["outputs"], f"{k}: served answers equal offline one at a time")
    check(abs(served["kept_fraction"] - ref["kept_fraction"]) < 1e-12, f"{k}: kept fraction {served['kept_fraction']:.4f} equals offline")
    batched = runs["four"][k]
    check(len(batched["outputs"]) == len(ref["outputs"]), f"{k}: four in flight: every sample answered")
    check(abs(batched["kept_fraction"] - ref["kept_fraction"]) < 1e-12, f"{k}: four in flight: the same eviction")
    same = sum(a == b for a, b in zip(batched["outputs"], ref["outputs"]))
    print(f"INFO {k}: four in flight: {same}/{len(ref['outputs'])} answers equal offline, accuracy {batched['accuracy']:.3f} vs {ref['accuracy']:.3f}")
full = runs["offline"][("full", 1.0)]
check(full["kept_fraction"] == 1.0, "full keeps everything")
check(abs(runs["offline"][("snapkv", 0.5)]["kept_fraction"] - 0.5) < 0.05, "snapkv keeps about half")
check("the kvgate server at 127.0.0.1:" in open(f"{work}/four.md").read(), "the markdown names the server")
check(usage_rc == 2 and "--backend is for the engine in this process" in open(f"{work}/usage.err").read(),
      f"--server with --backend is a usage error (exit {usage_rc})")
check(down_rc == 1 and "UNAVAILABLE" in open(f"{work}/down.err").read(), f"no server: exit 1, UNAVAILABLE (exit {down_rc})")
sys.exit(1 if failures else 0)
PY
