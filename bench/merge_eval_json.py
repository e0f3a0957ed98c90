#!/usr/bin/env python3
"""Merges the `--json` outputs of several `kvgate eval` runs of one model and seed (for
example one job per policy, keep ratio and context, run in parallel) into one file with
the same top-level fields and `results` cells, so bench/plot_quality.py reads it, and
prints the report tables as Markdown.

  python3 bench/merge_eval_json.py JOB.json... --out merged.json [--markdown tables.md]
      [--commit SHA] [--note TEXT]

Every (policy, keep ratio, task, context) cell must come from exactly one input. Per
(policy, keep ratio) the merged `runs` give the mean accuracy over the cells present
(`cells` says how many), the kept fraction weighted by prompt tokens, and the summed
elapsed time. Per cell the merged `results` add `correct_bits` (one character per
sample, by sample index) and `wrong` (sample index -> generated text).
"""

import argparse
import collections
import json
import sys

TASK_ORDER = ["niah_single", "niah_multikey", "niah_multivalue", "kv_lookup", "vt"]
POLICY_ORDER = ["full", "streaming_llm", "snapkv", "sage_kv", "kvzip", "fast_kvzip", "attention_gate"]


def ordered(values, order):
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def merge(paths):
    cells = {}
    runs_acc = collections.defaultdict(lambda: {"elapsed_s": 0.0, "tokens_full": 0, "tokens_kept": 0.0})
    meta = None
    jobs = []
    gates = {}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        if meta is None:
            meta = d
        for key in ("model", "seed", "samples", "haystack", "backend"):
            if d.get(key) != meta.get(key):
                raise SystemExit("%s: %s is %r, not %r as in %s" % (path, key, d.get(key), meta.get(key), paths[0]))
        gates.update(d.get("gates", {}))
        samples = d["sample_list"]
        jobs.append({"file": path.rsplit("/", 1)[-1], "tasks": d["tasks"], "contexts": d["contexts"],
                     "policies": d["policies"], "keep_ratios": d["keep_ratios"], "elapsed_s": round(d["elapsed_s"], 2),
                     "device": d["device"], "date": d["date"]})
        for run in d["runs"]:
            key = (run["policy"], run["keep_ratio"])
            acc = runs_acc[key]
            acc["elapsed_s"] += run["elapsed_s"]
            by_cell = collections.defaultdict(list)
            for i, s in enumerate(samples):
                by_cell[(s["task"], s["context"])].append(i)
            for (task, context), idx in by_cell.items():
                ck = (run["policy"], run["keep_ratio"], task, context)
                if ck in cells:
                    raise SystemExit("cell %s appears twice (%s)" % (ck, path))
                src = next(r for r in d["results"] if (r["policy"], r["keep_ratio"], r["task"], r["context"]) == ck)
                idx = sorted(idx, key=lambda i: samples[i]["index"])
                tokens = sum(samples[i]["prompt_tokens"] for i in idx)
                acc["tokens_full"] += tokens
                acc["tokens_kept"] += src["kept_fraction"] * tokens
                cell = dict(src)
                cell["prompt_tokens_mean"] = round(tokens / len(idx), 1)
                cell["correct_bits"] = "".join(str(run["correct"][i]) for i in idx)
                cell["wrong"] = {str(samples[i]["index"]): run["outputs"][i] for i in idx if not run["correct"][i]}
                cell["answers"] = {str(samples[i]["index"]): samples[i]["answer"] for i in idx if not run["correct"][i]}
                cells[ck] = cell
    tasks = ordered({c[2] for c in cells}, TASK_ORDER)
    contexts = sorted({c[3] for c in cells})
    policies = ordered({c[0] for c in cells}, POLICY_ORDER)
    ratios = sorted({c[1] for c in cells}, reverse=True)
    results = [cells[k] for k in sorted(cells, key=lambda k: (POLICY_ORDER.index(k[0]) if k[0] in POLICY_ORDER else 99,
                                                              -k[1], TASK_ORDER.index(k[2]) if k[2] in TASK_ORDER else 99,
                                                              k[3]))]
    runs = []
    for policy in policies:
        for ratio in ratios:
            mine = [c for c in results if c["policy"] == policy and c["keep_ratio"] == ratio]
            if not mine:
                continue
            acc = runs_acc[(policy, ratio)]
            kept = acc["tokens_kept"] / acc["tokens_full"] if acc["tokens_full"] else 1.0
            runs.append({"policy": policy, "keep_ratio": ratio, "cells": len(mine),
                         "tasks": ordered({c["task"] for c in mine}, TASK_ORDER),
                         "contexts": sorted({c["context"] for c in mine}),
                         "accuracy": sum(c["accuracy"] for c in mine) / len(mine),
                         "kept_fraction": kept, "eviction_rate": 1.0 - kept,
                         "elapsed_s": round(acc["elapsed_s"], 2)})
    out = {k: meta[k] for k in ("model", "model_config", "device", "backend", "seed", "samples", "haystack", "scoring")}
    out.update({"date": max(j["date"] for j in jobs), "commit": meta.get("commit"), "tasks": tasks,
                "contexts": contexts, "policies": policies, "keep_ratios": ratios, "gates": gates,
                "runs": runs, "results": results, "jobs": jobs})
    return out


def markdown(d):
    tasks, contexts = d["tasks"], d["contexts"]
    cell = {(r["policy"], r["keep_ratio"], r["task"], r["context"]): r for r in d["results"]}
    lines = ["| policy | keep ratio | kept | mean | " + " | ".join(tasks) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(tasks)]
    for run in d["runs"]:
        p, r = run["policy"], run["keep_ratio"]
        per_task = []
        for t in tasks:
            accs = [cell[(p, r, t, c)]["accuracy"] for c in contexts if (p, r, t, c) in cell]
            per_task.append("%.3f" % (sum(accs) / len(accs)) if accs else "-")
        lines.append("| %s | %.2f | %.3f | %.3f | %s |" % (p, r, run["kept_fraction"], run["accuracy"], " | ".join(per_task)))
    lines += ["", "| policy | keep ratio | task | " + " | ".join(str(c) for c in contexts) + " |",
              "|---|---:|---|" + "---:|" * len(contexts)]
    for run in d["runs"]:
        p, r = run["policy"], run["keep_ratio"]
        for t in tasks:
            vals = ["%.2f" % cell[(p, r, t, c)]["accuracy"] if (p, r, t, c) in cell else "-" for c in contexts]
            if all(v == "-" for v in vals):
                continue
            lines.append("| %s | %.2f | %s | %s |" % (p, r, t, " | ".join(vals)))
    return "\n".join(lines) + "\n"


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--markdown")
    ap.add_argument("--commit", help="record this commit instead of the inputs' (e.g. when they ran on a copy)")
    ap.add_argument("--note", help="free text stored as `note`")
    args = ap.parse_args(argv)
    d = merge(args.inputs)
    if args.commit:
        d["commit"] = args.commit
    if args.note:
        d["note"] = args.note
    with open(args.out, "w") as f:
        json.dump(d, f, indent=1)
        f.write("\n")
    md = markdown(d)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
