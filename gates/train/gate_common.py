#!/usr/bin/env python3
"""Shared parts of the gate trainers (train_fast_kvzip_gate.py, train_attention_gate.py).

- contexts: token sequences from text files (tokenized with the model's tokenizer.json, see
  gate_tokenizer.py) or sampled from the model itself (``--data self:N``);
- the two gates as torch modules whose parameters are exactly the tensors of our gate files
  (``kvgate.fast_kvzip.v1``, ``kvgate.attention_gate.v1``; gates/README.md), with exporters;
- KVzip reconstruction scores (the soft targets of Fast KVzip) as kvgate defines them
  (gates/kvzip.cc KvzipScores, kv/policy_planner.cc RunKvzipReconstruction);
- a JSON-lines training log.
"""

import glob
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import gate_tokenizer  # noqa: E402
import llama_torch as lt  # noqa: E402

REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "pg-essays", "*.txt")

# kv/policy_planner.cc
KVZIP_REPEAT_ALL = "\n\nRepeat the previous context exactly."
KVZIP_REPEAT_FROM = "\n\nRepeat the part of the previous context exactly, starting with "
KVZIP_OVERLAP_TOKENS = 8
KVZIP_CHUNK_TOKENS = 2000   # gates/kvzip.h kKvzipChunkTokens
KVZIP_DEFAULT_SINK = 4      # gates/kvzip.h kKvzipDefaultSink


# --------------------------------------------------------------------------------------------------
# misc
# --------------------------------------------------------------------------------------------------

def log_path_for(out_path):
    base = out_path[:-len(".safetensors")] if out_path.endswith(".safetensors") else out_path
    return base + ".log.jsonl"


class JsonLog:
    """One JSON object per line; every record gets the seconds since the start as "time"."""

    def __init__(self, path, echo_every=0):
        self.path = path
        self.start = time.time()
        self.f = open(path, "w")
        self.echo_every = echo_every

    def write(self, record, echo=False):
        record = dict(record)
        record.setdefault("time", round(time.time() - self.start, 3))
        self.f.write(json.dumps(record, sort_keys=False) + "\n")
        self.f.flush()
        if echo:
            print(json.dumps(record), flush=True)

    def close(self):
        self.f.close()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_sha256(model_dir):
    """sha256 of model.safetensors, or of the index for sharded checkpoints."""
    for name in ("model.safetensors", "model.safetensors.index.json"):
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            return sha256_file(p)
    return ""


def resolve_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is false")
    return torch.device(name)


def dtype_from_name(name):
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


def seed_everything(seed):
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------------------------------
# contexts
# --------------------------------------------------------------------------------------------------

def bos_id(config):
    b = config.bos_token_id
    if isinstance(b, list):
        b = b[0] if b else None
    return b


