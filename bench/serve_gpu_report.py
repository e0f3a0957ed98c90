#!/usr/bin/env python3
"""The report of bench/serve_gpu_bench.sh: `kvgate serve --backend cuda` figures from the
project's client (serve-bench.json) beside the floors measured in the same run on the same
GPU (bf16 GEMM rate and device copy bandwidth, bench/gpu_engine_bench.measure_floors).

Floors of the run (8-layer Llama-3.1-8B-shaped model of gpu_engine_bench.py):
  - prefill of one prompt: its GEMM FLOPs over the GEMM rate;
  - one decode step of the whole batch (concurrency sequences at their mean context,
    prompt + max_tokens / 2): bf16 weights + bf16 KV over the copy bandwidth;
  - the run: every prompt's prefill floor, plus requests / concurrency rounds of
    max_tokens decode steps; output tokens over that time is the tokens/s ceiling.
Writes serve-gpu.json and serve-gpu.md into OUT_DIR.

  python3 bench/serve_gpu_report.py OUT_DIR --commit C --concurrency N --requests N \
      --prompt-tokens N --max-tokens N [--peak-mib M] [--note TEXT]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_engine_bench as g  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--policy-mix", default="full:1")
    ap.add_argument("--peak-mib", type=float, default=None)
    ap.add_argument("--serve-flags", default="")
    args = ap.parse_args()
    with open(os.path.join(args.out_dir, "serve-bench.json")) as f:
        bench = json.load(f)["kvgate"]
    floors = g.measure_floors()
    matrix_params = g.LAYERS * (g.HIDDEN * g.HEADS * g.HEAD_DIM * 2 + g.HIDDEN * g.KV_HEADS * g.HEAD_DIM * 2
                                + 3 * g.HIDDEN * g.INTER)
    weight_bytes = 2 * (matrix_params + g.VOCAB * g.HIDDEN)
    kv_bytes_per_token = g.LAYERS * 2 * g.KV_HEADS * g.HEAD_DIM * 2  # bf16 K and V
    mean_context = args.prompt_tokens + args.max_tokens / 2
    step_floor_ms = (weight_bytes + args.concurrency * mean_context * kv_bytes_per_token) / (
        floors["copy_tb_per_s"] * 1e12) * 1e3
    prefill_floor_ms = 2 * args.prompt_tokens * matrix_params / (floors["gemm_tflop_per_s"] * 1e12) * 1e3
    rounds = args.requests / args.concurrency
    run_floor_s = (args.requests * prefill_floor_ms + rounds * args.max_tokens * step_floor_ms) / 1e3
    output_tokens = args.requests * args.max_tokens
    ceiling = output_tokens / run_floor_s
    weights_gib = weight_bytes / 2 ** 30
    r = {
        "device": torch.cuda.get_device_name(),
        "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 stdout=subprocess.PIPE, text=True).stdout.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": args.commit,
        "workload": {"concurrency": args.concurrency, "requests": args.requests, "prompt_tokens": args.prompt_tokens,
                     "max_tokens": args.max_tokens, "policy_mix": args.policy_mix, "serve_flags": args.serve_flags},
        "kvgate": {"output_tokens_per_s": bench["output_tokens_per_s"], "duration_s": bench["duration_s"],
                   "ok": bench["ok"], "requests": bench["requests"], "ttft_ms": bench["ttft_ms"],
                   "itl_ms": bench["itl_ms"], "kv": bench["kv"], "peak_gpu_memory_mib": args.peak_mib},
        "floors": floors,
        "roofline": {"weight_bytes": weight_bytes, "kv_bytes_per_token_bf16": kv_bytes_per_token,
                     "decode_step_floor_ms": step_floor_ms, "prefill_floor_ms_per_prompt": prefill_floor_ms,
                     "run_floor_s": run_floor_s, "output_tokens_per_s_ceiling": ceiling},
        "issue_10_target": {"output_tokens_per_s": 20 * 267, "ttft_p50_ms": 1000},
    }
    with open(os.path.join(args.out_dir, "serve-gpu.json"), "w") as f:
        json.dump(r, f, indent=1)
    k = r["kvgate"]
    peak = f"{args.peak_mib / 1024:.1f} GiB" if args.peak_mib else "-"
    md = "\n".join([
        "# `kvgate serve --backend cuda` under concurrent streams (issue 10)", "",
        f"Device: {r['device']} (driver {r['driver']}), {r['date']}, commit `{r['commit']}`. "
        f"Model: the 8-layer Llama-3.1-8B-shaped random checkpoint of gpu_engine_bench.py (bf16, vocab 1500). "
        f"Workload: `kvgate bench`, closed loop, {args.concurrency} streams, {args.requests} requests of "
        f"{args.prompt_tokens}-token prompts and {args.max_tokens} new tokens, policy mix `{args.policy_mix}`; "
        f"serve flags `{args.serve_flags}`.",
        f"Floors from the same run: bf16 GEMM {floors['gemm_tflop_per_s']:.0f} TFLOP/s, device copy "
        f"{floors['copy_tb_per_s']:.2f} TB/s. Decode-step floor at batch {args.concurrency} = (bf16 weights "
        f"{weights_gib:.2f} GiB + bf16 KV at the mean context {mean_context:.0f}) / copy bandwidth; prefill floor = "
        "GEMM FLOPs / GEMM rate; the run's floor = all prefills + its rounds of decode steps.", "",
        "| figure | kvgate | floor / ceiling | kvgate / floor | issue-10 target |",
        "|---|---|---|---|---|",
        f"| output tokens/s | {k['output_tokens_per_s']:,.0f} | {ceiling:,.0f} | "
        f"{ceiling / k['output_tokens_per_s']:.2f}x below | 5,340 (20x 267) |",
        f"| TTFT p50 / p99 (ms) | {k['ttft_ms']['p50']:,.0f} / {k['ttft_ms']['p99']:,.0f} | "
        f"prefill {prefill_floor_ms:.1f} per prompt | | p50 < 1,000 |",
        f"| inter-token latency p50 / p99 (ms) | {k['itl_ms']['p50']:.2f} / {k['itl_ms']['p99']:.2f} | "
        f"decode step {step_floor_ms:.2f} | {k['itl_ms']['p50'] / step_floor_ms:.2f}x | |",
        f"| KV bytes moved prefill -> decode | {k['kv']['bytes_transferred'] / 1e9:.1f} GB "
        f"({k['kv']['fraction']:.3f} of full) | | | |",
        f"| peak GPU memory of serve | {peak} | weights {weights_gib:.2f} GiB + the pool asked for | | |",
        f"| requests OK | {k['ok']} / {k['requests']} | | | |",
    ]) + "\n"
    with open(os.path.join(args.out_dir, "serve-gpu.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
