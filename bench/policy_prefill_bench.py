#!/usr/bin/env python3
"""Eviction overhead on the GPU: `kvgate generate` (offline, --backend cuda) of one random
prompt per size with each policy at keep 0.3, against the same prompt with policy full, in
one process run each (the first run of every configuration warms up and is dropped).
prefill_ms covers the forward, scoring, selection and compaction. With --host-scoring the
same runs repeat with KVGATE_HOST_SCORING=1 (the scorers on host copies: the path before
device scoring). Writes JSON lines and a markdown table.
  policy_prefill_bench.py --kvgate BIN --model DIR --out DIR [--sizes 2048,8192]
                          [--policies snapkv,sage_kv,streaming_llm] [--host-scoring-sizes 2048]
"""
import argparse, json, os, random, subprocess, sys, time


def run(kvgate, model, ids, policy, env_extra, repeats):
    args = [kvgate, "generate", "--model", model, "--backend", "cuda", "--prompt-ids", ",".join(map(str, ids)),
            "--max-tokens", "2", "--policy", policy, "--json"]
    if policy != "full":
        args += ["--keep-ratio", "0.3"]
    env = dict(os.environ, **env_extra)
    best = None
    for r in range(repeats + 1):
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            return {"error": out.stderr[-500:]}
        doc = json.loads(out.stdout.strip().splitlines()[-1])
        t = doc["timings"]
        if r > 0 and (best is None or t["prefill_ms"] < best["prefill_ms"]):
            best = {"prefill_ms": t["prefill_ms"], "ttft_ms": t["time_to_first_token_ms"],
                    "kv": doc.get("kv", {})}
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvgate", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="2048,8192")
    ap.add_argument("--policies", default="snapkv,sage_kv,streaming_llm")
    ap.add_argument("--host-scoring-sizes", default="2048")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1500)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(7)
    rows = []
    for n in [int(s) for s in a.sizes.split(",") if s]:
        ids = [rng.randrange(3, a.vocab) for _ in range(n)]
        full = run(a.kvgate, a.model, ids, "full", {}, a.repeats)
        rows.append({"prompt": n, "policy": "full", "scoring": "-", **full})
        print(json.dumps(rows[-1]), flush=True)
        for p in [s for s in a.policies.split(",") if s]:
            modes = [("device", {})]
            if str(n) in a.host_scoring_sizes.split(",") and p in ("snapkv", "sage_kv"):
                modes.append(("host", {"KVGATE_HOST_SCORING": "1"}))
            for mode, env in modes:
                r = run(a.kvgate, a.model, ids, p, env, a.repeats if mode == "device" else 1)
                row = {"prompt": n, "policy": p, "scoring": mode, **r}
                if "prefill_ms" in r and "prefill_ms" in full:
                    row["overhead_vs_full"] = r["prefill_ms"] / full["prefill_ms"] - 1.0
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, "policy-prefill.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