@torch.no_grad()
def sample_contexts(model, config, count, length, seed, device, temperature=0.8, batch=64):
    """`count` sequences of `length` tokens sampled from the model (BOS first, full recompute, EOS
    ignored), like bench/eval_kl's self-sampled text: in-distribution for small story models."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    start = bos_id(config)
    if start is None:
        raise SystemExit("--data self:N needs bos_token_id in config.json")
    for first in range(0, count, batch):
        b = min(batch, count - first)
        ids = torch.full((b, 1), start, dtype=torch.long, device=device)
        while ids.shape[1] < length:
            logits = model(ids).logits[:, -1].float() / temperature
            probs = torch.softmax(logits, -1).cpu()
            nxt = torch.multinomial(probs, 1, generator=g).to(device)
            ids = torch.cat([ids, nxt], 1)
        out.extend(ids.cpu().tolist())
    return out


def text_contexts(tokenizer, config, paths, length, max_contexts):
    """Contexts of `length` tokens: BOS (if the model has one) + consecutive tokens of each file."""
    start = bos_id(config)
    body = length - (1 if start is not None else 0)
    out = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        ids = tokenizer.encode(text, add_special_tokens=False)
        for i in range(0, len(ids) - body + 1, body):
            ctx = ids[i:i + body]
            out.append(([start] if start is not None else []) + ctx)
            if len(out) >= max_contexts:
                return out
    return out


def load_contexts(args, model, config, tokenizer, device, length):
    """--data: 'self:N' (sampled by the model), token-id files (*.json: a list of id lists, e.g.
    written by --dump-contexts; each is cut to `length`, shorter ones are skipped) or text files /
    globs (default the essays). With --dump-contexts PATH the contexts are also written there."""
    contexts, desc = _load_contexts(args, model, config, tokenizer, device, length)
    dump = getattr(args, "dump_contexts", None)
    if dump:
        with open(dump, "w") as f:
            json.dump(contexts, f)
    return contexts, desc


def _load_contexts(args, model, config, tokenizer, device, length):
    specs = args.data or [DEFAULT_DATA]
    if len(specs) == 1 and specs[0].startswith("self:"):
        n = int(specs[0].split(":", 1)[1])
        n = min(n, args.max_contexts) if args.max_contexts else n
        return sample_contexts(model, config, n, length, args.seed + 7919, device), "self-sampled x%d (T=0.8)" % n
    if all(s.endswith(".json") for s in specs):
        out = []
        for s in specs:
            with open(s) as f:
                out.extend(list(c[:length]) for c in json.load(f) if len(c) >= length)
        if args.max_contexts:
            out = out[:args.max_contexts]
        if not out:
            raise SystemExit("%s holds no context of %d tokens" % (specs, length))
        return out, "token ids from %s (%d contexts)" % (",".join(os.path.basename(s) for s in specs), len(out))
    paths = []
    for s in specs:
        paths.extend(sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s])
    if not paths:
        raise SystemExit("--data matched no files: %s" % specs)
    if tokenizer is None:
        raise SystemExit("text data needs the model's tokenizer.json")
    ctx = text_contexts(tokenizer, config, paths, length, args.max_contexts or 10 ** 9)
    if not ctx:
        raise SystemExit("the data holds no context of %d tokens" % length)
    return ctx, "%d files (%s ...)" % (len(paths), os.path.basename(paths[0]))


# --------------------------------------------------------------------------------------------------
# Fast KVzip gate (kvgate.fast_kvzip.v1)
# --------------------------------------------------------------------------------------------------

FAST_KVZIP_FORMAT = "kvgate.fast_kvzip.v1"


class FastKvzipGateLayer(nn.Module):
    """FastKVzip prefill/attention/gate.py Weight, b added once (gates/fast_kvzip.h)."""

    def __init__(self, hidden, kv_heads, group, rank=16, sinks=16, eps=1e-6):
        super().__init__()
        self.kv_heads, self.group, self.rank, self.sinks, self.eps = kv_heads, group, rank, sinks, eps
        self.q_proj = nn.Linear(hidden, kv_heads * group * rank, bias=True)
        self.k_proj = nn.Linear(hidden, kv_heads * rank, bias=False)
        self.q_norm_weight = nn.Parameter(torch.ones(rank))
        self.k_norm_weight = nn.Parameter(torch.ones(rank))
        self.k_base = nn.Parameter(torch.randn(kv_heads, sinks, rank))
        self.b = nn.Parameter(torch.zeros(kv_heads, group))

    def _rms(self, x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def forward(self, x):
        """x [N, D] -> scores [N, H_kv] in (0, 1)."""
        n = x.shape[0]
        x = x.float()
        q = self._rms(self.q_proj(x).view(n, self.kv_heads, self.group, self.rank), self.q_norm_weight)
        k = self._rms(self.k_proj(x).view(n, self.kv_heads, 1, self.rank), self.k_norm_weight)
        scale = 1.0 / math.sqrt(self.rank)
        logit = (k * q).sum(-1) * scale + self.b.view(1, self.kv_heads, self.group)
        sink = torch.einsum("hsr,nhgr->nhgs", self.k_base, q) * scale
        return torch.sigmoid(logit - torch.logsumexp(sink, dim=-1)).mean(-1)

    def tensors(self, prefix):
        return [(prefix + "q_proj.weight", self.q_proj.weight), (prefix + "q_proj.bias", self.q_proj.bias),
                (prefix + "k_proj.weight", self.k_proj.weight), (prefix + "q_norm.weight", self.q_norm_weight),
                (prefix + "k_norm.weight", self.k_norm_weight), (prefix + "k_base", self.k_base),
                (prefix + "b", self.b)]


def save_fast_kvzip(path, layers, config, extra_metadata):
    tensors = []
    for i, layer in enumerate(layers):
        tensors += [(n, t.detach().float().cpu().contiguous()) for n, t in layer.tensors("layers.%d." % i)]
    first = layers[0]
    meta = {"format": FAST_KVZIP_FORMAT, "num_layers": str(len(layers)), "hidden_size": str(config.hidden_size),
            "num_kv_heads": str(config.num_key_value_heads), "group_size": str(config.group_size),
            "rank": str(first.rank), "num_sinks": str(first.sinks), "norm_eps": repr(float(first.eps))}
    meta.update({k: str(v) for k, v in extra_metadata.items()})
    lt.write_safetensors(path, tensors, meta)


def load_fast_kvzip(path):
    tensors, meta = lt.read_safetensors(path)
    assert meta.get("format") == FAST_KVZIP_FORMAT, meta.get("format")
    L = int(meta["num_layers"])
    layers = []
    for i in range(L):
        p = "layers.%d." % i
        kb = tensors[p + "k_base"]
        layer = FastKvzipGateLayer(int(meta["hidden_size"]), int(meta["num_kv_heads"]), int(meta["group_size"]),
                                   kb.shape[-1], kb.shape[1], float(meta.get("norm_eps", 1e-6)))
        with torch.no_grad():
            for name, t in layer.tensors(p):
                t.copy_(tensors[name].float())
        layers.append(layer)
    return layers, meta


# --------------------------------------------------------------------------------------------------
# Attention-Gate (kvgate.attention_gate.v1)
# --------------------------------------------------------------------------------------------------

ATTENTION_GATE_FORMAT = "kvgate.attention_gate.v1"


class AttentionGateLayer(nn.Module):
    """Our design (gates/README.md "Attention-Gate: our design"): causal MHA' without RoPE over the
    layer's attention input, read-out of [o_t ; v_t] to one logit per kv head."""

    def __init__(self, hidden, kv_heads, heads=2, head_dim=16, bias_init=2.0):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        inner = heads * head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.out_proj = nn.Linear(2 * inner, kv_heads, bias=True)
        with torch.no_grad():
            for lin in (self.q_proj, self.k_proj, self.v_proj):
                lin.weight.normal_(0.0, 1.0 / math.sqrt(hidden))
            self.out_proj.weight.normal_(0.0, 1.0 / math.sqrt(2 * inner))
            self.out_proj.bias.fill_(bias_init)

    def forward(self, x):
        """x [B, T, D] -> logits [B, H_kv, T]."""
        b, t, _ = x.shape
        x = x.float()
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v_flat = self.v_proj(x)
        v = v_flat.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
        o = torch.matmul(torch.softmax(s, -1), v).transpose(1, 2).reshape(b, t, -1)
        z = self.out_proj(torch.cat([o, v_flat], -1))
        return z.transpose(1, 2)

    def tensors(self, prefix):
        return [(prefix + "q_proj.weight", self.q_proj.weight), (prefix + "k_proj.weight", self.k_proj.weight),
                (prefix + "v_proj.weight", self.v_proj.weight), (prefix + "out_proj.weight", self.out_proj.weight),
                (prefix + "out_proj.bias", self.out_proj.bias)]


