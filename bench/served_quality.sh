#!/usr/bin/env bash
# Quality of the deployed path (issue 14, item 5): `kvgate eval --server` against a real
# `kvgate serve` (router, KV manager, prefill and decode workers over loopback, with the
# model's committed gates), beside the offline `kvgate eval` on the same prompts, in one run.
# Writes bench/results/quality-served-<name>.{md,json}: per policy and keep ratio, the
# served and offline accuracy and kept fraction, and how many answers are identical.
#   bench/served_quality.sh KVGATE_BINARY [--backend cpu|cuda] [--concurrency N] [EVAL FLAGS...]
# Default eval flags: every task, 1024-token contexts, 10 samples, keep 0.5 and 0.3.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
kvgate=$1; shift
backend=cpu
concurrency=8
if [ "${1:-}" = --backend ]; then backend=$2; shift 2; fi
if [ "${1:-}" = --concurrency ]; then concurrency=$2; shift 2; fi
model="$src/models/kvgate-tiny"
flags=("$@")
[ ${#flags[@]} -gt 0 ] || flags=(--contexts 1024 --samples 10 --keep-ratios 0.5,0.3)
policies=full,streaming_llm,snapkv,sage_kv,kvzip,fast_kvzip,attention_gate
gates=(--fast-kvzip-gate "$model/gates/fast_kvzip.safetensors" --attention-gate "$model/gates/attention_gate.safetensors")
work=$(mktemp -d /tmp/kvgate-served-quality.XXXXXX)
source "$src/tests/testing/serve_on_loopback.sh"
trap stop_kvgate_serve EXIT
start_kvgate_serve "$kvgate" "$work/serve.log" --model "$model" --backend "$backend" --kv-sequences "$concurrency" \
    "${gates[@]}"

"$kvgate" eval --model "$model" --policies "$policies" "${flags[@]}" --server "127.0.0.1:$port" \
    --concurrency "$concurrency" --quiet --json "$work/served.json" >/dev/null
"$kvgate" eval --model "$model" --policies "$policies" "${flags[@]}" --backend "$backend" \
    --gates "fast_kvzip=$model/gates/fast_kvzip.safetensors,attention_gate=$model/gates/attention_gate.safetensors" \
    --quiet --json "$work/offline.json" >/dev/null

python3 - "$work/served.json" "$work/offline.json" "$src/bench/results" "$backend" "$concurrency" <<'PY'
import json, sys
served, offline = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
out, backend, concurrency = sys.argv[3], sys.argv[4], int(sys.argv[5])
key = lambda r: (r["policy"], r["keep_ratio"])
off = {key(r): r for r in offline["runs"]}
rows = []
for r in served["runs"]:
    o = off[key(r)]
    same = sum(a == b for a, b in zip(r["outputs"], o["outputs"]))
    rows.append(dict(policy=r["policy"], keep_ratio=r["keep_ratio"], served_accuracy=r["accuracy"],
                     offline_accuracy=o["accuracy"], served_kept=r["kept_fraction"], offline_kept=o["kept_fraction"],
                     identical_answers=same, samples=len(r["outputs"]), served_s=r["elapsed_s"], offline_s=o["elapsed_s"]))
report = dict(date=served["date"], commit=served["commit"], served_device=served["device"],
              offline_device=offline["device"], backend=backend, concurrency=concurrency,
              tasks=served["tasks"], contexts=served["contexts"], samples=served["samples"], seed=served["seed"],
              haystack=served["haystack"], rows=rows)
json.dump(report, open(f"{out}/quality-served-kvgate-tiny.json", "w"), indent=1)
md = ["# kvgate-tiny: retrieval accuracy through the deployed service vs the offline engine", "",
      "`bench/served_quality.sh` (issue 14, item 5): `kvgate eval --server` against `kvgate serve` "
      "(router, KV manager, prefill and decode workers over loopback, the committed gates), and the "
      "offline `kvgate eval` on the same prompts, in one run.", "",
      f"- date {report['date']}, commit {report['commit']}",
      f"- served: {report['served_device']} (`serve --backend {backend} --kv-sequences {concurrency}`)",
      f"- offline: {report['offline_device']}",
      f"- tasks {', '.join(report['tasks'])}; contexts {report['contexts']}; {report['samples']} samples per task and "
      f"context; seed {report['seed']}; haystack {report['haystack']}", "",
      "| policy | keep ratio | served accuracy | offline accuracy | served kept | offline kept | identical answers | served s | offline s |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    md.append(f"| {r['policy']} | {r['keep_ratio']:.2f} | {r['served_accuracy']:.3f} | {r['offline_accuracy']:.3f} | "
              f"{r['served_kept']:.3f} | {r['offline_kept']:.3f} | {r['identical_answers']}/{r['samples']} | "
              f"{r['served_s']:.1f} | {r['offline_s']:.1f} |")
open(f"{out}/quality-served-kvgate-tiny.md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
PY
