#!/usr/bin/env python3
"""Query-based eviction (SnapKV, SAGE-KV) on models/kvgate-tiny: an independent PyTorch probe.

Issue 14, item 1: at keep ratio 0.3 the C++ `kvgate eval` scores 12.7% (sage_kv) and 26%
(snapkv) on the retrieval tasks against 99.7% for the full cache. The recorded hypothesis:
the prompt ends with `Answer:` and the answer ` 9800943` is the tokens ` `, `980`, `094`,
`3`, so the prompt's last query predicts a lone space and does not read the needle.

This script re-implements both papers' selection rules in PyTorch, independently of the C++
code in gates/ (written from docs/eviction-methods.md, not ported from snapkv.cc/sage_kv.cc),
and measures, on the SAME prompts the C++ eval builds (bench/retrieval_tasks.cc's sample
generator is ported below: SplitMix64 TaskRng, FNV-1a sample seeds, the haystack bisection):

- accuracy (greedy, stop at newline/EOS, exact match) for full / snapkv / sage_kv under
  prompt templates:
    colon  the current template, the prompt ends with `Answer:` (what the C++ eval runs);
    space  the answer's leading space token appended to the prompt (the prompt ends where
           the answer's first digits start, as chat templates end where the reply starts).
           Only where the answer starts with a lone space token (not vt: ` cherry` is one
           token; there the prompt is unchanged);
  plus variants of the selection's free hyper-parameters (SnapKV window / pooling kernel)
  and, as a diagnostic only, an "oracle" selection scored with the teacher-forced queries of
  the answer tokens (the decode queries that actually read the digits);
- diagnostics: the fraction of the needle's value tokens each policy keeps, per layer and
  kv head; the attention mass that the scoring queries (SAGE-KV: the last prompt token;
  SnapKV: the window) give the needle's value tokens, against the mass given by the decode
  queries that read them (teacher-forced full-cache run of prompt + answer).

Eviction semantics, as in the C++ engine and both papers: the prompt is prefilled with full
attention (so the first generated token comes from the full cache), the keep set is then
applied as a key mask over the prompt's KV for every later token; generated tokens are
always kept; keys keep their original RoPE positions.

SnapKV (kvpress snapkv_press.py, eviction-methods.md sections 6 and 9.5): window w = the last
64 prompt queries (capped at half the budget, as the C++ policy does), softmax over all keys
(causal), mean over the window, avg_pool1d(kernel 5, padding 2, count_include_pad), mean over
the G query heads of a kv head; per kv head top (B - w) of the non-window keys; window kept.
SAGE-KV (arXiv 2503.08879, section 3): sink = B/4 first tokens, recent = B/4 last tokens (the
last token always kept), k = (B - |sink u recent|) / G middle keys per QUERY head by the last
prompt token's q.k (softmax-free; the order is the same). B = round(keep_ratio * n).

Policies (--policies, comma-separated): full, snapkv, sage_kv; SnapKV's free parameters as
snapkv:wN (window), snapkv:kN (pooling kernel), snapkv:max (max- instead of avg-pooling), e.g.
snapkv:w32:k7:max; diagnostics only (not policies: they score with queries a server does not
have at prefill): snapkv_oracle / sage_kv_oracle, the same rules with the teacher-forced
queries that emit the answer's value tokens (SAGE-KV: max softmax over them, per query head).

The run checks itself against the C++ eval: --cpp-json (default
bench/results/quality-kvgate-tiny.json, seed 1234) holds the C++ per-sample correctness for
the same prompts; the agreement of full/snapkv/sage_kv under the colon template is printed
and stored.

CPU only, one thread by default. Needs torch (Debian's python3-torch: /usr/bin/python3); the
essay haystack of ../shared/data/pg-essays (the script exits 0 with a message when it is
absent). Run from the repo root:

    python3 bench/query_policy_probe.py --contexts 1024 --samples 10 --keep-ratios 0.3 \
        --json /tmp/probe.json
    python3 bench/query_policy_probe.py --tables /tmp/probe.json [more.json ...]   # markdown
    python3 bench/query_policy_probe.py --merge OUT.json /tmp/probe.json [more.json ...]
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
sys.path.insert(0, os.path.join(ROOT, "gates", "train"))

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "kv_lookup", "vt")
from tiny_data import WORDS as KEY_WORDS  # noqa: E402  (the C++ generator's 63 key words)
MARGIN = 16          # kContextMarginTokens
MAX_NEW = 48         # kMaxAnswerTokens
M64 = (1 << 64) - 1

# --------------------------------------------------------------------------------------------
# The C++ sample generator (bench/retrieval_tasks.cc), ported so that sample i of task t at
# context c is the very prompt `kvgate eval --seed 1234` scored.
# --------------------------------------------------------------------------------------------


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xbf58476d1ce4e5b9) & M64
    z = ((z ^ (z >> 27)) * 0x94d049bb133111eb) & M64
    return z ^ (z >> 31)


def fnv1a64(s):
    h = 0xcbf29ce484222325
    for c in s.encode("utf-8"):
        h ^= c
        h = (h * 0x100000001b3) & M64
    return h


class TaskRng:
    def __init__(self, seed):
        self.state = seed & M64

    def next(self):
        self.state = (self.state + 0x9e3779b97f4a7c15) & M64
        return mix64(self.state)

    def below(self, n):
        return (self.next() * n) >> 64

    def unit(self):
        return (self.next() >> 11) * (2.0 ** -53)


def sample_seed(seed, task, ctx, index):
    return seed ^ mix64(fnv1a64("%s:%d:%d" % (task, ctx, index)))


def _keys(n, rng):
    out = []
    while len(out) < n:
        w = rng.below(63)
        num = 100 + rng.below(900)
        k = "%s-%d" % (KEY_WORDS[w], num)
        if k not in out:
            out.append(k)
    return out


def _values(n, rng):
    out = []
    while len(out) < n:
        v = str(1000000 + rng.below(9000000))
        if v not in out:
            out.append(v)
    return out


def task_content(task, rng):
    """(inserted sentences, question, answer, index of the asked/relevant sentences)."""
    mq = lambda k: "\nQuestion: What is the special magic number for %s?\nAnswer:" % k  # noqa: E731
    if task == "niah_single":
        k, = _keys(1, rng)
        v, = _values(1, rng)
        ins, q, a, rel = ["The special magic number for %s is %s." % (k, v)], mq(k), " " + v, [0]
    elif task == "niah_multikey":
        ks, vs = _keys(4, rng), _values(4, rng)
        j = rng.below(4)
        ins = ["The special magic number for %s is %s." % (k, v) for k, v in zip(ks, vs)]
        q, a, rel = mq(ks[j]), " " + vs[j], [j]
    elif task == "niah_multivalue":
        k, = _keys(1, rng)
        vs = _values(4, rng)
        ins = ["One of the special magic numbers for %s is %s." % (k, v) for v in vs]
        q = "\nQuestion: What are all the special magic numbers for %s?\nAnswer:" % k
        a, rel = " " + ", ".join(vs), [0, 1, 2, 3]
    elif task == "kv_lookup":
        ks, vs = _keys(24, rng), _values(24, rng)
        j = rng.below(24)
        ins = ["Key %s has value %s." % (k, v) for k, v in zip(ks, vs)]
        q = "\nQuestion: What is the value of key %s?\nAnswer:" % ks[j]
        a, rel = " " + vs[j], [j]
    elif task == "vt":
        names = _keys(4, rng)
        v, = _values(1, rng)
        ins = ["VAR %s = %s." % (names[0], v)] + ["VAR %s = VAR %s." % (names[i], names[i - 1]) for i in range(1, 4)]
        q = "\nQuestion: Which variables are assigned the value %s?\nAnswer:" % v
        a, rel = " " + " ".join(names), [0, 1, 2, 3]
    else:
        raise ValueError(task)
    depths = sorted(rng.unit() for _ in ins)
    return ins, q, a, rel, depths


def _round_half_even(x):
    return int(round(x))  # std::nearbyint (round-half-even), as Python's round


def compose_body(sentences, start, n, ins, depths):
    parts, nxt = [], 0
    m = len(sentences)
    for k in range(n):
        while nxt < len(ins) and _round_half_even(depths[nxt] * n) <= k:
            parts.append(ins[nxt])
            nxt += 1
        parts.append(sentences[(start + k) % m])
    while nxt < len(ins) and _round_half_even(depths[nxt] * n) <= n:
        parts.append(ins[nxt])
        nxt += 1
    return " ".join(parts)


def make_sample(sentences, tok, task, ctx, seed, index):
    rng = TaskRng(sample_seed(seed, task, ctx, index))
    start = rng.below(len(sentences))
    ins, q, a, rel, depths = task_content(task, rng)
    enc = lambda text: [tok.bos_id] + tok.encode(text)  # noqa: E731
    limit = ctx - MARGIN
    length = lambda n: len(enc(compose_body(sentences, start, n, ins, depths) + q + a))  # noqa: E731
    if length(0) > limit:
        raise ValueError("context %d too small for %s" % (ctx, task))
    lo, hi = 0, 8
    while length(hi) <= limit:  # length is monotone in n: the largest n that fits is unique
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= limit:
            lo = mid
        else:
            hi = mid
    body = compose_body(sentences, start, lo, ins, depths)
    prompt_ids = enc(body + q)
    full_ids = enc(body + q + a)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise AssertionError("prompt ids are not a prefix of prompt + answer ids")
    answer_ids = full_ids[len(prompt_ids):]
    # Token spans of the relevant inserted sentences (the needles the answer comes from).
    spans = []
    for r in rel:
        # Without its final '.' token: before the question '.' and '\n' form one token.
        found = None
        for text in (" " + ins[r], ins[r]):  # the body's first sentence has no leading space
            sid = tok.encode(text)[:-1]
            pos = _find_sub(prompt_ids, sid)
            if pos >= 0:
                found = (pos, pos + len(sid) + 1)
                break
        if found is None:
            raise AssertionError("needle not found in the prompt ids")
        spans.append(found)
    return dict(task=task, context=ctx, index=index, prompt_ids=prompt_ids, answer_ids=answer_ids,
                answer=a, needle_spans=spans, filler=lo)


def _find_sub(seq, sub):
    n, m = len(seq), len(sub)
    for i in range(n - m + 1):
        if seq[i] == sub[0] and seq[i:i + m] == sub:
            return i
    return -1


def value_positions(sample, tok):
    """Prompt positions of the needle's answer-bearing tokens: the tokens inside the relevant
    needle sentences whose ids occur in the answer and hold a letter or digit (the value's
    digit groups; vt: the variable names' word and number tokens)."""
    ans = set(i for i in sample["answer_ids"] if any(c.isalnum() for c in tok.decode([i])))
    ids = sample["prompt_ids"]
    out = []
    for b, e in sample["needle_spans"]:
        for p in range(b, e):
            if ids[p] in ans:
                out.append(p)
    return sorted(set(out))


# --------------------------------------------------------------------------------------------
# Model: full-attention prefill (llama_torch) and cached decode under a prompt-key mask
# --------------------------------------------------------------------------------------------


class Prefill:
    """Full-attention forward over ids: logits, post-RoPE Q/K, V, and the attention rows asked."""

    def __init__(self, model, ids, prob_rows):
        import torch
        t = torch.tensor([ids], dtype=torch.long)
        out = model(t, output_attentions_for=torch.tensor(prob_rows, dtype=torch.long), return_qk=True,
                    return_layer_inputs=True)
        self.logits = out.logits[0]                         # [T, V]
        self.q = [q[0] for q in out.queries]                # [Hq, T, d]
        self.k = [k[0] for k in out.keys]                   # [Hkv, T, d]
        self.v = []
        cfg = model.config
        for layer, x in zip(model.model.layers, out.layer_inputs):
            v = layer.self_attn.v_proj(x).view(1, len(ids), cfg.num_key_value_heads, cfg.head_dim)
            self.v.append(v[0].transpose(0, 1).contiguous())  # [Hkv, T, d]
        self.rows = list(prob_rows)
        self.probs = [p[0] for p in out.attentions]         # [Hq, R, T]


def greedy_decode(model, pre, n, keep, first_token, stop_ids, newline_ids, max_new=MAX_NEW):
    """Decode after a prompt of n tokens whose KV is pre.k/v[:, :n]; keep[l] bool [Hq, n] (None =
    everything). first_token comes from the full-cache prefill. Returns the generated ids."""
    import torch
    cfg = model.config
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    scale = cfg.head_dim ** -0.5
    L = cfg.num_hidden_layers
    kp = [pre.k[l][:, :n].repeat_interleave(G, 0) for l in range(L)]   # [Hq, n, d]
    vp = [pre.v[l][:, :n].repeat_interleave(G, 0) for l in range(L)]
    bias = []
    for l in range(L):
        b = torch.zeros(cfg.num_attention_heads, n)
        if keep is not None:
            b.masked_fill_(~keep[l], float("-inf"))
        bias.append(b)
    gk = [[] for _ in range(L)]
    gv = [[] for _ in range(L)]
    out = [first_token]
    tok, pos = first_token, n
    while tok not in stop_ids and tok not in newline_ids and len(out) < max_new:
        h = model.model.embed_tokens(torch.tensor([[tok]]))
        cos, sin = model.rope(torch.tensor([[pos]]), h.dtype)
        for l, layer in enumerate(model.model.layers):
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.project(x, cos, sin)           # [1, H, 1, d]
            gk[l].append(k[0].repeat_interleave(G, 0))              # [Hq, 1, d]
            gv[l].append(v[0].repeat_interleave(G, 0))
            kg, vg = torch.cat(gk[l], 1), torch.cat(gv[l], 1)
            qv = q[0]                                               # [Hq, 1, d]
            sp = torch.matmul(qv, kp[l].transpose(1, 2))[:, 0] * scale + bias[l]   # [Hq, n]
            sg = torch.matmul(qv, kg.transpose(1, 2))[:, 0] * scale               # [Hq, t]
            p = torch.softmax(torch.cat([sp, sg], 1).float(), -1)
            o = torch.matmul(p[:, None, :n], vp[l])[:, 0] + torch.matmul(p[:, None, n:], vg)[:, 0]  # [Hq, d]
            h = h + layer.self_attn.o_proj(o.reshape(1, 1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = model.lm_head(model.model.norm(h))[0, -1]
        tok = int(torch.argmax(logits))
        pos += 1
        out.append(tok)
    return out


def normalize_answer(text):
    text = text.split("\n", 1)[0]
    return text.strip(" \t\n\v\f\r")


# --------------------------------------------------------------------------------------------
# The two papers' selection rules, written from eviction-methods.md (not from gates/*.cc)
# --------------------------------------------------------------------------------------------


def budget_of(keep_ratio, n):
    return max(0, min(n, int(math.floor(keep_ratio * n + 0.5))))  # llround


def _topk_stable(scores, k):
    """Boolean mask [H, m] of each row's k best scores; ties to the lower position."""
    import torch
    h, m = scores.shape
    mask = torch.zeros(h, m, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    mask.scatter_(1, order, True)
    return mask


def snapkv_keep(pre, cfg, n, B, window=64, kernel=5, pool="avg", cap_window=True, query_rows=None):
    """SnapKV keep mask per layer, [Hq, n] bool (identical for the G query heads of a kv head).

    query_rows: the observation queries' positions (default: the last w prompt positions; the
    diagnostic "oracle" passes the answer's teacher-forced rows). The window kept is always
    the last w prompt positions.
    """
    import torch
    import torch.nn.functional as F
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    G = Hq // Hkv
    if B >= n:
        return None
    w = min(window, max(1, B // 2)) if cap_window else window
    if n <= w:
        return None
    m = n - w
    rows = list(range(n - w, n)) if query_rows is None else list(query_rows)
    keeps = []
    for l in range(cfg.num_hidden_layers):
        q = pre.q[l][:, rows].double()                                    # [Hq, R, d]
        k = pre.k[l].double().repeat_interleave(G, 0)                     # [Hq, T, d]
        logits = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(cfg.head_dim)   # [Hq, R, T]
        pos = torch.arange(k.shape[1])
        causal = pos[None, :] > torch.tensor(rows)[:, None]
        logits = logits.masked_fill(causal[None], float("-inf"))
        a = torch.softmax(logits, -1).mean(1)[:, :m]                      # [Hq, m]
        if kernel > 1:
            if pool == "avg":
                a = F.avg_pool1d(a[:, None, :], kernel, 1, kernel // 2, count_include_pad=True)[:, 0]
            else:
                a = F.max_pool1d(a[:, None, :], kernel, 1, kernel // 2)[:, 0]
        score = a.view(Hkv, G, m).mean(1)                                 # GQA: mean over the group
        sel = _topk_stable(score, B - w)                                  # [Hkv, m]
        keep = torch.cat([sel, torch.ones(Hkv, w, dtype=torch.bool)], 1)  # window kept
        keeps.append(keep.repeat_interleave(G, 0))
    return keeps


def sage_keep(pre, cfg, n, B, query_row=None, oracle_rows=None):
    """SAGE-KV keep mask per layer, [Hq, n] bool (per QUERY head).

    sink = B/4, recent = B/4 (with the last token), k = (B - |shared|) / G per query head by the
    last prompt token's q.k. Diagnostic: oracle_rows scores each key by the max softmax
    probability over those (teacher-forced answer) rows instead.
    """
    import torch
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    G = Hq // Hkv
    if B >= n:
        return None
    sink, recent = B // 4, B // 4
    shared = torch.zeros(n, dtype=torch.bool)
    shared[:sink] = True
    if recent > 0:
        shared[n - recent:] = True
    shared[n - 1] = True
    k = max(B - int(shared.sum()), 0) // G
    mid = (~shared).nonzero()[:, 0]
    row = n - 1 if query_row is None else query_row
    keeps = []
    for l in range(cfg.num_hidden_layers):
        kk = pre.k[l][:, :n].double().repeat_interleave(G, 0)            # [Hq, n, d]
        if oracle_rows is None:
            q = pre.q[l][:, row].double()                                  # [Hq, d]
            s = torch.einsum("hd,hnd->hn", q, kk) / math.sqrt(cfg.head_dim)
        else:
            q = pre.q[l][:, oracle_rows].double()                          # [Hq, R, d]
            kf = pre.k[l].double().repeat_interleave(G, 0)
            lg = torch.matmul(q, kf.transpose(1, 2)) / math.sqrt(cfg.head_dim)
            pos = torch.arange(kf.shape[1])
            lg = lg.masked_fill(pos[None, None, :] > torch.tensor(oracle_rows)[None, :, None], float("-inf"))
            s = torch.softmax(lg, -1).amax(1)[:, :n]
        sel = _topk_stable(s[:, mid], k)                                   # [Hq, |mid|]
        keep = shared[None, :].repeat(Hq, 1)
        keep[:, mid] = sel
        keeps.append(keep)
    return keeps


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def parse_policy(name):
    """full | sage_kv | sage_kv_oracle | snapkv[:wN][:kN][:max|avg] | snapkv_oracle[...]."""
    parts = name.split(":")
    base = parts[0]
    if base not in ("full", "sage_kv", "sage_kv_oracle", "snapkv", "snapkv_oracle"):
        raise ValueError("unknown policy %r" % name)
    opt = dict(window=64, kernel=5, pool="avg")
    for p in parts[1:]:
        if p in ("max", "avg"):
            opt["pool"] = p
        elif p[0] == "w":
            opt["window"] = int(p[1:])
        elif p[0] == "k":
            opt["kernel"] = int(p[1:])
        else:
            raise ValueError("bad policy option %r in %r" % (p, name))
    return base, opt


def keep_for(policy, pre, cfg, n, B, reading_rows):
    base, opt = parse_policy(policy)
    if base == "full":
        return None
    if base == "sage_kv":
        return sage_keep(pre, cfg, n, B)
    if base == "sage_kv_oracle":
        return sage_keep(pre, cfg, n, B, oracle_rows=reading_rows)
    if base == "snapkv":
        return snapkv_keep(pre, cfg, n, B, opt["window"], opt["kernel"], opt["pool"])
    if base == "snapkv_oracle":
        return snapkv_keep(pre, cfg, n, B, opt["window"], opt["kernel"], opt["pool"], query_rows=reading_rows)
    raise ValueError(policy)


def git_commit():
    try:
        return subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "kvgate-tiny"))
    ap.add_argument("--haystack", default=os.path.join(ROOT, "..", "shared", "data", "pg-essays"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--contexts", default="1024")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--first-sample", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--keep-ratios", default="0.3")
    ap.add_argument("--templates", default="colon,space")
    ap.add_argument("--policies", default="full,snapkv,sage_kv")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write per-sample results and aggregates here")
    ap.add_argument("--cpp-json", default=os.path.join(HERE, "results", "quality-kvgate-tiny.json"),
                    help="C++ eval results (same seed) to compare per-sample correctness with")
    args = ap.parse_args(argv)

    if not os.path.isdir(args.haystack):
        print("query_policy_probe: skipped: the essay haystack %s is absent (it lives in ../shared)"
              % args.haystack)
        return 0
    import torch
    torch.set_num_threads(args.threads)
    import bpe_tokenizer
    import llama_torch
    import tiny_data

    tok = bpe_tokenizer.Tokenizer.load(args.model)
    sentences = tiny_data.split_sentences(tiny_data.read_text(args.haystack))
    model, cfg = llama_torch.load_hf_checkpoint(args.model)
    model.use_sdpa = False
    L, Hq = cfg.num_hidden_layers, cfg.num_attention_heads
    stop_ids = {tok.eos_id}
    newline_ids = {i for i in range(cfg.vocab_size) if i in tok.id_to_token and "\n" in tok.decode([i])}
    tasks = args.tasks.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    ratios = [float(r) for r in args.keep_ratios.split(",")]
    templates = args.templates.split(",")
    policies = args.policies.split(",")
    records, diags = [], []
    t_start = time.time()
    for ctx in contexts:
        for task in tasks:
            for idx in range(args.first_sample, args.first_sample + args.samples):
                t0 = time.time()
                s = make_sample(sentences, tok, task, ctx, args.seed, idx)
                pids, aids = s["prompt_ids"], s["answer_ids"]
                full_ids = pids + aids
                na, A = len(pids), len(aids)
                vpos = value_positions(s, tok)
                alnum = lambda i: any(c.isalnum() for c in tok.decode([i]))  # noqa: E731
                reading = [p for p in range(na - 1, na + A - 1) if alnum(full_ids[p + 1])]
                rows = list(range(na - 64, na + A - 1))
                pre = Prefill(model, full_ids, rows)
                ridx = {r: i for i, r in enumerate(rows)}
                lone_space = tok.decode([aids[0]]) == " "
                # One value whose k-th digit group is read by the k-th reading query.
                single_value = task in ("niah_single", "niah_multikey", "kv_lookup") and len(vpos) == len(reading)
                for tmpl in templates:
                    if tmpl == "colon":
                        n, prefix = na, ""
                    elif tmpl == "space":
                        if not lone_space:
                            n, prefix = na, ""   # vt: the answer starts with a word token; unchanged
                        else:
                            n, prefix = na + 1, tok.decode([aids[0]])
                    else:
                        raise ValueError(tmpl)
                    first = int(torch.argmax(pre.logits[n - 1]))
                    # Attention-mass diagnostics (full cache), per layer and query head.
                    mass = lambda r: torch.stack([pre.probs[l][:, ridx[r], vpos].sum(-1) for l in range(L)])  # noqa
                    m_last = mass(n - 1)
                    m_win = torch.stack([mass(r) for r in range(n - 64, n)]).mean(0)
                    m_read = torch.stack([mass(r) for r in reading]).mean(0)
                    m_read_first = mass(reading[0])
                    by_group = None
                    if single_value:
                        # Per value group k: the largest attention any head of any layer gives the
                        # group's needle token from the scoring query (last prompt row) and from
                        # the reading query k.
                        by_group = dict(
                            last_max=[max(float(pre.probs[l][:, ridx[n - 1], p].max()) for l in range(L)) for p in vpos],
                            reading_max=[max(float(pre.probs[l][:, ridx[r], p].max()) for l in range(L))
                                         for r, p in zip(reading, vpos)],
                            window_mean_max=[max(float(torch.stack([pre.probs[l][:, ridx[r], p] for r in range(n - 64, n)]).mean(0).max())
                                                 for l in range(L)) for p in vpos])
                    diags.append(dict(context=ctx, task=task, index=idx, template=tmpl, n=n, by_group=by_group,
                                      changed=(n != na), value_tokens=len(vpos),
                                      mass_last=m_last.tolist(), mass_window64=m_win.tolist(),
                                      mass_reading=m_read.tolist(), mass_reading_first=m_read_first.tolist()))
                    for ratio in ratios:
                        B = budget_of(ratio, n)
                        for pol in policies:
                            if pol == "full" and ratio != ratios[0]:
                                continue
                            keep = keep_for(pol, pre, cfg, n, B, reading)
                            gen = greedy_decode(model, pre, n, keep, first, stop_ids, newline_ids)
                            text = prefix + tok.decode(gen)
                            ok = normalize_answer(text) == s["answer"].strip()
                            rec = dict(context=ctx, task=task, index=idx, template=tmpl, n=n, changed=(n != na),
                                       policy=pol, keep_ratio=(1.0 if pol == "full" else ratio), budget=B,
                                       correct=bool(ok), output=normalize_answer(text),
                                       answer=s["answer"].strip())
                            if keep is not None:
                                kv = torch.stack([kp[:, vpos].float().mean(1) for kp in keep])  # [L, Hq]
                                rec["value_kept"] = kv.tolist()
                                # Visible per query head, and stored per kv head (union of its group).
                                rec["kept_fraction"] = float(torch.stack([kp.float().mean() for kp in keep]).mean())
                                G = cfg.num_attention_heads // cfg.num_key_value_heads
                                rec["stored_fraction"] = float(torch.stack(
                                    [kp.view(-1, G, n).any(1).float().mean() for kp in keep]).mean())
                                # Of the attention the decode queries that read the answer pay to the
                                # needle's value tokens (full cache, summed over layers and heads),
                                # the share on value tokens this keep set retains; per reading row.
                                ret = []
                                for r in reading:
                                    pm = torch.stack([pre.probs[l][:, ridx[r], vpos] for l in range(L)])  # [L,Hq,V]
                                    km = torch.stack([kp[:, vpos] for kp in keep]).float()
                                    ret.append(float((pm * km).sum() / pm.sum().clamp_min(1e-12)))
                                rec["reading_mass_retained"] = ret
                                if single_value:
                                    # Copy heads of value group k: the (layer, head)s whose reading
                                    # query k puts > 0.5 of its attention on the group's needle token.
                                    kept_g, count_g = [], []
                                    for kk, r in enumerate(reading):
                                        c = 0
                                        kept_c = 0
                                        for l in range(L):
                                            heads = (pre.probs[l][:, ridx[r], vpos[kk]] > 0.5).nonzero()[:, 0]
                                            c += len(heads)
                                            kept_c += int(keep[l][heads, vpos[kk]].sum())
                                        count_g.append(c)
                                        kept_g.append(kept_c / c if c else None)
                                    rec["copy_heads_by_group"] = count_g
                                    rec["copy_heads_kept_by_group"] = kept_g
                            records.append(rec)
                print("%5.0fs ctx %d %s #%d n=%d %.1fs: %s" % (
                    time.time() - t_start, ctx, task, idx, na, time.time() - t0,
                    " ".join("%s/%s/%s=%d" % (r["template"], r["policy"], r["keep_ratio"], r["correct"])
                             for r in records if r["context"] == ctx and r["task"] == task and r["index"] == idx)),
                    flush=True)
    summary = summarize(records, diags, L, Hq)
    cpp = compare_cpp(records, args.cpp_json)
    print(json.dumps(summary["accuracy"], indent=1))
    print(json.dumps(cpp, indent=1))
    if args.json:
        out = dict(script="bench/query_policy_probe.py", argv=sys.argv[1:] if argv is None else argv,
                   date=datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%MZ"), commit=git_commit(),
                   torch=torch.__version__, threads=args.threads, seed=args.seed,
                   elapsed_s=round(time.time() - t_start, 1), summary=summary, cpp_comparison=cpp,
                   records=records, diagnostics=diags)
        with open(args.json, "w") as f:
            json.dump(out, f)
    return 0


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(records, diags, L, Hq):
    acc = {}
    for r in records:
        key = "%s|%s|%s|%d|%s" % (r["template"], r["policy"], r["keep_ratio"], r["context"], r["task"])
        acc.setdefault(key, []).append(r["correct"])
    accuracy = {k: dict(correct=sum(v), samples=len(v), accuracy=round(_mean(v), 4)) for k, v in sorted(acc.items())}
    overall = {}
    for r in records:
        key = "%s|%s|%s|%d" % (r["template"], r["policy"], r["keep_ratio"], r["context"])
        overall.setdefault(key, []).append(r["correct"])
    overall = {k: dict(correct=sum(v), samples=len(v), accuracy=round(_mean(v), 4)) for k, v in sorted(overall.items())}
    # Needle value tokens kept, per layer (mean over query heads and samples), and per layer x head.
    kept = {}
    for r in records:
        if "value_kept" not in r:
            continue
        key = "%s|%s|%s|%d" % (r["template"], r["policy"], r["keep_ratio"], r["context"])
        kept.setdefault(key, []).append(r["value_kept"])
    value_kept = {}
    for k, mats in kept.items():
        lh = [[_mean([m[l][h] for m in mats]) for h in range(Hq)] for l in range(L)]
        value_kept[k] = dict(per_layer=[round(_mean(row), 3) for row in lh],
                             per_layer_head=[[round(x, 3) for x in row] for row in lh],
                             overall=round(_mean([_mean(row) for row in lh]), 3))
    # Attention mass on the needle's value tokens.
    mass = {}
    for d in diags:
        key = "%s|%d|%s" % (d["template"], d["context"], d["task"])
        mass.setdefault(key, []).append(d)
    masses = {}
    for k, ds in sorted(mass.items()):
        ent = {}
        for field in ("mass_last", "mass_window64", "mass_reading", "mass_reading_first"):
            lh = [[_mean([d[field][l][h] for d in ds]) for h in range(Hq)] for l in range(L)]
            ent[field] = dict(per_layer_mean_over_heads=[round(_mean(row), 4) for row in lh],
                              per_layer_max_head=[round(max(row), 4) for row in lh],
                              per_layer_head=[[round(x, 4) for x in row] for row in lh])
        masses[k] = ent
    return dict(accuracy=accuracy, overall=overall, value_kept=value_kept, attention_mass=masses)


def compare_cpp(records, path):
    """Per-sample agreement with the C++ eval's correct_bits (same seed, same prompts)."""
    if not path or not os.path.exists(path):
        return {"note": "no C++ results at %s" % path}
    with open(path) as f:
        cpp = json.load(f)
    bits = {}
    for r in cpp.get("results", []):
        bits[(r["policy"], round(r["keep_ratio"], 4), r["context"], r["task"])] = r.get("correct_bits", "")
    out = {}
    for r in records:
        if r["template"] != "colon" or r["policy"] not in ("full", "snapkv", "sage_kv"):
            continue
        b = bits.get((r["policy"], round(r["keep_ratio"], 4), r["context"], r["task"]))
        if not b or r["index"] >= len(b):
            continue
        key = "%s|%s|%d" % (r["policy"], r["keep_ratio"], r["context"])
        e = out.setdefault(key, dict(samples=0, agree=0, cpp_correct=0, py_correct=0, disagreements=[]))
        c = b[r["index"]] == "1"
        e["samples"] += 1
        e["agree"] += int(c == r["correct"])
        e["cpp_correct"] += int(c)
        e["py_correct"] += int(r["correct"])
        if c != r["correct"]:
            e["disagreements"].append("%s#%d cpp=%d py=%d" % (r["task"], r["index"], c, r["correct"]))
    return out


def tables(paths):
    """Markdown tables from one or more --json outputs (records and diagnostics merged)."""
    _, recs, diags = _load(paths)
    lines = []
    a = lines.append
    cells = {}
    for r in recs:
        cells.setdefault((r["context"], r["keep_ratio"], r["policy"], r["template"]), {}).setdefault(
            r["task"], []).append(r)
    a("### Accuracy (exact match), mean over the tasks run, and per task\n")
    a("| context | keep | policy | template | samples | mean | " + " | ".join(TASKS) +
      " | first group right | visible/q-head | stored/kv-head | reading mass retained: 1st row / later rows |")
    a("|---:|---:|---|---|---:|---:|" + "---:|" * len(TASKS) + "---:|---:|---:|---|")
    for key in sorted(cells, key=lambda k: (k[0], -k[1], k[2] != "full", k[2], k[3])):
        by = cells[key]
        allr = [r for v in by.values() for r in v]
        per = [("%.2f" % _mean([r["correct"] for r in by[t]])) if t in by else "-" for t in TASKS]
        first = _mean([r["output"][:3] == _answer_of(r, recs)[:3] for r in allr])
        vis = _mean([r["kept_fraction"] for r in allr if "kept_fraction" in r])
        sto = _mean([r["stored_fraction"] for r in allr if "stored_fraction" in r])
        r1 = _mean([r["reading_mass_retained"][0] for r in allr if r.get("reading_mass_retained")])
        r2 = _mean([x for r in allr for x in r.get("reading_mass_retained", [])[1:]])
        f = lambda x: "-" if x != x else "%.3f" % x  # noqa: E731
        a("| %d | %s | %s | %s | %d | **%.3f** | %s | %.2f | %s | %s | %s / %s |" % (
            key[0], key[1], key[2], key[3], len(allr), _mean([r["correct"] for r in allr]), " | ".join(per),
            first, f(vis), f(sto), f(r1), f(r2)))
    # Value tokens kept per layer.
    a("\n### Needle value tokens kept, per layer (mean over the 8 query heads and the samples)\n")
    kept = {}
    for r in recs:
        if "value_kept" in r:
            kept.setdefault((r["context"], r["keep_ratio"], r["policy"], r["template"]), []).append(r["value_kept"])
    nl = len(next(iter(kept.values()))[0]) if kept else 0
    a("| context | keep | policy | template | " + " | ".join("L%d" % i for i in range(nl)) + " | all |")
    a("|---:|---:|---|---|" + "---:|" * (nl + 1))
    for key in sorted(kept, key=lambda k: (k[0], -k[1], k[2], k[3])):
        mats = kept[key]
        per_l = [_mean([_mean(m[l]) for m in mats]) for l in range(nl)]
        a("| %d | %s | %s | %s | %s | %.2f |" % (key[0], key[1], key[2], key[3],
                                                 " | ".join("%.2f" % x for x in per_l), _mean(per_l)))
    # Attention mass on the value tokens.
    a("\n### Attention mass on the needle's value tokens (full cache): scoring queries vs reading queries\n")
    a("Per layer: mean over the 8 heads / the largest head (mean over samples). last = the prompt's last "
      "query (SAGE-KV's scorer), window = mean of the last 64 prompt queries (SnapKV's), reading = the "
      "teacher-forced queries that predict the answer's value tokens (mean over them), reading[0] = the "
      "first of them.\n")
    groups = {}
    for d in diags:
        groups.setdefault((d["context"], d["template"]), []).append(d)
    for key in sorted(groups):
        ds = groups[key]
        a("context %d, template %s (%d samples):\n" % (key[0], key[1], len(ds)))
        a("| query | " + " | ".join("L%d" % i for i in range(nl)) + " |")
        a("|---|" + "---|" * nl)
        for field, label in (("mass_last", "last"), ("mass_window64", "window 64"),
                             ("mass_reading_first", "reading[0]"), ("mass_reading", "reading (all)")):
            row = []
            for l in range(nl):
                mean_h = _mean([_mean(d[field][l]) for d in ds])
                max_h = _mean([max(d[field][l]) for d in ds])
                row.append("%.3f / %.2f" % (mean_h, max_h))
            a("| %s | %s |" % (label, " | ".join(row)))
        a("")
    # Per value group (single-value tasks): copy heads and what the scorers see of each group.
    bg = [d for d in diags if d.get("by_group")]
    if bg:
        a("### Per digit group of the value (niah_single, niah_multikey, kv_lookup: 3 groups, e.g. "
          "`980` `094` `3`)\n")
        a("Attention to group k's needle token, largest over all layers and heads (mean over samples): "
          "from the prompt's last query, from SnapKV's window mean, and from reading query k (the decode "
          "query that emits group k).\n")
        a("| context | template | samples | last query: g0 / g1 / g2 | window-64 mean: g0 / g1 / g2 | "
          "reading query k: g0 / g1 / g2 |")
        a("|---:|---|---:|---|---|---|")
        grp = {}
        for d in bg:
            grp.setdefault((d["context"], d["template"]), []).append(d["by_group"])
        for key in sorted(grp):
            xs = grp[key]
            fmt = lambda f: " / ".join("%.2f" % _mean([x[f][k] for x in xs if len(x[f]) > k]) for k in range(3))  # noqa
            a("| %d | %s | %d | %s | %s | %s |" % (key[0], key[1], len(xs), fmt("last_max"),
                                                   fmt("window_mean_max"), fmt("reading_max")))
        a("\nCopy heads of group k = the (layer, head)s whose reading query k puts > 0.5 of its attention on "
          "the group's needle token; kept = the share of them in which the policy kept that token.\n")
        a("| context | keep | policy | template | copy heads per sample: g0 / g1 / g2 | kept in its copy heads: "
          "g0 / g1 / g2 | accuracy |")
        a("|---:|---:|---|---|---|---|---:|")
        grp = {}
        for r in recs:
            if r.get("copy_heads_kept_by_group") is not None:
                grp.setdefault((r["context"], r["keep_ratio"], r["policy"], r["template"]), []).append(r)
        for key in sorted(grp, key=lambda k: (k[0], -k[1], k[2], k[3])):
            rs = grp[key]
            cnt = " / ".join("%.1f" % _mean([r["copy_heads_by_group"][k] for r in rs]) for k in range(3))
            kp = " / ".join("%.2f" % _mean([r["copy_heads_kept_by_group"][k] for r in rs
                                            if r["copy_heads_kept_by_group"][k] is not None]) for k in range(3))
            a("| %d | %s | %s | %s | %s | %s | %.2f |" % (key[0], key[1], key[2], key[3], cnt, kp,
                                                        _mean([r["correct"] for r in rs])))
    return "\n".join(lines)


_ANSWERS = {}


def _answer_of(r, recs):
    """The expected answer text of a record's sample (from the full-cache record's correct output)."""
    key = (r["context"], r["task"], r["index"])
    if not _ANSWERS:
        for x in recs:
            if x.get("answer") is not None:
                _ANSWERS[(x["context"], x["task"], x["index"])] = x["answer"]
    return _ANSWERS.get(key, "")


def _load(paths):
    """Runs' metadata, records and diagnostics of several --json outputs; a cell run twice
    (same samples; deterministic, a difference is reported) counts once, preferring the run
    that has the per-group fields."""
    runs, recs, diags = [], {}, {}
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        runs.append({k: d[k] for k in ("argv", "date", "commit", "torch", "threads", "seed", "elapsed_s")})
        runs[-1]["file"] = os.path.basename(p)
        for r in d["records"]:
            key = (r["context"], r["task"], r["index"], r["template"], r["policy"], r["keep_ratio"])
            old = recs.get(key)
            if old is None:
                recs[key] = r
                continue
            if (old["correct"], old["output"]) != (r["correct"], r["output"]):
                print("warning: %s differs between runs: %r vs %r" % (key, old["output"], r["output"]), file=sys.stderr)
            if r.get("copy_heads_kept_by_group") is not None and old.get("copy_heads_kept_by_group") is None:
                recs[key] = r
        for x in d["diagnostics"]:
            key = (x["context"], x["task"], x["index"], x["template"])
            if key not in diags or (x.get("by_group") and not diags[key].get("by_group")):
                diags[key] = x
    return runs, list(recs.values()), list(diags.values())


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
        return "CPU: %s, %d logical cores (torch threads: see runs)" % (model, os.cpu_count() or 0)
    except OSError:
        return "CPU"


def merge(out_path, paths):
    """One compact JSON from several --json outputs: run metadata, per-cell accuracy with
    per-sample correctness bits, the C++ comparison, and the aggregated diagnostics."""
    runs, recs, diags = _load(paths)
    L = len(next(r["value_kept"] for r in recs if "value_kept" in r))
    Hq = len(next(r["value_kept"] for r in recs if "value_kept" in r)[0])
    summary = summarize(recs, diags, L, Hq)
    cells = {}
    for r in sorted(recs, key=lambda r: r["index"]):
        key = "%s|%s|%s|%d|%s" % (r["template"], r["policy"], r["keep_ratio"], r["context"], r["task"])
        c = cells.setdefault(key, dict(first_index=r["index"], bits="", wrong={}))
        c["bits"] += "1" if r["correct"] else "0"
        if not r["correct"]:
            c["wrong"][str(r["index"])] = r["output"]
    for k, v in summary["accuracy"].items():
        v.update(cells[k])
    cpp_total = compare_cpp(recs, os.path.join(HERE, "results", "quality-kvgate-tiny.json"))
    per_group = dict(attention={}, copy_heads={})
    for d in diags:
        if d.get("by_group"):
            per_group["attention"].setdefault("%s|%d" % (d["template"], d["context"]), []).append(d["by_group"])
    for k, xs in list(per_group["attention"].items()):
        per_group["attention"][k] = {f: [round(_mean([x[f][g] for x in xs]), 4) for g in range(3)]
                                     for f in ("last_max", "window_mean_max", "reading_max")}
        per_group["attention"][k]["samples"] = len(xs)
    for r in recs:
        if r.get("copy_heads_kept_by_group") is not None:
            per_group["copy_heads"].setdefault("%s|%s|%s|%d" % (r["template"], r["policy"], r["keep_ratio"],
                                                                r["context"]), []).append(r)
    for k, rs in list(per_group["copy_heads"].items()):
        per_group["copy_heads"][k] = dict(
            samples=len(rs),
            heads_per_sample=[round(_mean([r["copy_heads_by_group"][g] for r in rs]), 2) for g in range(3)],
            kept=[round(_mean([r["copy_heads_kept_by_group"][g] for r in rs
                               if r["copy_heads_kept_by_group"][g] is not None]), 3) for g in range(3)])
    out = dict(device=_cpu_name(), script="bench/query_policy_probe.py",
               merged_by="python3 bench/query_policy_probe.py --merge OUT " + " ".join(os.path.basename(p) for p in paths),
               runs=runs, accuracy=summary["accuracy"], overall=summary["overall"], cpp_comparison=cpp_total,
               value_kept=summary["value_kept"], attention_mass=summary["attention_mass"], per_group=per_group)
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--merge":
        merge(sys.argv[2], sys.argv[3:])
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "--tables":
        print(tables(sys.argv[2:]))
        sys.exit(0)
    sys.exit(main())