def save_attention_gate(path, layers, config, threshold, extra_metadata):
    tensors = []
    for i, layer in enumerate(layers):
        tensors += [(n, t.detach().float().cpu().contiguous()) for n, t in layer.tensors("layers.%d." % i)]
    first = layers[0]
    meta = {"format": ATTENTION_GATE_FORMAT, "num_layers": str(len(layers)), "hidden_size": str(config.hidden_size),
            "num_kv_heads": str(config.num_key_value_heads), "gate_heads": str(first.heads),
            "gate_head_dim": str(first.head_dim), "threshold": repr(float(threshold))}
    meta.update({k: str(v) for k, v in extra_metadata.items()})
    lt.write_safetensors(path, tensors, meta)


def load_attention_gate(path):
    tensors, meta = lt.read_safetensors(path)
    assert meta.get("format") == ATTENTION_GATE_FORMAT, meta.get("format")
    layers = []
    for i in range(int(meta["num_layers"])):
        p = "layers.%d." % i
        layer = AttentionGateLayer(int(meta["hidden_size"]), int(meta["num_kv_heads"]), int(meta["gate_heads"]),
                                   int(meta["gate_head_dim"]))
        with torch.no_grad():
            for name, t in layer.tensors(p):
                t.copy_(tensors[name].float())
        layers.append(layer)
    return layers, meta


