#!/usr/bin/env python3
"""Trains kvgate-tiny: a small Llama (GQA, trained context 4096) for long-context retrieval.

Data: natural text (the haystack file or folder, e.g. ../shared/data/pg-essays) and the
synthetic retrieval tasks of bench/retrieval_tasks.md (tiny_data.py builds them exactly
as `kvgate eval` does). Most rows are tasks: LM loss on every token, and a separately
normalised loss on the answer tokens (+ <EOS>); some rows are plain haystack text. The
context grows from max/8 to max over the first half of training (curriculum).

Resumable: every --ckpt_every steps (and when --stop_after_seconds runs out) the work
folder gets ckpt.pt with model, optimizer, step, schedule and loss history; a rerun with
the same --work resumes from it and gives the same result as an uninterrupted run (the
data of step s is a pure function of (seed, s, max_steps)). `--pack_ckpt` also writes
the checkpoint as <=15 MiB parts (fp32 weights, bf16 moments) to carry between machines.

At the end: models/kvgate-tiny/ in HF layout (config.json, model.safetensors in bf16,
tokenizer.json, generation_config.json), a greedy exact-match eval of the five tasks at
1024/2048/4096 tokens, and README.md (the model card) with data, steps, losses and eval.

kvgate-tiny was made in two stages of about 7 minutes each on one H100 (stage 1 from
scratch with the defaults, stage 2 from stage 1's weights with most rows on the
key-matching tasks); models/kvgate-tiny/README.md has both commands. Stage 1:
  python3 gates/train/train_tiny_model.py --haystack .carry/essays --out models/kvgate-tiny \
      --work .carry/tiny-stage1 --time_budget 420 --stop_after_seconds 490 --export_on_stop \
      --device cuda --workers 12 --verify_hf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bpe_tokenizer  # noqa: E402
import tiny_data  # noqa: E402

# Rows shorter than this cannot hold the task's inserted sentences.
TASK_MIN_CONTEXT = {"niah_single": 64, "niah_multikey": 128, "niah_multivalue": 128,
                    "kv_lookup": 448, "vt": 128}
TASK_WEIGHTS = {"niah_single": 1.0, "niah_multikey": 1.0, "niah_multivalue": 1.2,
                "kv_lookup": 1.3, "vt": 1.3}
KIND_PAD, KIND_LM, KIND_ANSWER = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Data (pure Python; runs in worker processes forked before CUDA starts)
# --------------------------------------------------------------------------------------------

_STATE: Dict[str, object] = {}


def data_init(tokenizer, essays: Optional[tiny_data.Haystack], default: tiny_data.Haystack,
              args) -> None:
    _STATE.update(tok=tokenizer, essays=essays, default=default, args=args,
                  task_weights=parse_task_weights(args.task_weights))


DEFAULT_CURRICULUM = "0:512,0.1:1024,0.25:2048,0.45:4096"


def parse_curriculum(spec: str) -> List[Tuple[float, int]]:
    """"0:512,0.1:1024,..." -> [(progress from which the stage applies, stage max context)]."""
    stages = sorted((float(a), int(b)) for a, b in (x.split(":") for x in spec.split(",") if x))
    if not stages or stages[0][0] != 0.0:
        raise ValueError("curriculum must start at progress 0: %r" % spec)
    return stages


def parse_task_weights(spec: str) -> Dict[str, float]:
    w = dict(TASK_WEIGHTS)
    for item in (x for x in spec.split(",") if x):
        name, value = item.split(":")
        if name not in w:
            raise ValueError("unknown task %r in --task_weights" % name)
        w[name] = float(value)
    return w


def step_context(step: int, max_steps: int, max_context: int, rng: random.Random,
                 curriculum: str = DEFAULT_CURRICULUM) -> int:
    """Context of one step: the curriculum's stage maximum (capped at max_context), or a
    half or a quarter of it."""
    progress = step / max(1, max_steps)
    stage = 64
    for start, ctx in parse_curriculum(curriculum):
        if progress >= start:
            stage = min(max_context, ctx)
    r = rng.random()
    c = stage if r < 0.6 else stage // 2 if r < 0.85 else stage // 4
    return max(64, c)


def make_row(rng: random.Random, context: int, args) -> Tuple[List[int], List[int]]:
    """(ids, kinds): kinds[t] says how the prediction of ids[t] is weighted."""
    tok = _STATE["tok"]
    essays = _STATE["essays"]
    default = _STATE["default"]
    hay = essays if (essays is not None and rng.random() >= args.default_haystack_frac) else default
    if essays is not None and rng.random() < args.text_frac:
        ids = tiny_data.build_text(rng, essays, context)
        return ids, [KIND_PAD] + [KIND_LM] * (len(ids) - 1)
    tasks = [t for t in tiny_data.TASKS if TASK_MIN_CONTEXT[t] <= context]
    weights = _STATE["task_weights"]
    task = rng.choices(tasks, weights=[weights[t] for t in tasks])[0]
    lo = max(TASK_MIN_CONTEXT[task], context // 4)
    target = context if rng.random() < 0.5 else rng.randint(lo, context)
    s = tiny_data.build_sample(task, rng, hay, target)
    ids = s.prompt_ids + s.answer_ids + [tok.eos_id]
    kinds = [KIND_PAD] + [KIND_LM] * (len(s.prompt_ids) - 1) + [KIND_ANSWER] * (len(s.answer_ids) + 1)
    return ids[:context], kinds[:context]


def make_batch(step: int, max_steps: int):
    """Batch of step `step`: (ids int32 [B, T], kinds uint8 [B, T], context)."""
    import numpy as np
    args = _STATE["args"]
    rng = random.Random(f"{args.seed}/{step}/{max_steps}")
    context = step_context(step, max_steps, args.max_context, rng, args.curriculum)
    rows = max(1, args.tokens_per_step // context)
    built = [make_row(rng, context, args) for _ in range(rows)]
    t = max(len(ids) for ids, _ in built)
    t = min(context, (t + 63) // 64 * 64)
    ids = np.full((rows, t), _STATE["tok"].pad_id, dtype=np.int32)
    kinds = np.zeros((rows, t), dtype=np.uint8)
    for r, (row_ids, row_kinds) in enumerate(built):
        ids[r, :len(row_ids)] = row_ids
        kinds[r, :len(row_kinds)] = row_kinds
    return ids, kinds, context


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def build_config(args, tok):
    import llama_torch
    return llama_torch.LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=tok.vocab_size, hidden_size=args.hidden,
        intermediate_size=args.ffn, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, rms_norm_eps=1e-5,
        rope_theta=float(args.rope_theta), max_position_embeddings=args.max_context,
        tie_word_embeddings=True, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        attention_bias=False, extra={"pad_token_id": tok.pad_id, "initializer_range": 0.02,
                                     "attention_dropout": 0.0, "use_cache": True})


def init_weights(model, seed: int) -> None:
    import torch
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 / math.sqrt(2 * n_layers))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def forward_hidden(model, ids):
    """Final-norm hidden states [B, T, H]: llama_torch's parameters, with causal SDPA
    (flash attention on the GPU) instead of its explicit-mask path."""
    import torch
    import torch.nn.functional as F
    b, t = ids.shape
    h = model.model.embed_tokens(ids)
    pos = torch.arange(t, device=ids.device).unsqueeze(0)
    cos, sin = model.rope(pos, torch.float32)  # RoPE in fp32, then q, k in v's dtype
    sdpa = getattr(F, "scaled_dot_product_attention", None)
    for layer in model.model.layers:
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = attn.project(x, cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)  # bf16 under autocast (flash attention)
        g = attn.num_heads // attn.num_kv_heads
        if g > 1:
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        if sdpa is not None:
            o = sdpa(q, k, v, is_causal=True)
        else:  # torch 1.13 (CPU tests)
            s = torch.matmul(q, k.transpose(2, 3)) * (attn.head_dim ** -0.5)
            mask = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)
            o = torch.matmul(torch.softmax(s.float().masked_fill(mask, float("-inf")), -1).to(q.dtype), v)
        o = o.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim)
        h = h + attn.o_proj(o)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.model.norm(h)


def batch_loss(model, ids, kinds, answer_weight: float):
    import torch.nn.functional as F
    hidden = forward_hidden(model, ids[:, :-1])
    logits = model.lm_head(hidden).float()
    target = ids[:, 1:].long()
    k = kinds[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         reduction="none").view_as(target)
    lm_mask = (k == KIND_LM).float()
    ans_mask = (k == KIND_ANSWER).float()
    lm = (ce * lm_mask).sum() / lm_mask.sum().clamp(min=1)
    ans = (ce * ans_mask).sum() / ans_mask.sum().clamp(min=1)
    return lm + answer_weight * ans, lm.detach(), ans.detach()


def lr_at(step: int, args) -> float:
    warm = max(1, int(args.warmup_frac * args.max_steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    p = (step - warm) / max(1, args.max_steps - warm)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

CKPT_PART_BYTES = 15 * 1024 * 1024


def save_checkpoint(path: str, model, opt, step: int, args, history, elapsed: float, acc) -> None:
    import torch
    acc = {k: (float(v) if k in ("lm", "answer") else v) for k, v in acc.items()}
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "max_steps": args.max_steps, "history": history, "elapsed": elapsed, "acc": acc,
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
             "config_args": {k: getattr(args, k) for k in MODEL_ARGS}}
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def pack_checkpoint(path: str, out_dir: str) -> List[str]:
    """Writes the checkpoint as <=15 MiB parts ckpt.part00.. (optimizer moments in bf16)."""
    import io
    import torch
    state = _torch_load(path)
    for s in state["optimizer"]["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                s[key] = s[key].to(torch.bfloat16)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for i in range(0, len(data), CKPT_PART_BYTES):
        name = os.path.join(out_dir, "ckpt.part%02d" % (i // CKPT_PART_BYTES))
        with open(name, "wb") as f:
            f.write(data[i:i + CKPT_PART_BYTES])
        names.append(name)
    return names


def unpack_checkpoint(parts_dir: str, path: str) -> bool:
    names = sorted(f for f in os.listdir(parts_dir) if f.startswith("ckpt.part"))
    if not names:
        return False
    with open(path + ".tmp", "wb") as out:
        for n in names:
            with open(os.path.join(parts_dir, n), "rb") as f:
                out.write(f.read())
    os.replace(path + ".tmp", path)
    return True


def _torch_load(path: str):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except TypeError:  # torch without weights_only
        return torch.load(path, map_location="cpu")


def load_checkpoint(path: str, model, opt, device):
    import torch
    state = _torch_load(path)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    for s in opt.state.values():  # packed checkpoints carry bf16 moments
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s and s[key].dtype != torch.float32:
                s[key] = s[key].float()
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state


MODEL_ARGS = ("vocab_size", "hidden", "ffn", "layers", "heads", "kv_heads", "head_dim",
              "rope_theta", "max_context", "seed", "tokens_per_step", "lr", "curriculum",
              "task_weights", "answer_weight", "text_frac", "default_haystack_frac", "warmup_frac",
              "min_lr_frac", "weight_decay")


# --------------------------------------------------------------------------------------------
# Eval: greedy decoding, exact match (the scoring of bench/retrieval_tasks.md)
# --------------------------------------------------------------------------------------------

def greedy_generate(model, prompts: Sequence[List[int]], tok, max_new: int, device, amp: bool):
    """Greedy continuations (stopping at <EOS> or a newline) by full recompute."""
    import torch
    b = len(prompts)
    lens = [len(p) for p in prompts]
    width = max(lens) + max_new
    ids = torch.full((b, width), tok.pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    ids = ids.to(device)
    cur = torch.tensor(lens, device=device)
    done = [False] * b
    outs: List[List[int]] = [[] for _ in range(b)]
    for _ in range(max_new):
        t = int(cur.max())
        with torch.no_grad(), _autocast(amp):
            hidden = forward_hidden(model, ids[:, :t])
            last = hidden[torch.arange(b, device=device), cur - 1]
            nxt = model.lm_head(last).float().argmax(-1)
        nxt_l = nxt.tolist()
        for i in range(b):
            if done[i]:
                continue
            token = nxt_l[i]
            if token == tok.eos_id or "\n" in tok.decode([token]):
                done[i] = True
                continue
            outs[i].append(token)
        if all(done):
            break
        ids[torch.arange(b, device=device), cur] = nxt
        cur = cur + 1
    return outs


def evaluate(model, tok, hay, tasks, contexts, n, seed, device, amp, batch_tokens=262144):
    """{(task, context): accuracy} over n seeded samples each."""
    model.eval()
    results = {}
    for ctx in contexts:
        for task in tasks:
            rng = random.Random(f"eval/{seed}/{task}/{ctx}")
            samples = [tiny_data.build_sample(task, rng, hay, ctx) for _ in range(n)]
            bs = max(1, batch_tokens // ctx)
            correct = 0
            for i in range(0, n, bs):
                chunk = samples[i:i + bs]
                outs = greedy_generate(model, [s.prompt_ids for s in chunk], tok, 48, device, amp)
                for s, o in zip(chunk, outs):
                    correct += tok.decode(o).strip() == s.answer_text.strip()
            results[(task, ctx)] = correct / n
    return results


def verify_hf(out_dir: str, tok, hay, device) -> List[str]:
    """Checks the export with HF `tokenizers`/`transformers` where installed (GPU machine):
    the same ids as bpe_tokenizer on task prompts and essay text, the same logits as
    llama_torch, and HF greedy generation on a few niah_single prompts."""
    import torch
    notes = []
    rng = random.Random("verify")
    texts = []
    for i in range(20):
        s = tiny_data.build_sample(tiny_data.TASKS[i % 5], rng, hay, (1024, 2048, 4096)[i % 3])
        texts.append(s.prompt_text + s.answer_text)
    text_pool = " ".join(hay.sentences)
    for _ in range(10):
        k = rng.randrange(max(1, len(text_pool) - 5000))
        texts.append(text_pool[k:k + 5000])
    texts.append("caf\u00e9 \u2014 na\u00efve \u65e5\u672c 1234567 a<|eos|>b\n\n  x")
    try:
        from tokenizers import Tokenizer as HFTokenizer
        hf = HFTokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
        same = sum(hf.encode(t).ids == tok.encode(t, add_bos=True) for t in texts)
        n_tokens = sum(len(tok.encode(t)) for t in texts)
        notes.append("HF tokenizers %s: %d/%d texts (%d tokens) give the same ids as bpe_tokenizer.py" % (
            __import__("tokenizers").__version__, same, len(texts), n_tokens))
        dec = sum(hf.decode(tok.encode(t)) == t for t in texts)
        notes.append("HF decode(encode(text)) == text for %d/%d texts" % (dec, len(texts)))
    except Exception as e:
        notes.append("HF tokenizers check not run: %r" % (e,))
    try:
        import transformers
        import llama_torch
        try:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        except TypeError:
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, torch_dtype=torch.float32)
        hf_model.to(device).eval()
        ours, _ = llama_torch.load_hf_checkpoint(out_dir, device=device, dtype=torch.float32)
        s = tiny_data.build_sample("niah_single", rng, hay, 4096)
        ids = torch.tensor([s.prompt_ids], device=device)
        with torch.no_grad():
            a = hf_model(ids).logits.float()
            b = ours.lm_head(forward_hidden(ours, ids)).float()
        notes.append("transformers %s LlamaForCausalLM vs llama_torch (fp32, %d tokens): max |logit diff| %.2e, "
                     "same argmax at %.4f of positions" % (
                         transformers.__version__, ids.shape[1], float((a - b).abs().max()),
                         float((a.argmax(-1) == b.argmax(-1)).float().mean())))
        auto_tok = transformers.AutoTokenizer.from_pretrained(out_dir)
        hits = 0
        for _ in range(5):
            s = tiny_data.build_sample("niah_single", rng, hay, 4096)
            enc = auto_tok(s.prompt_text, return_tensors="pt")
            assert enc["input_ids"][0].tolist() == s.prompt_ids
            with torch.no_grad():
                gen = hf_model.generate(enc["input_ids"].to(device), max_new_tokens=48, do_sample=False,
                                        eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            text = tok.decode(gen[0, len(s.prompt_ids):].tolist()).split("\n")[0]
            hits += text.strip() == s.answer_text.strip()
        notes.append("transformers AutoTokenizer + generate (greedy), niah_single at 4096: %d/5 exact" % hits)
    except Exception as e:
        notes.append("transformers check not run: %r" % (e,))
    return notes


# --------------------------------------------------------------------------------------------
# Export and model card
# --------------------------------------------------------------------------------------------

def export(model, config, tok, out_dir: str) -> None:
    import torch
    import llama_torch
    os.makedirs(out_dir, exist_ok=True)
    llama_torch.save_hf_checkpoint(model, config, out_dir, dtype=torch.bfloat16)
    tok.save(out_dir)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                   "pad_token_id": tok.pad_id, "do_sample": False,
                   "max_length": config.max_position_embeddings}, f, indent=2)
        f.write("\n")


def plot_losses(history, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["lm"] for h in history], label="LM loss (all tokens)")
    ax.plot(steps, [h["answer"] for h in history], label="answer loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [h["context"] for h in history], color="gray", alpha=0.3, label="context")
    ax2.set_ylabel("context (tokens)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _results_table(results) -> List[str]:
    ctxs = sorted({c for _, c in results})
    tasks = [t for t in tiny_data.TASKS if any((t, c) in results for c in ctxs)]
    rows = ["| task | " + " | ".join(str(c) for c in ctxs) + " |", "|---|" + "---|" * len(ctxs)]
    for t in tasks:
        rows.append("| %s | " % t + " | ".join("%.0f%%" % (100 * results[(t, c)]) for c in ctxs) + " |")
    avg = [sum(results[(t, c)] for t in tasks) / len(tasks) for c in ctxs]
    rows.append("| **mean** | " + " | ".join("%.1f%%" % (100 * v) for v in avg) + " |")
    rows.append("\nMean over all tasks and contexts: %.1f%%.\n" % (100 * sum(results.values()) / len(results)))
    return rows


def write_model_card(out_dir, args, config, n_params, history, results, elapsed, device_name,
                     has_plot, command, hay_name, results_default=None, notes=()):
    lines = []
    a = lines.append
    a("# kvgate-tiny\n")
    a("A %.1fM-parameter Llama model (GQA) trained from scratch by "
      "`gates/train/train_tiny_model.py` for long-context retrieval at up to %d tokens: the "
      "test model of kvgate's KV-cache eviction policies.\n" % (n_params / 1e6, config.max_position_embeddings))
    a("## Architecture\n")
    a("| | |\n|---|---|")
    a("| architecture | LlamaForCausalLM (RMSNorm, SwiGLU, RoPE) |")
    a("| layers | %d |" % config.num_hidden_layers)
    a("| hidden size / FFN | %d / %d |" % (config.hidden_size, config.intermediate_size))
    a("| heads | %d query, %d key-value (GQA), head_dim %d |" % (
        config.num_attention_heads, config.num_key_value_heads, config.head_dim))
    a("| rope_theta | %g |" % config.rope_theta)
    a("| context | %d (max_position_embeddings) |" % config.max_position_embeddings)
    a("| vocab | %d, byte-level BPE (Llama-3 pre-tokenizer: digits in groups of up to 3), trained by the script |" % config.vocab_size)
    a("| special tokens | `<|pad|>`=0, `<|bos|>`=1 (added by the post-processor), `<|eos|>`=2 |")
    a("| embeddings | tied |")
    a("| parameters | %d (%.1f MB in bf16) |\n" % (n_params, n_params * 2 / 1e6))
    a("## Data\n")
    a("- Natural text: the haystack `%s` (split into sentences as in `bench/retrieval_tasks.md`)." % hay_name)
    a("- Synthetic retrieval tasks in exactly the format of `bench/retrieval_tasks.md` "
      "(`gates/train/tiny_data.py`): niah_single, niah_multikey, niah_multivalue, kv_lookup, vt, "
      "with the essay haystack (%.0f%%) or the built-in five-sentence haystack (%.0f%%). Training "
      "draws its own random keys, values and depths; it never uses the eval's seeds." % (
          100 * (1 - args.default_haystack_frac), 100 * args.default_haystack_frac))
    if args.init_from:
        a("- Initialised from the weights of `%s` (fresh optimizer)." % args.init_from)
    a("- Mix: %.0f%% of rows plain essay text, the rest tasks (weights %s)." % (
        100 * args.text_frac, ", ".join("%s %.1f" % kv for kv in parse_task_weights(args.task_weights).items())))
    a("- Loss: LM cross-entropy over every token (haystack, needles, question) plus %.1f x the "
      "cross-entropy of the answer tokens and `<|eos|>` (each mean-normalised per batch)." % args.answer_weight)
    a("- Curriculum: per step a context of the stage maximum (60%%), half (25%%) or a quarter (15%%); the "
      "stage maximum is %s. Rows are filled to the step's context (half of them) or to a random "
      "shorter one." % ", ".join("%d tokens from %.0f%%" % (min(c, args.max_context), 100 * p)
                                 for p, c in parse_curriculum(args.curriculum)))
    a("")
    a("## Training\n")
    if getattr(args, "steps_done", args.max_steps) < args.max_steps:
        a("- Stopped by the time limit after %d of the %d planned steps (the schedule below is for %d)." % (
            args.steps_done, args.max_steps, args.max_steps))
    a("- %d steps of about %d tokens (%.0fM tokens), AdamW (betas 0.9/0.95, weight decay %.2f), "
      "peak LR %.1e, %.0f%% warm-up, cosine to %.0f%%, grad clip 1.0, bf16 autocast." % (
          args.max_steps, args.tokens_per_step, args.max_steps * args.tokens_per_step / 1e6,
          args.weight_decay, args.lr, 100 * args.warmup_frac, 100 * args.min_lr_frac))
    a("- Device: %s; training time %.0f s." % (device_name, elapsed))
    a("- Command:\n\n```\n%s\n```\n" % command)
    a("### Loss curve\n")
    if has_plot:
        a("![loss curve](loss_curve.png)\n")
    a("| step | context | LM loss | answer loss |\n|---|---|---|---|")
    if history:
        pick = sorted(set([0] + [int(i * (len(history) - 1) / 15) for i in range(16)]))
        for i in pick:
            h = history[i]
            a("| %d | %d | %.3f | %.3f |" % (h["step"], h["context"], h["lm"], h["answer"]))
    a("")
    a("(Each row: the mean over the %d steps before it.)\n" % args.log_every)
    a("## Evaluation\n")
    if results:
        a("Python eval at the end of training (the function `evaluate` of `train_tiny_model.py`; "
          "`--eval_only` reruns it): greedy decoding, at most 48 new tokens, stop at `<|eos|>` or a "
          "newline, exact match; prompts filled to the context minus 16 tokens, random depths, "
          "seeds disjoint from training.\n")
        a("Essay haystack (`%s`), %d samples per task and context:\n" % (hay_name, args.eval_samples))
        lines.extend(_results_table(results))
        if results_default:
            a("Built-in five-sentence haystack, %d samples per task and context:\n" % args.eval_default_samples)
            lines.extend(_results_table(results_default))
    else:
        a("Not evaluated.\n")
    a("The C++ benchmark `kvgate eval` builds the same prompts from its own seeds.\n")
    if notes:
        a("## Verification\n")
        for n in notes:
            a("- " + n)
        a("")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--haystack", help="essay text file or folder of .txt (natural text + haystack)")
    p.add_argument("--out", default=os.path.join(HERE, "..", "..", "models", "kvgate-tiny"))
    p.add_argument("--work", default=".carry/tiny-run", help="checkpoint folder")
    p.add_argument("--tokenizer", help="reuse this tokenizer.json instead of training one")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=640)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--rope_theta", type=float, default=500000.0)
    p.add_argument("--max_context", type=int, default=4096)
    p.add_argument("--tokens_per_step", type=int, default=65536)
    p.add_argument("--max_steps", type=int, default=0, help="0: fit --time_budget")
    p.add_argument("--time_budget", type=float, default=0.0, help="seconds of training, sets max_steps")
    p.add_argument("--stop_after_seconds", type=float, default=0.0,
                   help="checkpoint and exit after this long (resume later)")
    p.add_argument("--stop_at_step", type=int, default=0, help="checkpoint and exit at this step (tests)")
    p.add_argument("--export_on_stop", action="store_true",
                   help="after --stop_after_seconds, still export and evaluate the model as it is")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min_lr_frac", type=float, default=0.1)
    p.add_argument("--warmup_frac", type=float, default=0.03)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--answer_weight", type=float, default=1.0)
    p.add_argument("--text_frac", type=float, default=0.12)
    p.add_argument("--default_haystack_frac", type=float, default=0.2)
    p.add_argument("--curriculum", default=DEFAULT_CURRICULUM,
                   help="progress:max-context stages (contexts above --max_context are capped)")
    p.add_argument("--task_weights", default="", help="e.g. kv_lookup:2,vt:2 (others keep defaults)")
    p.add_argument("--init_from", help="start from the weights of this HF model folder (fresh optimizer)")
    p.add_argument("--ckpt_every", type=int, default=500)
    p.add_argument("--log_every", type=int, default=25)
    p.add_argument("--pack_ckpt", help="also write the final checkpoint as parts into this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workers", type=int, default=8, help="data processes (0: in-process)")
    p.add_argument("--eval_samples", type=int, default=50)
    p.add_argument("--eval_contexts", default="1024,2048,4096")
    p.add_argument("--eval_default_samples", type=int, default=20,
                   help="samples per task and context on the built-in haystack")
    p.add_argument("--verify_hf", action="store_true",
                   help="check the export against HF tokenizers/transformers (if installed)")
    p.add_argument("--eval_only", action="store_true", help="evaluate the model in --out")
    p.add_argument("--no_export", action="store_true")
    return p.parse_args(argv)


def load_or_train_tokenizer(args, essay_text: Optional[str]):
    if args.tokenizer:
        return bpe_tokenizer.Tokenizer.load(args.tokenizer)
    texts = tiny_data.tokenizer_corpus(essay_text or "", random.Random(args.seed))
    return bpe_tokenizer.train_tokenizer(texts, args.vocab_size)


def benchmark_max_steps(model, opt_params, args, device, amp) -> int:
    """Times forward+backward at each stage's shape (no update) and fits the step count to
    --time_budget."""
    import torch
    tok_v = model.config.vocab_size
    per_ctx = {}
    for frac in (8, 4, 2, 1):
        c = max(64, args.max_context // frac)
        rows = max(1, args.tokens_per_step // c)
        ids = torch.randint(3, tok_v, (rows, c), device=device, dtype=torch.int32)
        kinds = torch.ones(rows, c, dtype=torch.uint8, device=device)
        times = []
        for i in range(4):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.time()
            with _autocast(amp):
                loss, _, _ = batch_loss(model, ids, kinds, 1.0)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - t0)
        for p in opt_params:
            p.grad = None
        per_ctx[c] = sorted(times[1:])[1] * 1.08  # + optimizer step and data transfer

    def time_of(c):  # the measured context nearest above c (or the smallest)
        above = [k for k in per_ctx if k >= c]
        return per_ctx[min(above)] if above else per_ctx[max(per_ctx)]

    stages = parse_curriculum(args.curriculum)
    avg = 0.0
    for i, (p, ctx) in enumerate(stages):
        dur = (stages[i + 1][0] if i + 1 < len(stages) else 1.0) - p
        ctx = min(ctx, args.max_context)
        avg += dur * (0.6 * time_of(ctx) + 0.25 * time_of(ctx // 2) + 0.15 * time_of(ctx // 4))
    steps = int(args.time_budget / avg)
    print("benchmark: s/step by context %s -> %.3f s/step mean, %d steps" % (
        {c: round(t, 4) for c, t in per_ctx.items()}, avg, steps), flush=True)
    return max(10, steps)


def _autocast(enabled: bool):
    """bf16 autocast on the GPU; nothing on the CPU (torch 1.13 cannot even build one)."""
    import contextlib
    import torch
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


def _new_acc(device):
    import torch
    return {"lm": torch.zeros((), device=device), "answer": torch.zeros((), device=device),
            "n": 0, "context": 0}


def _prefetch(pool, start: int, stop: int, ahead: int):
    """Batches of steps start..stop-1 in order, at most `ahead` in flight."""
    import collections
    pending = collections.deque()
    nxt = start
    while nxt < stop or pending:
        while nxt < stop and len(pending) < ahead:
            pending.append(pool.apply_async(make_batch, (nxt, stop)))
            nxt += 1
        yield pending.popleft().get()


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    command = "python3 gates/train/train_tiny_model.py " + " ".join(sys.argv[1:] if argv is None else argv)
    essays_text = tiny_data.read_text(args.haystack) if args.haystack else None
    if args.eval_only:
        tok = bpe_tokenizer.Tokenizer.load(args.out)
    else:
        tok = load_or_train_tokenizer(args, essays_text)
    essays = (tiny_data.Haystack(tiny_data.split_sentences(essays_text), tok,
                                 os.path.basename(args.haystack.rstrip("/")))
              if essays_text else None)
    default = tiny_data.Haystack.default(tok)
    print("tokenizer: vocab %d; haystack %d sentences (%.1fs)" % (
        tok.vocab_size, len(essays) if essays else 0, time.time() - t_start), flush=True)

    import torch  # after the tokenizer: keeps the tokenizer path torch-free
    import llama_torch
    device = torch.device(args.device if (args.device != "cuda" or torch.cuda.is_available()) else "cpu")
    amp = device.type == "cuda"
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    eval_hay = essays if essays is not None else default
    contexts = [int(c) for c in args.eval_contexts.split(",") if c]

    if args.eval_only:
        model, config = llama_torch.load_hf_checkpoint(args.out, device=device, dtype=torch.float32)
        res = evaluate(model, tok, eval_hay, tiny_data.TASKS, contexts, args.eval_samples, 1, device, amp)
        print(json.dumps({"%s@%d" % k: v for k, v in res.items()}, indent=1))
        return 0

    os.makedirs(args.work, exist_ok=True)
    ckpt_path = os.path.join(args.work, "ckpt.pt")
    if not os.path.exists(ckpt_path):
        unpack_checkpoint(args.work, ckpt_path)
    resume = None
    if os.path.exists(ckpt_path):
        resume = _torch_load(ckpt_path)
        args.max_steps = resume["max_steps"]
        for k, v in resume["config_args"].items():
            if k != "vocab_size":
                setattr(args, k, v)
    # Data workers fork now, before CUDA starts (copy-on-write tokenizer and haystacks).
    data_init(tok, essays, default, args)
    pool = None
    if args.workers > 0:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(args.workers)
    config = build_config(args, tok)
    torch.manual_seed(args.seed)
    model = llama_torch.LlamaModel(config)
    init_weights(model, args.seed)
    if args.init_from and resume is None:
        model.load_hf_state_dict(llama_torch.read_hf_weights(args.init_from))
        print("initialised from %s" % args.init_from, flush=True)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], **opt_kwargs)
    print("model: %d parameters (%.1f MB bf16), %s" % (n_params, 2 * n_params / 1e6, device), flush=True)

    step, history, elapsed_before, resume_acc = 0, [], 0.0, None
    if resume is not None:
        state = load_checkpoint(ckpt_path, model, opt, device)
        step, history, elapsed_before = state["step"], state["history"], state["elapsed"]
        resume_acc = state.get("acc")
        print("resumed at step %d of %d" % (step, args.max_steps), flush=True)
        del resume, state
    elif args.max_steps <= 0:
        if args.time_budget <= 0:
            raise SystemExit("give --max_steps or --time_budget")
        args.max_steps = benchmark_max_steps(model, list(model.parameters()), args, device, amp)

    if pool is not None:
        batches = _prefetch(pool, step, args.max_steps, ahead=4 * args.workers)
    else:
        batches = (make_batch(s, args.max_steps) for s in range(step, args.max_steps))

    t_loop = time.time()
    acc = _new_acc(device)
    if resume_acc:
        acc.update(n=resume_acc["n"], context=resume_acc["context"])
        acc["lm"] += resume_acc["lm"]
        acc["answer"] += resume_acc["answer"]
    stopped_early = False
    model.train()
    while step < args.max_steps:
        ids_np, kinds_np, context = next(batches)
        ids = torch.from_numpy(ids_np).to(device, non_blocking=True)
        kinds = torch.from_numpy(kinds_np).to(device, non_blocking=True)
        lr = lr_at(step, args)
        for gr in opt.param_groups:
            gr["lr"] = lr
        with _autocast(amp):
            loss, lm, ans = batch_loss(model, ids, kinds, args.answer_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        acc["lm"] += lm.float()
        acc["answer"] += ans.float()
        acc["n"] += 1
        acc["context"] = max(acc["context"], context)
        if step % args.log_every == 0 or step == args.max_steps:
            elapsed = elapsed_before + time.time() - t_loop
            rec = {"step": step, "lm": float(acc["lm"]) / acc["n"], "answer": float(acc["answer"]) / acc["n"],
                   "context": acc["context"], "lr": lr, "elapsed": round(elapsed, 1)}
            history.append(rec)
            acc = _new_acc(device)
            if step % (args.log_every * 8) == 0 or step == args.max_steps:
                print("step %d/%d ctx %d lm %.3f answer %.3f lr %.2e %.0fs" % (
                    step, args.max_steps, rec["context"], rec["lm"], rec["answer"], lr, elapsed), flush=True)
        elapsed = elapsed_before + time.time() - t_loop
        stop = (args.stop_at_step and step >= args.stop_at_step) or (
            args.stop_after_seconds and time.time() - t_start >= args.stop_after_seconds)
        if step % args.ckpt_every == 0 or step == args.max_steps or stop:
            save_checkpoint(ckpt_path, model, opt, step, args, history, elapsed, acc)
        if stop and step < args.max_steps:
            stopped_early = True
            break
    if pool is not None:
        pool.terminate()
    train_time = elapsed_before + time.time() - t_loop
    if args.pack_ckpt:
        pack_checkpoint(ckpt_path, args.pack_ckpt)
    if stopped_early:
        print("stopped at step %d of %d; rerun with the same --work to resume" % (step, args.max_steps),
              flush=True)
        if not args.export_on_stop:
            return 0
    args.steps_done = step
    if args.no_export:
        return 0

    export(model, config, tok, args.out)
    results, results_default = {}, {}
    if args.eval_samples > 0:
        t0 = time.time()
        try:
            exported, _ = llama_torch.load_hf_checkpoint(args.out, device=device, dtype=torch.float32)
            results = evaluate(exported, tok, eval_hay, tiny_data.TASKS, contexts, args.eval_samples, 1,
                               device, amp)
            if args.eval_default_samples > 0 and eval_hay is not default:
                results_default = evaluate(exported, tok, default, tiny_data.TASKS, contexts,
                                           args.eval_default_samples, 2, device, amp)
        except Exception as e:  # keep the trained model even if the eval breaks
            print("eval failed: %r" % (e,), flush=True)
        print("eval (%.0fs):" % (time.time() - t0), flush=True)
        for name, res in (("essays", results), ("default haystack", results_default)):
            for (t, c), v in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                print("  %-16s %-16s %5d  %.3f" % (name, t, c, v))
            if res:
                print("  %s mean %.3f" % (name, sum(res.values()) / len(res)), flush=True)
    notes = []
    if args.verify_hf:
        notes = verify_hf(args.out, tok, eval_hay, device)
        for n in notes:
            print("verify: " + n, flush=True)
    has_plot = plot_losses(history, os.path.join(args.out, "loss_curve.png"))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    write_model_card(args.out, args, config, n_params, history, results, train_time, device_name,
                     has_plot, command, essays.name if essays else "default", results_default, notes)
    with open(os.path.join(args.work, "eval.json"), "w") as f:
        json.dump({"essays": {"%s@%d" % k: v for k, v in results.items()},
                   "default": {"%s@%d" % k: v for k, v in results_default.items()},
                   "history": history, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
