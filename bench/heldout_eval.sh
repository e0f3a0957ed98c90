#!/usr/bin/env bash
# Held-out evaluation (issue 14, item 3): do the learned gates generalise beyond the
# prompts they were trained on? Runs every eviction policy of `kvgate eval` on the CPU, in
# one sweep from one commit, over
#   - the trained tasks on the essay haystack the model and gates were trained on,
#   - the held-out tasks of bench/retrieval_tasks.md ("Held-out tasks") on that haystack,
#   - the trained tasks on a haystack the model never read (Debian's GPL-3 text),
# and writes bench/results/quality-heldout-<name>.json (every cell, per-sample bits, the
# jobs) plus the tables, to paste into the .md, on stdout.
#
#   bench/heldout_eval.sh KVGATE_BINARY [WORK_DIR]
# Environment (defaults in brackets):
#   ESSAYS [../shared/data/pg-essays]  UNSEEN [/usr/share/common-licenses/GPL-3]
#   HELD_OUT_TASKS [niah_reworded,kv_lookup_48,kv_lookup_keyfmt]  FULL_ONLY_TASKS [vt_8hop,vt_reworded]
#   CONTEXTS [1024]  SAMPLES [10]  KVZIP_SAMPLES [$SAMPLES]  KVZIP_CONTEXTS [1024]  KEEP [0.5,0.3,0.1]
#   POLICIES [full,streaming_llm,snapkv,sage_kv,kvzip,fast_kvzip,attention_gate]
#   JOBS [2] processes at a time, THREADS [1] each; NAME [kvgate-tiny]
# One process per (context, haystack, policy): each builds the same samples from the seed;
# kvzip (about 20x the others) may take fewer samples or contexts. A job whose JSON exists
# is not rerun, so a stopped sweep resumes.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
kvgate=$(realpath "$1")
work=${2:-/tmp/kvgate-heldout}
model="$src/models/kvgate-tiny"
essays=${ESSAYS:-$src/../shared/data/pg-essays}
unseen=${UNSEEN:-/usr/share/common-licenses/GPL-3}
trained=niah_single,niah_multikey,niah_multivalue,kv_lookup,vt
held_out=${HELD_OUT_TASKS:-niah_reworded,kv_lookup_48,kv_lookup_keyfmt}
contexts=${CONTEXTS:-1024}
samples=${SAMPLES:-10}
kvzip_samples=${KVZIP_SAMPLES:-$samples}
kvzip_contexts=${KVZIP_CONTEXTS:-1024}
policies=${POLICIES:-full,streaming_llm,snapkv,sage_kv,kvzip,fast_kvzip,attention_gate}
keep=${KEEP:-0.5,0.3,0.1}
jobs=${JOBS:-2}
threads=${THREADS:-1}
name=${NAME:-kvgate-tiny}
mkdir -p "$work"
for f in "$essays" "$unseen"; do [ -e "$f" ] || { echo "heldout_eval: $f does not exist" >&2; exit 1; }; done

# The unseen haystack must share no sentence with the training haystack.
python3 - "$essays" "$unseen" <<'PY'
import os, sys
def read(p):
    if os.path.isdir(p):
        return "\n".join(open(os.path.join(p, f), encoding="utf-8").read() for f in sorted(os.listdir(p)) if f.endswith(".txt"))
    return open(p, encoding="utf-8").read()
import re
def sentences(t):
    return {" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s", t) if len(s.split()) >= 4}
shared = sentences(read(sys.argv[1])) & sentences(read(sys.argv[2]))
if shared:
    sys.exit("heldout_eval: the unseen haystack shares %d sentences with the essays, e.g. %r" % (len(shared), sorted(shared)[0]))
PY

