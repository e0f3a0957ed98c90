#!/usr/bin/env python3
"""SAGE-KV and SnapKV on models/kvgate-tiny: where the keep 0.3 accuracy goes (issue 14, item 1).

`kvgate eval` scores sage_kv 12.7% and snapkv 26% at keep 0.3 against 99.7% for the full cache
(bench/results/quality-kvgate-tiny.md). This script tests the recorded hypothesis and the
scorers, with the two papers' rules written here in PyTorch from docs/eviction-methods.md
(sections 3 and 9.5) and from no C++ file:

- SAGE-KV (arXiv 2503.08879): B = round(keep * n); sink = B/4 first tokens; recent = B/4 last
  tokens (kvgate's convention: the window includes the last token P_N); per QUERY head the
  top k = (B - |sink u recent|) / G middle keys by q_last . k_j, where q_last is the
  post-RoPE query of the last prompt token (ties to the lower position).
- SnapKV (kvpress snapkv_press.py): window w = 64 last prompt queries (kvgate caps it at B/2);
  softmax over all causal keys, mean over the window, avg_pool1d(kernel 5, padding 2,
  count_include_pad), mean over the G query heads of a kv head; per kv head the top (B - w)
  non-window keys, the window kept.

Modes:

  fixture   writes the keep sets of both rules for real kvgate-tiny prompts (the C++ eval's
            own samples) to a JSON that gates/query_policies_tiny_test.cc compares with
            gates/sage_kv.cc and gates/snapkv.cc run on the C++ engine's capture of the same
            token ids: a keep-set-level check of our scorers against this independent one.
  diagnose  per prompt (the C++ eval's samples: seed 1234, essay haystack):
            (1) the hypothesis: which token the last prompt query predicts, and which key
                each head's last query attends to most (needle value token, other needle
                token, question, BOS, haystack);
            (2) the mechanism: the "copy heads" of each digit group of the value (the heads
                whose teacher-forced decode query that emits the group puts > 0.5 of its
                attention on the group's needle token), and the rank the rule gives that
                token in that very head: survival at keep 0.3 and the smallest keep ratio at
                which the rule keeps it;
            (3) accuracy (greedy, stop at newline/EOS, exact match, as `kvgate eval`) of full,
                sage_kv and snapkv over keep ratios and two prompt templates:
                  colon  the eval's prompt, ending `Answer:`;
                  space  the answer's leading lone-space token appended (the prompt ends
                         where the digits start, as a chat template ends where the reply
                         starts; vt prompts unchanged: its answer starts with a word token);
                and, diagnostic only, each rule scored with the queries that read the answer
                (`*_reader`: the teacher-forced decode queries; a server cannot have them).

Eviction semantics, as the engine: full-attention prefill (the first generated token comes from
the full cache); then the keep set masks the prompt keys of every later token (per query
head for SAGE-KV); generated tokens are kept; keys keep their RoPE positions. Sample
generation, the masked greedy decode and the teacher-forced prefill come from
bench/query_policy_probe.py (its generator reproduces the C++ eval's prompts: 650/650 equal
answers there).

CPU, one thread. Needs torch (/usr/bin/python3). Run from the repo root:

    OMP_NUM_THREADS=1 /usr/bin/python3 bench/sage_snapkv_diagnosis.py fixture \\
        --out gates/testdata/query_policies_tiny.json
    OMP_NUM_THREADS=1 /usr/bin/python3 bench/sage_snapkv_diagnosis.py diagnose --contexts 1024 \\
        --samples 10 --keep-ratios 0.3,0.5,0.7,0.9 --json /tmp/diag.json
    /usr/bin/python3 bench/sage_snapkv_diagnosis.py tables /tmp/diag.json [more.json ...]

`diagnose` exits 0 with a message when the essay haystack (../shared/data/pg-essays) is absent.
"""

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "gates", "train"))

SNAPKV_WINDOW = 64
SNAPKV_KERNEL = 5
SINGLE_VALUE_TASKS = ("niah_single", "niah_multikey", "kv_lookup")


# --------------------------------------------------------------------------------------------
# The two rules. Inputs are per layer: keys [Hkv, n, d] and queries [Hq, R, d] (post-RoPE).
# --------------------------------------------------------------------------------------------


