#!/usr/bin/env python3
"""Eviction on the GPU (issue 11), in one run on the GPU machine:
  - overhead: the prefill through each policy's planner (forward with its capture, scoring,
    selection, compaction into pages) against policy `full` on the same prompt, at each
    --prefill size;
  - decode with the kept cache: B sequences of C tokens committed under each policy at
    --keep-ratio, one batched decode step for all (the decode worker's step), against
    `full` and against the floor of the same run: (bf16 weights + the kept bf16 K/V) over
    the measured device-copy bandwidth.
The model is gpu_engine_bench.py's random Llama-3.1-8B-shaped checkpoint cut to 8 layers
(written unless --model-dir holds one; KVGATE_BENCH_LAYERS=32 with another --model-dir gives
the full 32 layers). Writes eviction.json and eviction.md into --out-dir.

  python3 bench/eviction_bench.py --bench-bin BUNDLE/bin/gpu_engine_bench --out-dir DIR
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_engine_bench as engine  # noqa: E402  (the checkpoint, the floors, the shapes)


def run_bench(bench_bin, args, json_path, env=None):
    cmd = [bench_bin, *args, "--json", json_path]
    engine.log("$", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})
    engine.log(proc.stderr[-4000:])
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    with open(json_path) as f:
        return json.load(f)


def weight_bytes():
    matrix_params = engine.LAYERS * (engine.HIDDEN * engine.HEADS * engine.HEAD_DIM * 2 +
                                     engine.HIDDEN * engine.KV_HEADS * engine.HEAD_DIM * 2 +
                                     3 * engine.HIDDEN * engine.INTER)
    return 2 * (matrix_params + engine.VOCAB * engine.HIDDEN)


def decode_floor_ms(row, copy_tb_per_s):
    # kv_entries_kept counts (layer, kv head, token) rows; each is K and V of head_dim bf16,
    # plus the one new token every sequence appends in the step.
    entries = row["kv_entries_kept"] + row["batch"] * engine.LAYERS * engine.KV_HEADS
    kv_bytes = entries * 2 * engine.HEAD_DIM * 2
    return (weight_bytes() + kv_bytes) / (copy_tb_per_s * 1e12) * 1e3, kv_bytes


def against_full(rows, key):
    """Each row with the median of `full` at the same `key` (None without one) and its kept fraction."""
    full = {x[key]: x["median_ms"] for x in rows if x["policy"] == "full"}
    return [(x, full.get(x[key]), x["kv_entries_kept"] / max(1, x["kv_entries_full"])) for x in rows]


def markdown(r):
    lines = [f"Device: {r['device']} (driver {r['driver']}), {r['date']}, commit `{r['commit']}`; {r['model']}.",
             f"Floors of this run: device copy {r['floors']['copy_tb_per_s']:.2f} TB/s (read + write), "
             f"bf16 GEMM {r['floors']['gemm_tflop_per_s']:.0f} TFLOP/s.", ""]
    prefill = r["overhead"].get("policy_prefill", [])
    if prefill:
        lines += ["| tokens | policy | total ms | forward ms | plan + commit ms | vs full | kept |",
                  "|---|---|---|---|---|---|---|"]
        for x, base, kept in against_full(prefill, "tokens"):
            change = f"{(x['median_ms'] / base - 1) * 100:+.1f}%" if base else "-"
            lines.append(f"| {x['tokens']:,} | {x['policy']} | {x['median_ms']:.2f} | {x['forward_median_ms']:.2f} | "
                         f"{x['plan_and_commit_median_ms']:.2f} | {change} | {kept:.3f} |")
        lines.append("")
    batched = r["decode"].get("decode_batched", [])
    if batched:
        lines += ["| batch | context | policy | kept | ms / step | of which end step (host) ms | tokens/s | vs full | "
                  "floor ms | / floor |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for x, base, kept in against_full(batched, "batch"):
            change = f"{x['median_ms'] / base:.2f}x" if base else "-"
            lines.append(f"| {x['batch']} | {x['context']:,} | {x['policy']} | {kept:.3f} | {x['median_ms']:.2f} | "
                         f"{x.get('host_end_step_median_ms', float('nan')):.2f} | "
                         f"{x['tokens_per_s']:,.0f} | {change} | {x['floor_ms']:.2f} | {x['median_ms'] / x['floor_ms']:.2f}x |")
    capacity = r["decode"].get("capacity", [])
    if capacity:
        full = next((x["sequences"] for x in capacity if x["policy"] == "full"), None)
        lines += ["", f"Sequences of {capacity[0]['context']:,} tokens that one fixed pool of "
                  f"{capacity[0]['pool_gib']:g} GiB of {capacity[0]['kv_dtype']} K/V pages holds (commits until the "
                  "pool refuses):", "",
                  "| policy | kept | pages per sequence | sequences | vs full |", "|---|---|---|---|---|"]
        for x in capacity:
            ratio = f"{x['sequences'] / full:.2f}x" if full else "-"
            lines.append(f"| {x['policy']} | {x['keep_ratio']:.1f} | {x['pages_per_sequence']:,} | {x['sequences']} | "
                         f"{ratio} |")
    for part in ("overhead", "decode"):
        if "error" in r[part]:
            lines += ["", f"{part} failed: ```{r[part]['error'][-600:]}```"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-bin", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model-dir", default="/tmp/kvgate-llama31-8l")
    ap.add_argument("--prefill", default="2048,8192,32768")
    ap.add_argument("--policies", default="full,snapkv,sage_kv,streaming_llm,fast_kvzip")
    ap.add_argument("--decode-batch", default="32,64")
    ap.add_argument("--batch-context", type=int, default=8192)
    ap.add_argument("--decode-policies", default="full,snapkv,streaming_llm")
    ap.add_argument("--keep-ratio", default="0.3")
    ap.add_argument("--capacity-context", type=int, default=0,
                    help="also count the sequences of this many tokens a fixed pool holds, per decode policy")
    ap.add_argument("--capacity-pool-gib", type=float, default=8.0)
    ap.add_argument("--commit", default=os.environ.get("KVGATE_COMMIT", "unknown"))
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    if not os.path.exists(os.path.join(a.model_dir, "config.json")):
        engine.write_checkpoint(engine.make_weights(), a.model_dir)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         stdout=subprocess.PIPE, text=True).stdout.strip().split(", ")
    r = {"device": smi[0], "driver": smi[-1], "commit": a.commit,
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "model": f"random Llama-3.1-8B shapes, {engine.LAYERS} layers, bf16 (bench/gpu_engine_bench.py)",
         "keep_ratio": float(a.keep_ratio), "floors": engine.measure_floors()}
    common = ["--model", a.model_dir, "--backend", "cuda", "--weights", "bf16", "--decode", "",
              "--keep-ratio", a.keep_ratio]
    r["overhead"] = run_bench(a.bench_bin, common + ["--prefill", a.prefill, "--policy-prefill", a.policies],
                              "/tmp/eviction-overhead.json")
    r["decode"] = run_bench(a.bench_bin, common + ["--prefill", "", "--decode-batch", a.decode_batch,
                                                   "--batch-context", str(a.batch_context),
                                                   "--decode-policy", a.decode_policies,
                                                   "--capacity-context", str(a.capacity_context),
                                                   "--capacity-pool-gib", str(a.capacity_pool_gib)],
                            "/tmp/eviction-decode.json")
    for row in r["decode"].get("decode_batched", []):
        row["floor_ms"], row["kv_bytes"] = decode_floor_ms(row, r["floors"]["copy_tb_per_s"])
    r["overhead"].pop("check", None)
    with open(os.path.join(a.out_dir, "eviction.json"), "w") as f:
        json.dump(r, f, indent=1)
    with open(os.path.join(a.out_dir, "eviction.md"), "w") as f:
        f.write(markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