# --------------------------------------------------------------------------------------------------
# KVzip reconstruction scores
# --------------------------------------------------------------------------------------------------

def kvzip_chunk_ranges(begin, n, chunk_tokens=KVZIP_CHUNK_TOKENS):
    return [(b, min(b + chunk_tokens, n)) for b in range(max(begin, 0), n, chunk_tokens)]


def kvzip_layer_scores(queries, keys, n, begin, end, sink, query_block=256, dtype=torch.float32):
    """One layer of one reconstruction forward (gates/kvzip.cc KvzipScores).

    queries [H_q, n + q, d] and keys [H_kv, n + q, d] (post-RoPE) of the forward of
    prompt + reconstruction (q tokens). For reconstruction query i of query head (h, g): logits
    over [sink keys 0..sink) | chunk keys [begin, end) | own keys n..n+i], softmax over that
    subset only; score[h, j] = max over g and i of the probability of chunk key j.
    Returns [H_kv, end - begin].
    """
    hq, total, d = queries.shape
    hkv = keys.shape[0]
    g = hq // hkv
    q_len = total - n
    qs = queries[:, n:].reshape(hkv, g, q_len, d).to(dtype)
    subset = torch.cat([keys[:, :sink], keys[:, begin:end], keys[:, n:]], 1).to(dtype)  # [H_kv, m, d]
    s, c = sink, end - begin
    best = torch.zeros(hkv, c, dtype=dtype, device=queries.device)
    scale = 1.0 / math.sqrt(d)
    own = torch.arange(q_len, device=queries.device)
    for i0 in range(0, q_len, query_block):
        i1 = min(q_len, i0 + query_block)
        logits = torch.einsum("hgqd,hmd->hgqm", qs[:, :, i0:i1], subset) * scale  # [H_kv, G, b, m]
        invisible = own.view(1, -1) > torch.arange(i0, i1, device=queries.device).view(-1, 1)  # [b, q_len]
        logits[..., s + c:] = logits[..., s + c:].masked_fill(invisible.view(1, 1, i1 - i0, q_len), float("-inf"))
        probs = torch.softmax(logits, -1)[..., s:s + c]
        best = torch.maximum(best, probs.amax(dim=(1, 2)))
    return best


@torch.no_grad()
def kvzip_scores(model, prompt, repeat_all_ids, repeat_from_ids, chunk_tokens=KVZIP_CHUNK_TOKENS,
                 score_dtype=torch.float32):
    """KVzip scores [L, H_kv, n] of one prompt and the layer inputs [L, n, D] of its forward.

    As kv/policy_planner.cc RunKvzipReconstruction (context_begin 0): for each chunk
    [b, e) of 2000 tokens, forward prompt + reconstruction where the reconstruction is
    REPEAT_ALL (chunk 0) or REPEAT_FROM + the 8 prompt tokens before b, then the chunk's tokens;
    sink keys = min(4, b); scores of overlapping chunks merge by max (gates/kvzip.cc).
    """
    device = next(model.parameters()).device
    n = len(prompt)
    cfg = model.config
    grid = torch.zeros(cfg.num_hidden_layers, cfg.num_key_value_heads, n, dtype=score_dtype, device=device)
    features = None
    for b, e in kvzip_chunk_ranges(0, n, chunk_tokens):
        if b == 0:
            recon = list(repeat_all_ids)
        else:
            recon = list(repeat_from_ids) + list(prompt[max(0, b - KVZIP_OVERLAP_TOKENS):b])
        recon += list(prompt[b:e])
        ids = torch.tensor([list(prompt) + recon], dtype=torch.long, device=device)
        out = model(ids, return_qk=True, return_layer_inputs=features is None)
        if features is None:
            features = torch.stack([x[0, :n] for x in out.layer_inputs])  # [L, n, D]
        sink = min(KVZIP_DEFAULT_SINK, b)
        for layer in range(cfg.num_hidden_layers):
            sc = kvzip_layer_scores(out.queries[layer][0], out.keys[layer][0], n, b, e, sink, dtype=score_dtype)
            grid[layer, :, b:e] = torch.maximum(grid[layer, :, b:e], sc)
        del out
    return grid, features