# One job per (context, haystack, policy); the kvzip jobs first (the longest), then every
# 1024-token job before any longer one, so a cut-short sweep still holds whole contexts.
# Label|haystack|tasks; the full-cache job also runs the held-out tasks that full itself
# fails (FULL_ONLY_TASKS): no eviction can do better than full, so they run only there.
full_only=${FULL_ONLY_TASKS:-vt_8hop,vt_reworded}
sweeps=("essays|$essays|$trained,$held_out" "unseen|$unseen|$trained")
mkdir -p "$work/jobs"
rm -f "$work/jobs/"*.sh
job_number=0
add_job() {  # context label path tasks policy
  local context=$1 label=$2 path=$3 tasks=$4 policy=$5 n=$samples
  [ "$policy" = kvzip ] && n=$kvzip_samples
  [ "$policy" = full ] && [ "$label" = essays ] && [ -n "$full_only" ] && tasks="$tasks,$full_only"
  local flags=(--model "$model" --tasks "$tasks" --contexts "$context" --policies "$policy" --samples "$n"
               --seed 1234 --haystack "$path" --backend cpu --threads "$threads" --quiet
               --json "$work/${label}_${context}_${policy}.json")
  [ "$policy" = full ] || flags+=(--keep-ratios "$keep")
  case $policy in fast_kvzip|attention_gate) flags+=(--gates "$policy=$model/gates/$policy.safetensors");; esac
  job_number=$((job_number + 1))
  local job="$work/jobs/$(printf %02d $job_number)_${label}_${context}_${policy}"
  [ -s "$work/${label}_${context}_${policy}.json" ] && return 0  # done before
  { printf 'cd %q && ' "$src"; printf '%q ' "$kvgate" eval "${flags[@]}"; printf '>%q 2>%q\n' "$job.md" "$job.err"; } >"$job.sh"
}
for context in ${kvzip_contexts//,/ }; do
  [[ ",$policies," == *,kvzip,* ]] || break
  for sweep in "${sweeps[@]}"; do IFS='|' read -r label path tasks <<<"$sweep"; add_job "$context" "$label" "$path" "$tasks" kvzip; done
done
for context in ${contexts//,/ }; do
  for sweep in "${sweeps[@]}"; do
    IFS='|' read -r label path tasks <<<"$sweep"
    for policy in ${policies//,/ }; do
      [ "$policy" = kvzip ] && continue
      add_job "$context" "$label" "$path" "$tasks" "$policy"
    done
  done
done
(cd "$src" && git rev-parse HEAD && git status --porcelain --untracked-files=no) >"$work/commit.txt"
cat "$work/jobs/"*.sh >>"$work/commands.txt" 2>/dev/null || true  # every command run, for the report
find "$work/jobs" -name '*.sh' | sort | xargs -r -P "$jobs" -n 1 bash || echo "heldout_eval: some job failed (see $work/jobs/*.err)" >&2

python3 - "$work" "$src/bench/results/quality-heldout-$name.json" "$trained" "$held_out" "$src" <<'PY'
import glob, json, os, sys
work, out, trained, held_out = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
rel = lambda path: os.path.relpath(path, sys.argv[5]) if path.startswith(sys.argv[5]) else path  # repo-relative
POLICIES = ["full", "streaming_llm", "snapkv", "sage_kv", "kvzip", "fast_kvzip", "attention_gate"]
cells, jobs, meta = [], [], None
for path in sorted(glob.glob(os.path.join(work, "*.json"))):
    d = json.load(open(path))
    meta = meta or d
    label = os.path.basename(path).split("_", 1)[0]
    jobs.append({"file": os.path.basename(path), "haystack": rel(d["haystack"]), "tasks": d["tasks"], "policies": d["policies"],
                 "keep_ratios": d["keep_ratios"], "samples": d["samples"], "contexts": d["contexts"],
                 "commit": d["commit"], "date": d["date"], "device": d["device"], "elapsed_s": round(d["elapsed_s"], 1)})
    samples = d["sample_list"]
    for run in d["runs"]:
        for task in d["tasks"]:
            for context in d["contexts"]:
                idx = sorted((i for i, s in enumerate(samples) if s["task"] == task and s["context"] == context),
                             key=lambda i: samples[i]["index"])
                cell = next(r for r in d["results"] if (r["task"], r["context"]) == (task, context)
                            and (r["policy"], r["keep_ratio"]) == (run["policy"], run["keep_ratio"]))
                cells.append({"haystack": label, "held_out": task not in trained, "policy": run["policy"],
                              "keep_ratio": run["keep_ratio"], "task": task, "context": context,
                              "samples": cell["samples"], "correct": cell["correct"], "accuracy": cell["accuracy"],
                              "kept_fraction": cell["kept_fraction"],
                              "correct_bits": "".join(str(run["correct"][i]) for i in idx),
                              "wrong": {str(samples[i]["index"]): run["outputs"][i] for i in idx if not run["correct"][i]},
                              "answers": {str(samples[i]["index"]): samples[i]["answer"] for i in idx}})
commits = sorted({j["commit"] for j in jobs})
report = {"model": rel(meta["model"]), "model_config": meta["model_config"], "device": meta["device"],
          "backend": meta["backend"], "seed": meta["seed"], "scoring": meta["scoring"], "commits": commits,
          "dates": [min(j["date"] for j in jobs), max(j["date"] for j in jobs)],
          "trained_tasks": trained, "held_out_tasks": held_out, "jobs": jobs, "results": cells}
json.dump(report, open(out, "w"), indent=1)
open(out, "a").write("\n")

def table(haystack, tasks, contexts):
    head = "| policy | keep | kept | " + " | ".join(tasks) + " | mean |"
    lines = [head, "|---|---:|---:|" + "---:|" * (len(tasks) + 1)]
    by = {(c["haystack"], c["policy"], c["keep_ratio"], c["task"], c["context"]): c for c in cells}
    keys = sorted({(c["policy"], c["keep_ratio"]) for c in cells if c["haystack"] == haystack},
                  key=lambda k: (POLICIES.index(k[0]), -k[1]))
    for p, r in keys:
        got = [by.get((haystack, p, r, t, x)) for t in tasks for x in contexts]
        if not any(got):
            continue
        accs, kept = [], []
        row = []
        for t in tasks:
            cs = [by.get((haystack, p, r, t, x)) for x in contexts]
            cs = [c for c in cs if c]
            if not cs:
                row.append("-")
                continue
            a = sum(c["correct"] for c in cs) / sum(c["samples"] for c in cs)
            accs.append(a)
            kept += [c["kept_fraction"] for c in cs]
            row.append("%.2f" % a)
        n = {c["samples"] for c in got if c}
        label = p + (" (%s samples)" % "/".join(map(str, sorted(n))) if p == "kvzip" else "")
        lines.append("| %s | %s | %.3f | %s | %.3f |" % (label, "1" if p == "full" else "%.1f" % r,
                     sum(kept) / len(kept), " | ".join(row), sum(accs) / len(accs)))
    return "\n".join(lines)

contexts = sorted({c["context"] for c in cells})
for x in contexts:
    print("\n### Essay haystack (trained on), context %d: trained tasks\n" % x)
    print(table("essays", trained, [x]))
    print("\n### Essay haystack, context %d: held-out tasks\n" % x)
    print(table("essays", held_out, [x]))
    print("\n### Unseen haystack (GPL-3), context %d: trained tasks\n" % x)
    print(table("unseen", trained, [x]))
print("\n### Full cache only, essay haystack: held-out tasks it fails\n")
full_only = sorted({c["task"] for c in cells if c["policy"] == "full" and c["task"] not in trained + held_out})
if full_only:
    print(table("essays", full_only, contexts))
print("\ncommits:", commits, "dates:", report["dates"])
PY
