#!/usr/bin/env python3
"""CI floor on retrieval quality (ctest `kvgate_tiny_quality_floor_test`, label unit).

Runs the small version of bench/results/quality-kvgate-tiny.md on the CPU backend:

  kvgate eval --model models/kvgate-tiny --tasks niah_single --contexts 1024 --samples N
      --policies full,fast_kvzip --keep-ratios 0.3 --backend cpu
      --gates fast_kvzip=models/kvgate-tiny/gates/fast_kvzip.safetensors --json OUT

on the generated five-sentence haystack (nothing from ../shared), and fails when the full
cache or fast_kvzip at keep ratio 0.3 falls below its floor, or when fast_kvzip did not
evict what it was asked to. The floors come from the measured numbers (see FLOORS).

  python3 bench/quality_floor_test.py --kvgate build/cli/kvgate [--source-dir .] [--samples 20]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Measured on the CPU backend (2-core Xeon, seed 1234, 20 samples, generated haystack):
# full 20/20, fast_kvzip@0.3 20/20 (kept 0.303). The floors leave room for a few samples
# to flip on other CPUs' float rounding, but not for a broken policy: a fast_kvzip that
# drops the needle scores like streaming_llm (0/20 here), an engine that breaks the full
# cache scores far below 0.9.
FLOORS = {("full", 1.0): 0.95, ("fast_kvzip", 0.3): 0.85}
KEPT_RANGE = {("fast_kvzip", 0.3): (0.28, 0.33)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kvgate", required=True, help="the built kvgate binary")
    ap.add_argument("--source-dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all)")
    args = ap.parse_args(argv)
    model = os.path.join(args.source_dir, "models", "kvgate-tiny")
    gate = os.path.join(model, "gates", "fast_kvzip.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "quality.json")
        cmd = [args.kvgate, "eval", "--model", model, "--tasks", "niah_single", "--contexts", "1024",
               "--samples", str(args.samples), "--policies", "full,fast_kvzip", "--keep-ratios", "0.3",
               "--backend", "cpu", "--gates", "fast_kvzip=" + gate, "--json", out, "--quiet"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(" ".join(cmd), flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(proc.stdout)
        print("kvgate eval: exit %d in %.1f s" % (proc.returncode, time.time() - t0))
        if proc.returncode != 0:
            return 1
        with open(out) as f:
            data = json.load(f)
    failures = []
    runs = {(r["policy"], r["keep_ratio"]): r for r in data["runs"]}
    for key, floor in FLOORS.items():
        run = runs.get(key)
        if run is None:
            failures.append("%s keep %.2f: no run in the output" % key)
            continue
        correct = sum(run["correct"])
        line = "%s keep %.2f: accuracy %.3f (%d/%d), kept %.3f, floor %.2f" % (
            key[0], key[1], run["accuracy"], correct, len(run["correct"]), run["kept_fraction"], floor)
        print(line)
        if run["accuracy"] < floor:
            failures.append(line)
        if key in KEPT_RANGE:
            lo, hi = KEPT_RANGE[key]
            if not lo <= run["kept_fraction"] <= hi:
                failures.append("%s keep %.2f: kept fraction %.3f outside [%.2f, %.2f]" % (
                    key[0], key[1], run["kept_fraction"], lo, hi))
    for f in failures:
        print("FAIL: " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