def topk_mask(scores, k):
    """Bool mask [H, m]: each row's k largest scores, ties to the lower position."""
    import torch
    h, m = scores.shape
    mask = torch.zeros(h, m, dtype=torch.bool)
    k = max(0, min(k, m))
    if k == 0:
        return mask
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    mask.scatter_(1, order, True)
    return mask


def sage_kv_shared(n, budget):
    """SAGE-KV's shared rows (sink, recent window with the last token) and k per query head,
    for G = 1; callers divide the free budget by G."""
    import torch
    sink, recent = budget // 4, budget // 4
    shared = torch.zeros(n, dtype=torch.bool)
    shared[:min(sink, n)] = True
    shared[n - min(max(recent, 1), n):] = True
    return shared, max(budget - int(shared.sum()), 0)


def sage_kv_scores(q_last, keys, group):
    """q_last [Hq, d], keys [Hkv, n, d] -> q . k_j / sqrt(d) per query head, [Hq, n] (float64)."""
    import torch
    d = q_last.shape[-1]
    k = keys.double().repeat_interleave(group, 0)
    return torch.einsum("hd,hnd->hn", q_last.double(), k) / math.sqrt(d)


def sage_kv_keep(q_last_layers, key_layers, n, budget, group):
    """Per layer bool [Hq, n]: the prompt rows each query head sees. None = keep everything."""
    if budget >= n:
        return None
    shared, free = sage_kv_shared(n, budget)
    k = free // group
    mid = (~shared).nonzero()[:, 0]
    out = []
    for q, keys in zip(q_last_layers, key_layers):
        s = sage_kv_scores(q, keys[:, :n], group)
        keep = shared[None, :].repeat(s.shape[0], 1)
        keep[:, mid] = topk_mask(s[:, mid], k)
        out.append(keep)
    return out


