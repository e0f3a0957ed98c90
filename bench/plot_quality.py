#!/usr/bin/env python3
"""Plots `kvgate eval --json` results: retrieval accuracy against keep ratio, one line
per eviction policy. The first panel averages over every task and context; the others
show one task each (averaged over contexts), or one context each with --panels contexts.
`full` keeps the whole cache at any ratio, so it is drawn as a dashed horizontal line.

  python3 bench/plot_quality.py RESULTS.json [--out quality.png] [--panels tasks|contexts|none]

Needs matplotlib (Debian: apt-get install -y python3-matplotlib, then run it with
/usr/bin/python3 if `python3` is another interpreter).
"""

import argparse
import collections
import json
import math
import sys


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def series(results, keep):
    """{policy: [(keep_ratio, accuracy)]} averaging the result cells that `keep` accepts,
    each cell (task, context) weighted equally."""
    cells = collections.defaultdict(list)
    for r in results:
        if keep(r):
            cells[(r["policy"], r["keep_ratio"])].append(r["accuracy"])
    out = collections.defaultdict(list)
    for (policy, ratio), accs in sorted(cells.items()):
        out[policy].append((ratio, mean(accs)))
    return out


def draw(ax, lines, ratios, title, policies):
    styles = ["o-", "s-", "^-", "D-", "v-", "P-", "X-", "*-"]
    # Colours and markers follow the policy's place in `policies`, so a policy missing from
    # one panel does not shift the others' colours away from the legend (taken from panel 1).
    for i, policy in enumerate(policies):
        if policy not in lines:
            continue
        points = sorted(lines[policy])
        if policy == "full":
            ax.axhline(points[-1][1], color="black", linestyle="--", linewidth=1.2, label="full")
            continue
        ax.plot([x for x, _ in points], [y for _, y in points], styles[i % len(styles)],
                color="C%d" % (i % 10), label=policy, markersize=4, linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xticks(ratios)
    ax.set_xticklabels(["%g" % r for r in ratios])
    ax.minorticks_off()
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("keep ratio (fraction of the prompt's KV cache kept)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="output of kvgate eval --json")
    parser.add_argument("--out", default="quality.png", help="PNG to write (default quality.png)")
    parser.add_argument("--panels", choices=["tasks", "contexts", "none"], default="tasks",
                        help="one extra panel per task (default), per context, or none")
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_quality.py needs matplotlib: apt-get install -y python3-matplotlib and run it with "
                 "/usr/bin/python3, or pip install matplotlib")
    with open(args.json) as f:
        data = json.load(f)
    results = data.get("results")
    if not results:
        sys.exit("%s holds no results (is it kvgate eval --json output?)" % args.json)
    policies = data.get("policies") or sorted({r["policy"] for r in results})
    ratios = sorted({r["keep_ratio"] for r in results})
    panels = [("mean over tasks and contexts", lambda r: True)]
    if args.panels == "tasks" and len(data.get("tasks", [])) > 1:
        panels += [(t, lambda r, t=t: r["task"] == t) for t in data["tasks"]]
    elif args.panels == "contexts" and len(data.get("contexts", [])) > 1:
        panels += [("context %d" % c, lambda r, c=c: r["context"] == c) for c in data["contexts"]]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.8 * rows), squeeze=False)
    for ax, (title, keep) in zip(axes.flat, panels):
        draw(ax, series(results, keep), ratios, title, policies)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    random_gates = [p for p, source in data.get("gates", {}).items() if str(source).startswith("random")]
    note = " (untrained random gates: %s)" % ", ".join(random_gates) if random_gates else ""
    fig.suptitle("%s: retrieval accuracy vs keep ratio%s\n%s, seed %s, %s samples per task and context, "
                 "contexts %s, commit %s, %s" % (
                     data.get("model", "?"), note, data.get("device", "?"), data.get("seed", "?"),
                     data.get("samples", "?"), ",".join(str(c) for c in data.get("contexts", [])),
                     str(data.get("commit", "unknown"))[:12], data.get("date", "?")), fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(args.out, dpi=120)
    print("wrote %s" % args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