def snapkv_window(budget, window=SNAPKV_WINDOW):
    return min(window, max(1, budget // 2))


def snapkv_scores(q_win, keys, n, group, kernel=SNAPKV_KERNEL):
    """q_win [Hq, w, d]: queries of positions n-w..n-1; keys [Hkv, n, d] -> [Hkv, n - w]."""
    import torch
    import torch.nn.functional as F
    hq, w, d = q_win.shape
    k = keys[:, :n].double().repeat_interleave(group, 0)                   # [Hq, n, d]
    logits = torch.matmul(q_win.double(), k.transpose(1, 2)) / math.sqrt(d)  # [Hq, w, n]
    rows = torch.arange(n - w, n)
    logits = logits.masked_fill(torch.arange(n)[None, :] > rows[:, None], float("-inf"))
    a = torch.softmax(logits, -1).mean(1)[:, :n - w]                       # [Hq, m]
    if kernel > 1:
        a = F.avg_pool1d(a[:, None, :], kernel, 1, kernel // 2, count_include_pad=True)[:, 0]
    return a.view(hq // group, group, n - w).mean(1)


def snapkv_keep(q_layers, key_layers, n, budget, group, window=SNAPKV_WINDOW, kernel=SNAPKV_KERNEL):
    """Per layer bool [Hq, n] (the same rows for the G query heads of a kv head). q_layers:
    per layer [Hq, >= w, d], the LAST w rows being positions n-w..n-1."""
    import torch
    if budget >= n:
        return None
    w = snapkv_window(budget, window)
    if n <= w:
        return None
    out = []
    for q, keys in zip(q_layers, key_layers):
        score = snapkv_scores(q[:, q.shape[1] - w:], keys, n, group, kernel)
        sel = topk_mask(score, budget - w)
        keep = torch.cat([sel, torch.ones(sel.shape[0], w, dtype=torch.bool)], 1)
        out.append(keep.repeat_interleave(group, 0))
    return out


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


def git_commit():
    try:
        return subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                                       text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def load(model_dir, haystack, threads):
    import torch
    torch.set_num_threads(threads)
    import bpe_tokenizer
    import llama_torch
    import tiny_data
    tok = bpe_tokenizer.Tokenizer.load(model_dir)
    if haystack and os.path.isdir(haystack):
        sentences = tiny_data.split_sentences(tiny_data.read_text(haystack))
        source = "essays"
    else:
        sentences = list(tiny_data.DEFAULT_SENTENCES)
        source = "default sentences"
    model, cfg = llama_torch.load_hf_checkpoint(model_dir)
    model.use_sdpa = False
    return tok, sentences, source, model, cfg


def capture(pre, n, rows=SNAPKV_WINDOW):
    """What the engine captures after prefilling n tokens: keys [Hkv, n, d] and the queries of
    the last `rows` positions [Hq, rows, d], per layer."""
    return ([q[:, n - rows:n] for q in pre.q], [k[:, :n] for k in pre.k])


# --------------------------------------------------------------------------------------------
# fixture: keep sets for the C++ cross-check
# --------------------------------------------------------------------------------------------


def make_fixture(args):
    import torch
    from query_policy_probe import Prefill, make_sample
    tok, sentences, source, model, cfg = load(args.model, args.haystack, args.threads)
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    cases = []
    for spec in args.cases.split(","):
        task, ctx, idx = spec.split(":")
        s = make_sample(sentences, tok, task, int(ctx), args.seed, int(idx))
        ids = s["prompt_ids"]
        n = len(ids)
        pre = Prefill(model, ids, [n - 1])
        qs, ks = capture(pre, n)
        case = dict(task=task, context=int(ctx), index=int(idx), prompt_tokens=n, prompt_ids=ids,
                    keep_ratio=args.keep_ratio, answer=s["answer"].strip())
        budget = int(math.floor(args.keep_ratio * n + 0.5))
        sage = sage_kv_keep([q[:, -1] for q in qs], ks, n, budget, G)
        snap = snapkv_keep(qs, ks, n, budget, G)
        # SAGE-KV: visible rows per (layer, query head); SnapKV: kept rows per (layer, kv head).
        case["sage_kv"] = [[m.nonzero()[:, 0].tolist() for m in layer] for layer in sage]
        case["snapkv"] = [[layer[h * G].nonzero()[:, 0].tolist() for h in range(cfg.num_key_value_heads)]
                          for layer in snap]
        case["budget"] = budget
        cases.append(case)
        print("fixture: %s n=%d budget=%d" % (spec, n, budget), flush=True)
    out = dict(generator="bench/sage_snapkv_diagnosis.py fixture",
               argv=sys.argv[1:], date=datetime.datetime.utcnow().strftime("%Y-%m-%d"),
               commit=git_commit(), torch=torch.__version__, haystack=source, seed=args.seed,
               rules=dict(sage_kv="sink=B/4, recent=B/4 incl. last token, k=(B-|shared|)/G per query head",
                          snapkv="window=min(64,B/2), softmax, mean, avg_pool1d k=5, group mean"),
               cases=cases)
    with open(args.out, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print("wrote %s (%d bytes)" % (args.out, os.path.getsize(args.out)))
    return 0


# --------------------------------------------------------------------------------------------
# diagnose
# --------------------------------------------------------------------------------------------


def min_keep_sage(scores_row, pos, n, group, grid):
    """Smallest keep ratio in grid at which SAGE-KV keeps row `pos` for this query head."""
    import torch
    for r in grid:
        budget = int(math.floor(r * n + 0.5))
        if budget >= n:
            return r
        shared, free = sage_kv_shared(n, budget)
        if shared[pos]:
            return r
        mid = (~shared).nonzero()[:, 0]
        k = free // group
        s = scores_row[mid]
        # rank of pos among the middle rows: strictly better scores, then ties at lower positions.
        better = int((s > scores_row[pos]).sum()) + int(((s == scores_row[pos]) & (mid < pos)).sum())
        if better < k:
            return r
    return 1.0


def classify(pos, sample, n_body_end, value_set):
    if pos == 0:
        return "bos"
    if pos in value_set:
        return "value"
    for b, e in sample["needle_spans"]:
        if b <= pos < e:
            return "needle"
    if pos >= n_body_end:
        return "question"
    return "haystack"


def question_queries(args):
    """Could ANY ending of the question make SAGE-KV keep the later digit groups? For every
    query position of the question (from its first token to the prompt's last, i.e. every
    place a template could end), score the middle keys as SAGE-KV scores them with the last
    query, and ask whether the copied token of group g survives in its copy head at the keep
    ratio. An upper bound for any template that ends on one of the question's own tokens."""
    import torch
    from query_policy_probe import Prefill, make_sample, value_positions
    if not os.path.isdir(args.haystack):
        print("sage_snapkv_diagnosis: skipped: the essay haystack %s is absent (../shared)" % args.haystack)
        return 0
    tok, sentences, source, model, cfg = load(args.model, args.haystack, args.threads)
    L, Hq, Hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    G = Hq // Hkv
    stats = {}
    records = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        for task in SINGLE_VALUE_TASKS:
            for idx in range(args.first_sample, args.first_sample + args.samples):
                s = make_sample(sentences, tok, task, ctx, args.seed, idx)
                pids, aids = s["prompt_ids"], s["answer_ids"]
                na, full_ids = len(pids), s["prompt_ids"] + s["answer_ids"]
                vpos = value_positions(s, tok)
                alnum = lambda i: any(c.isalnum() for c in tok.decode([i]))  # noqa: E731
                reading = [p for p in range(na - 1, na + len(aids) - 1) if alnum(full_ids[p + 1])]
                if len(vpos) != len(reading):
                    continue
                qt = tok.encode("Question:")
                hits = [i for i in range(na - len(qt), -1, -1) if pids[i:i + len(qt)] == qt]
                q_begin = hits[0] if hits else na - 1
                pre = Prefill(model, full_ids, reading)
                n = na
                B = int(math.floor(args.keep_ratio * n + 0.5))
                shared, free = sage_kv_shared(n, B)
                k = free // G
                mid = (~shared).nonzero()[:, 0]
                for g, (r, p) in enumerate(zip(reading, vpos)):
                    for l in range(L):
                        for h in (pre.probs[l][:, reading.index(r), p] > 0.5).nonzero()[:, 0].tolist():
                            keys = pre.k[l][h // G, :n].double()
                            q = pre.q[l][h, q_begin:n].double()                       # [R, d]
                            sc = (q @ keys.T)[:, mid]                                  # [R, |mid|]
                            if shared[p]:
                                kept_rows = [True] * sc.shape[0]
                            else:
                                j = int((mid == p).nonzero()[0, 0])
                                better = (sc > sc[:, j:j + 1]).sum(1)
                                kept_rows = (better < k).tolist()
                            rec = dict(context=ctx, task=task, index=idx, group=g, layer=l, head=h,
                                       question_tokens=n - q_begin, kept_by_last=bool(kept_rows[-1]),
                                       kept_by_any=any(kept_rows),
                                       kept_by_rows=sum(kept_rows), shared=bool(shared[p]), kept_rows=[bool(x) for x in kept_rows],
                                       question_token_texts=[tok.decode([t]) for t in pids[q_begin:n]])
                            records.append(rec)
                            e = stats.setdefault((ctx, g), dict(heads=0, last=0, any=0))
                            e["heads"] += 1
                            e["last"] += rec["kept_by_last"]
                            e["any"] += rec["kept_by_any"]
                print("ctx %d %s #%d done" % (ctx, task, idx), flush=True)
    lines = ["Per group: copy heads, the share kept when the last query scores, and the share kept when the",
             "best single question position scores (chosen per task after the fact: an upper bound for any",
             "template ending on a question token; `any` = best position per head and sample, chance-level",
             "for ~20 positions).", "",
             "| context | group | copy heads | kept by the last query | best fixed question position: kept (task: token) | any position |",
             "|---:|---:|---:|---:|---|---:|"]
    for (ctx, g), e in sorted(stats.items()):
        # A template fixes the ending: the same offset from the question's end for every prompt of a task.
        best = []
        for task in SINGLE_VALUE_TASKS:
            rs = [r for r in records if r["context"] == ctx and r["group"] == g and r["task"] == task]
            if not rs:
                continue
            width = min(len(r["kept_rows"]) for r in rs)
            rate = [(_mean(r["kept_rows"][len(r["kept_rows"]) - 1 - o] for r in rs), o) for o in range(width)]
            top, o = max(rate)
            txt = rs[0]["question_token_texts"][len(rs[0]["kept_rows"]) - 1 - o]
            best.append("%s %.2f at %r" % (task, top, txt))
        lines.append("| %d | %d | %d | %.2f | %s | %.2f |" % (ctx, g, e["heads"], e["last"] / e["heads"],
                                                            "; ".join(best), e["any"] / e["heads"]))
    # What a template needs: ONE ending whose query keeps every copy head of every group.
    lines += ["", "Samples whose every copy head of every group is kept, when one fixed question position",
              "scores (best position per task), and when the last one does; `sink/recent` = samples whose",
              "copied tokens all lie in SAGE-KV's shared sink/recent rows (kept whatever the query).", "",
              "| context | task | samples | best fixed position: all kept (token) | last position: all kept | sink/recent |",
              "|---:|---|---:|---|---:|---:|"]
    for ctx in sorted({r["context"] for r in records}):
        for task in SINGLE_VALUE_TASKS:
            rs = [r for r in records if r["context"] == ctx and r["task"] == task]
            if not rs:
                continue
            idxs = sorted({r["index"] for r in rs})
            width = min(len(r["kept_rows"]) for r in rs)
            joint = lambda o: _mean(all(r["kept_rows"][len(r["kept_rows"]) - 1 - o]  # noqa: E731
                                        for r in rs if r["index"] == i) for i in idxs)
            top, o = max((joint(o), o) for o in range(width))
            txt = rs[0]["question_token_texts"][len(rs[0]["kept_rows"]) - 1 - o]
            base = _mean(all(r["shared"] for r in rs if r["index"] == i) for i in idxs)
            lines.append("| %d | %s | %d | %.2f (%r) | %.2f | %.2f |" % (ctx, task, len(idxs), top, txt, joint(0), base))
    text = "\n".join(lines)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(script="bench/sage_snapkv_diagnosis.py question", argv=sys.argv[1:],
                           date=datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%MZ"), commit=git_commit(),
                           keep_ratio=args.keep_ratio, table=text, records=records), f)
    return 0


def diagnose(args):
    import torch
    from query_policy_probe import (Prefill, greedy_decode, make_sample, normalize_answer,
                                    sage_keep as probe_sage_keep, snapkv_keep as probe_snapkv_keep,
                                    value_positions)
    if not os.path.isdir(args.haystack):
        print("sage_snapkv_diagnosis: skipped: the essay haystack %s is absent (../shared)" % args.haystack)
        return 0
    tok, sentences, source, model, cfg = load(args.model, args.haystack, args.threads)
    L, Hq, Hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    G = Hq // Hkv
    stop_ids = {tok.eos_id}
    newline_ids = {i for i in range(cfg.vocab_size) if i in tok.id_to_token and "\n" in tok.decode([i])}
    space_id = [i for i in range(cfg.vocab_size) if i in tok.id_to_token and tok.decode([i]) == " "]
    ratios = [float(r) for r in args.keep_ratios.split(",")]
    grid = [round(0.01 * i, 2) for i in range(1, 101)]
    records = []
    t_start = time.time()
    for ctx in [int(c) for c in args.contexts.split(",")]:
        for task in args.tasks.split(","):
            for idx in range(args.first_sample, args.first_sample + args.samples):
                t0 = time.time()
                s = make_sample(sentences, tok, task, ctx, args.seed, idx)
                pids, aids = s["prompt_ids"], s["answer_ids"]
                na, A = len(pids), len(aids)
                full_ids = pids + aids
                vpos = value_positions(s, tok)
                alnum = lambda i: any(c.isalnum() for c in tok.decode([i]))  # noqa: E731
                reading = [p for p in range(na - 1, na + A - 1) if alnum(full_ids[p + 1])]
                rows = list(range(na - SNAPKV_WINDOW, na + A - 1))
                pre = Prefill(model, full_ids, rows)
                ridx = {r: i for i, r in enumerate(rows)}
                # The question starts at the last "Question:" (its '\n' may merge with the '.' before).
                qt = tok.encode("Question:")
                hits = [i for i in range(na - len(qt), -1, -1) if pids[i:i + len(qt)] == qt]
                body_end = hits[0] - 1 if hits else na
                lone_space = tok.decode([aids[0]]) == " "
                single = task in SINGLE_VALUE_TASKS and len(vpos) == len(reading)
                vset = set(vpos)
                for tmpl in args.templates.split(","):
                    if tmpl == "space" and lone_space:
                        n, prefix = na + 1, tok.decode([aids[0]])
                    elif tmpl in ("colon", "space"):
                        n, prefix = na, ""
                    else:
                        raise ValueError(tmpl)
                    rec = dict(context=ctx, task=task, index=idx, template=tmpl, n=n, changed=(n != na),
                               answer=s["answer"].strip())
                    # (1) what the last prompt query predicts, and where each head's attention peaks
                    pred = int(torch.argmax(pre.logits[n - 1]))
                    rec["last_predicts"] = tok.decode([pred])
                    rec["last_predicts_lone_space"] = pred in space_id
                    rec["last_predicts_answer_token"] = pred == full_ids[n] if n < len(full_ids) else False
                    cats = []
                    for l in range(L):
                        top = pre.probs[l][:, ridx[n - 1]].argmax(-1).tolist()   # [Hq]
                        cats.append([classify(p, s, body_end, vset) for p in top])
                    rec["last_top_key_category"] = cats
                    rec["last_value_mass_max"] = [float(pre.probs[l][:, ridx[n - 1], vpos].sum(-1).max()) for l in range(L)]
                    # (2) copy heads per value group and the rules' rank of the copied token there
                    qs, ks = capture(pre, n)
                    sage_rows = [sage_kv_scores(q[:, -1], k, G) for q, k in zip(qs, ks)]        # [Hq, n]
                    w = SNAPKV_WINDOW
                    snap_rows = [snapkv_scores(q[:, q.shape[1] - w:], k, n, G) for q, k in zip(qs, ks)]  # [Hkv, n-w]
                    if single:
                        groups = []
                        for g, (r, p) in enumerate(zip(reading, vpos)):
                            if r < n - 1:
                                continue  # already in the prompt (space template's first group is generated by prefill)
                            heads = []
                            for l in range(L):
                                for h in (pre.probs[l][:, ridx[r], p] > 0.5).nonzero()[:, 0].tolist():
                                    srow = snap_rows[l][h // G]
                                    snap_rank = int((srow > srow[p]).sum()) if p < n - w else 0
                                    snap_min = 1.0 if p >= n - w else None
                                    if snap_min is None:
                                        need = snap_rank + 1 + w   # B - w top slots must reach the rank
                                        snap_min = next((x for x in grid if int(math.floor(x * n + 0.5)) >= need), 1.0)
                                    heads.append(dict(layer=l, head=h, attn=float(pre.probs[l][h, ridx[r], p]),
                                                      sage_kv_min_keep=min_keep_sage(sage_rows[l][h], p, n, G, grid),
                                                      snapkv_min_keep=snap_min, snapkv_rank=snap_rank))
                            groups.append(dict(group=g, position=p, copy_heads=heads))
                        rec["groups"] = groups
                    # (3) accuracy
                    first = int(torch.argmax(pre.logits[n - 1]))
                    acc = {}
                    cross = {}
                    for ratio in ratios:
                        B = int(math.floor(ratio * n + 0.5))
                        keeps = {"sage_kv": sage_kv_keep([q[:, -1] for q in qs], ks, n, B, G),
                                 "snapkv": snapkv_keep(qs, ks, n, B, G)}
                        # The probe's independent rules (bench/query_policy_probe.py) on the same prompt.
                        pk = {"sage_kv": probe_sage_keep(pre, cfg, n, B), "snapkv": probe_snapkv_keep(pre, cfg, n, B)}
                        for name in keeps:
                            a, b = keeps[name], pk[name]
                            cross["%s@%g" % (name, ratio)] = (a is None and b is None) or all(
                                bool(torch.equal(x, y)) for x, y in zip(a, b))
                        if args.readers and ratio == ratios[0]:
                            rr = [x for x in reading if x >= n - 1] or reading
                            keeps["sage_kv_reader"] = probe_sage_keep(pre, cfg, n, B, oracle_rows=rr)
                            keeps["snapkv_reader"] = probe_snapkv_keep(pre, cfg, n, B, query_rows=rr)
                        for name, keep in keeps.items():
                            gen = greedy_decode(model, pre, n, keep, first, stop_ids, newline_ids)
                            out = normalize_answer(prefix + tok.decode(gen))
                            acc["%s@%g" % (name, ratio)] = dict(correct=out == s["answer"].strip(), output=out)
                    gen = greedy_decode(model, pre, n, None, first, stop_ids, newline_ids)
                    out = normalize_answer(prefix + tok.decode(gen))
                    acc["full@1"] = dict(correct=out == s["answer"].strip(), output=out)
                    rec["accuracy"] = acc
                    rec["probe_rules_agree"] = cross
                    records.append(rec)
                print("%5.0fs ctx %d %s #%d n=%d %.1fs %s" % (
                    time.time() - t_start, ctx, task, idx, na, time.time() - t0,
                    " ".join("%s:%s=%d" % (r["template"], k, v["correct"]) for r in records[-2:]
                             if r["index"] == idx and r["task"] == task for k, v in sorted(r["accuracy"].items()))),
                    flush=True)
    out = dict(script="bench/sage_snapkv_diagnosis.py diagnose", argv=sys.argv[1:],
               date=datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%MZ"), commit=git_commit(),
               torch=torch.__version__, threads=args.threads, seed=args.seed, haystack=source,
               elapsed_s=round(time.time() - t_start, 1), records=records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)
    print(render_tables([out]))
    return 0


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(math.floor(q * (len(xs) - 1) + 0.5)))]


def render_tables(runs):
    from query_policy_probe import TASKS
    recs = [r for run in runs for r in run["records"]]
    lines = []
    keys = sorted({k for r in recs for k in r["accuracy"]}, key=lambda k: (k.split("@")[0] != "full", k))
    for ctx in sorted({r["context"] for r in recs}):
        lines.append("\n### Accuracy, context %d (mean over tasks; per task in brackets: %s)\n" % (ctx, ", ".join(TASKS)))
        lines.append("| template | policy@keep | samples | mean | per task |")
        lines.append("|---|---|---:|---:|---|")
        for tmpl in ("colon", "space"):
            rs = [r for r in recs if r["context"] == ctx and r["template"] == tmpl]
            if not rs:
                continue
            for k in keys:
                have = [r for r in rs if k in r["accuracy"]]
                if not have:
                    continue
                per = [_mean(r["accuracy"][k]["correct"] for r in have if r["task"] == t) for t in TASKS]
                lines.append("| %s | %s | %d | **%.2f** | %s |" % (
                    tmpl, k, len(have), _mean(r["accuracy"][k]["correct"] for r in have),
                    " / ".join("%.2f" % p if p == p else "-" for p in per)))
        lines.append("\n### The last prompt query, context %d\n" % ctx)
        lines.append("| template | samples | predicts a lone space | predicts the answer's next token | "
                     "top key of the last query, layers 5-7 (value / needle / question / bos / haystack) | "
                     "largest value mass in a head, L5 / L6 / L7 |")
        lines.append("|---|---:|---:|---:|---|---|")
        for tmpl in ("colon", "space"):
            rs = [r for r in recs if r["context"] == ctx and r["template"] == tmpl and r["task"] != "vt"]
            if not rs:
                continue
            cats = [c for r in rs for l in (5, 6, 7) for c in r["last_top_key_category"][l]]
            frac = lambda c: cats.count(c) / len(cats)  # noqa: E731
            lines.append("| %s | %d | %.2f | %.2f | %.2f / %.2f / %.2f / %.2f / %.2f | %s |" % (
                tmpl, len(rs), _mean(r["last_predicts_lone_space"] for r in rs),
                _mean(r["last_predicts_answer_token"] for r in rs),
                frac("value"), frac("needle"), frac("question"), frac("bos"), frac("haystack"),
                " / ".join("%.2f" % _mean(r["last_value_mass_max"][l] for r in rs) for l in (5, 6, 7))))
        lines.append("\n### Copy heads of each digit group and the rule's rank there, context %d "
                     "(niah_single, niah_multikey, kv_lookup)\n" % ctx)
        lines.append("| template | rule | group | copy heads | kept at keep 0.3 | keep needed: median / 90th pct | "
                     "samples whose every copy head of every group is kept at 0.3 | keep needed for that, median / 90th pct |")
        lines.append("|---|---|---:|---:|---:|---|---:|---|")
        for tmpl in ("colon", "space"):
            rs = [r for r in recs if r["context"] == ctx and r["template"] == tmpl and r.get("groups")]
            if not rs:
                continue
            for rule in ("sage_kv", "snapkv"):
                key = rule + "_min_keep"
                for g in (0, 1, 2):
                    hs = [h for r in rs for gr in r["groups"] if gr["group"] == g for h in gr["copy_heads"]]
                    if not hs:
                        continue
                    need = [h[key] for h in hs]
                    lines.append("| %s | %s | %d | %d | %.2f | %.2f / %.2f | | |" % (
                        tmpl, rule, g, len(hs), _mean(x <= 0.3 + 1e-9 for x in need), _pct(need, 0.5), _pct(need, 0.9)))
                per_sample = [max([h[key] for gr in r["groups"] for h in gr["copy_heads"]] or [0.0]) for r in rs]
                lines.append("| %s | %s | all | | | | %.2f (%d samples) | %.2f / %.2f |" % (
                    tmpl, rule, _mean(x <= 0.3 + 1e-9 for x in per_sample), len(rs),
                    _pct(per_sample, 0.5), _pct(per_sample, 0.9)))
    # Per-sample correctness against the C++ `kvgate eval` (CUDA, bf16; same seed and prompts).
    from query_policy_probe import compare_cpp
    flat = []
    for r in recs:
        for k, v in r["accuracy"].items():
            pol, keep = k.split("@")
            flat.append(dict(template=r["template"], policy=pol, keep_ratio=float(keep), context=r["context"],
                             task=r["task"], index=r["index"], correct=v["correct"]))
    cpp = compare_cpp(flat, os.path.join(HERE, "results", "quality-kvgate-tiny.json"))
    if cpp and "note" not in cpp:
        lines.append("\n### Same prompts in the C++ `kvgate eval` (quality-kvgate-tiny.json), template colon\n")
        lines.append("| policy, keep, context | samples | same correctness | C++ correct | here correct |")
        lines.append("|---|---:|---:|---:|---:|")
        for key in sorted(cpp):
            e = cpp[key]
            lines.append("| %s | %d | %d | %d | %d |" % (key.replace("|", ", "), e["samples"], e["agree"],
                                                       e["cpp_correct"], e["py_correct"]))
    agree = [v for r in recs for v in r.get("probe_rules_agree", {}).values()]
    if agree:
        lines.append("\nThis script's rules vs bench/query_policy_probe.py's: identical keep sets in %d of %d "
                     "(prompt, template, rule, keep) cells." % (sum(agree), len(agree)))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    for name in ("fixture", "diagnose", "question"):
        p = sub.add_parser(name)
        p.add_argument("--model", default=os.path.join(ROOT, "models", "kvgate-tiny"))
        p.add_argument("--haystack", default=os.path.join(ROOT, "..", "shared", "data", "pg-essays"))
        p.add_argument("--seed", type=int, default=1234)
        p.add_argument("--threads", type=int, default=1)
    fx = sub.choices["fixture"]
    fx.add_argument("--cases", default="niah_single:1024:0,kv_lookup:1024:1",
                    help="task:context:sample_index, comma-separated (the C++ eval's samples)")
    fx.add_argument("--keep-ratio", type=float, default=0.3)
    fx.add_argument("--out", default=os.path.join(ROOT, "gates", "testdata", "query_policies_tiny.json"))
    dg = sub.choices["diagnose"]
    dg.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,kv_lookup,vt")
    dg.add_argument("--contexts", default="1024")
    dg.add_argument("--samples", type=int, default=10)
    dg.add_argument("--first-sample", type=int, default=0)
    dg.add_argument("--keep-ratios", default="0.3,0.5,0.7,0.9", help="the first one also runs the *_reader diagnostics")
    dg.add_argument("--templates", default="colon,space")
    dg.add_argument("--no-readers", dest="readers", action="store_false")
    dg.add_argument("--json")
    qq = sub.choices["question"]
    qq.add_argument("--contexts", default="1024")
    qq.add_argument("--samples", type=int, default=10)
    qq.add_argument("--first-sample", type=int, default=0)
    qq.add_argument("--keep-ratio", type=float, default=0.3)
    qq.add_argument("--json")
    tb = sub.add_parser("tables")
    tb.add_argument("paths", nargs="+")
    tb.add_argument("--markdown", help="also write the tables here")
    tb.add_argument("--summary-json", help="write the runs' records, compacted, to this JSON")
    args = ap.parse_args(argv)
    if args.mode == "fixture":
        return make_fixture(args)
    if args.mode == "diagnose":
        return diagnose(args)
    if args.mode == "question":
        return question_queries(args)
    runs = []
    for p in args.paths:
        with open(p) as f:
            runs.append(json.load(f))
    text = render_tables(runs)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.summary_json:
        out = dict(runs=[{k: v for k, v in run.items() if k != "records"} for run in runs], records=[])
        for run in runs:
            for r in run["records"]:
                r = dict(r)
                per_layer = r.pop("last_top_key_category")
                cats = [c for l in (5, 6, 7) for c in per_layer[l]]
                r["last_top_key_category_l5_7"] = {c: cats.count(c) for c in sorted(set(cats))}
                out["records"].append(r)
        with open(args.summary_json, "w") as f:
            json.dump(out, f, separators=(",", ":"))
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
