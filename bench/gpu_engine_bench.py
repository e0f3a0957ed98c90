#!/usr/bin/env python3
"""GPU engine benchmark (issue 10): kvgate on the CUDA backend against PyTorch on the
same GPU, in one run.

Builds a random Llama-3.1-8B-shaped checkpoint cut to 8 layers (bf16, vocab 1500:
1.76B parameters) and measures on the same shapes
  - kvgate (bench/gpu_engine_bench.cc over engine::Model, --backend cuda) with fp32
    weights (the path before issue 10: the baseline) and bf16 weights: prefill of N
    tokens (one shot, last-token logits) and batch-1 decode at a context of C tokens;
    bf16 also batched decode: B sequences of C tokens in the head-paged pool, one step
    for all (the decode worker's continuous-batching step);
  - a pure-PyTorch bf16 forward (torch matmuls + scaled_dot_product_attention; decode
    CUDA-graphed over a static cache);
  - transformers eager (LlamaForCausalLM, attn_implementation="sdpa", bf16);
  - the floors: a bf16 GEMM rate (torch.matmul, 8192^3, random data) and a
    device-to-device copy bandwidth (bytes read + written), from the same run.
Writes gpu-engine.json and gpu-engine.md into --out-dir.

  python3 bench/gpu_engine_bench.py --bench-bin BUNDLE/bin/gpu_engine_bench --out-dir DIR
"""
import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

# KVGATE_BENCH_LAYERS=32 gives the full-depth 8B shape (write it to another --model-dir).
LAYERS = int(os.environ.get("KVGATE_BENCH_LAYERS", "8"))
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 4096, 14336, 32, 8, 128, 1500
ROPE_THETA, EPS = 500000.0, 1e-5
ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def ints(text):
    return [int(x) for x in text.split(",") if x]


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def time_ms(fn, warmup=2, repeats=10):
    """Median time of fn() in ms, by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def config_json():
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 131072, "rms_norm_eps": EPS, "rope_theta": ROPE_THETA,
        "rope_scaling": ROPE_SCALING, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def make_weights(seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * 0.02).to(torch.bfloat16)

    w = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN), "lm_head.weight": normal(VOCAB, HIDDEN),
         "model.norm.weight": torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        w[p + "self_attn.q_proj.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = normal(INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = normal(INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = normal(HIDDEN, INTER)
    return w


def write_checkpoint(weights, model_dir):
    from safetensors.torch import save_file
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config_json(), f, indent=1)
    with open(os.path.join(model_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    save_file({k: v.cpu() for k, v in weights.items()}, os.path.join(model_dir, "model.safetensors"))
    write_tokenizer(model_dir)


def write_tokenizer(model_dir):
    """A tokenizer.json of VOCAB ids for `kvgate serve` (which decodes every token it
    streams): the golden llama_gqa_untied SentencePiece-style BPE (512 ids, byte
    fallback), its vocabulary extended by whole-word pieces up to VOCAB."""
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden", "models",
                          "llama_gqa_untied", "tokenizer.json")
    with open(source) as f:
        tokenizer = json.load(f)
    vocab = tokenizer["model"]["vocab"]
    for i in range(len(vocab), VOCAB):
        vocab[f"\u2581w{i}"] = i
    with open(os.path.join(model_dir, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, ensure_ascii=False)


# ---- floors ------------------------------------------------------------------------------
def measure_floors():
    n = 1 << 30  # 1 Gi floats = 4 GiB per buffer, far above the 60 MB L2
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    copy_ms = time_ms(lambda: b.copy_(a), warmup=3, repeats=10)
    copy_bytes_per_s = 2 * a.numel() * 4 / (copy_ms / 1e3)
    del a, b
    size = 8192
    mats = [(torch.randn(size, size, device="cuda", dtype=torch.bfloat16),
             torch.randn(size, size, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
    state = {"i": 0}

    def gemm():
        x, y = mats[state["i"] % 3]
        state["i"] += 1
        torch.matmul(x, y)

    gemm_ms = time_ms(gemm, warmup=3, repeats=15)
    del mats
    torch.cuda.empty_cache()
    return {"copy_tb_per_s": copy_bytes_per_s / 1e12, "copy_bytes": 2 * n * 4, "copy_ms": copy_ms,
            "gemm_tflop_per_s": 2 * size ** 3 / (gemm_ms / 1e3) / 1e12, "gemm_shape": [size, size, size],
            "gemm_ms": gemm_ms}


# ---- pure PyTorch forward ----------------------------------------------------------------
def llama3_inv_freq():
    inv = 1.0 / (ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    s = ROPE_SCALING
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s["factor"], inv)
    smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
        s["high_freq_factor"] - s["low_freq_factor"])
    mid = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, scaled).float().cuda()


class TorchLlama:
    """A bf16 Llama forward from torch ops: matmuls, SDPA (causal, GQA), fused-free."""

    def __init__(self, w):
        self.w = w
        self.inv_freq = llama3_inv_freq()

    def rope(self, x, positions):  # x [1, heads, n, d]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        x1, x2 = x[..., : HEAD_DIM // 2], x[..., HEAD_DIM // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    @staticmethod
    def norm(x, weight):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * weight

    def layer(self, i, x, positions, k_cache=None, v_cache=None, pos=None):
        p = f"model.layers.{i}."
        w = self.w
        n = x.shape[0]
        h = self.norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, HEADS, HEAD_DIM).transpose(0, 1)[None]
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM).transpose(0, 1)[None]
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM).transpose(0, 1)[None]
        q, k = self.rope(q, positions), self.rope(k, positions)
        group = HEADS // KV_HEADS
        if k_cache is None:
            # K/V repeated per query head: the flash backend for sure (a small copy next to the work).
            a = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                               is_causal=True)
            a = a[0].transpose(0, 1).reshape(n, HEADS * HEAD_DIM)
        else:  # one decode token at position pos over a static cache; a group's query heads as its rows
            k_cache[:, :, pos:pos + 1] = k
            v_cache[:, :, pos:pos + 1] = v
            a = F.scaled_dot_product_attention(q.view(1, KV_HEADS, group, HEAD_DIM), k_cache[:, :, :pos + 1],
                                               v_cache[:, :, :pos + 1])
            a = a.reshape(1, HEADS * HEAD_DIM)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = self.norm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        return x + (F.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T

    def decode_layer(self, i, x, position, k_cache, v_cache):
        """One decode token per sequence (row of x), all at `position`; caches [B, kv, ctx, d]."""
        p = f"model.layers.{i}."
        w = self.w
        b = x.shape[0]
        positions = torch.full((1,), position, device="cuda")
        h = self.norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).view(b, HEADS, 1, HEAD_DIM)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).view(b, KV_HEADS, 1, HEAD_DIM)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).view(b, KV_HEADS, 1, HEAD_DIM)
        q, k = self.rope(q, positions), self.rope(k, positions)
        k_cache[:, :, position:position + 1] = k
        v_cache[:, :, position:position + 1] = v
        group = HEADS // KV_HEADS
        a = F.scaled_dot_product_attention(q.view(b, KV_HEADS, group, HEAD_DIM), k_cache[:, :, :position + 1],
                                           v_cache[:, :, :position + 1])
        x = x + a.reshape(b, HEADS * HEAD_DIM) @ w[p + "self_attn.o_proj.weight"].T
        h = self.norm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        u = h @ w[p + "mlp.up_proj.weight"].T
        return x + (F.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T

    def decode_batch_graph(self, batch, context):
        """A CUDA graph of one decode step of `batch` sequences at position `context`."""
        k_caches = [torch.randn(batch, KV_HEADS, context + 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    for _ in range(LAYERS)]
        v_caches = [torch.randn_like(k) for k in k_caches]
        tok = torch.zeros(batch, dtype=torch.long, device="cuda")

        def step():
            x = self.w["model.embed_tokens.weight"][tok]
            for i in range(LAYERS):
                x = self.decode_layer(i, x, context, k_caches[i], v_caches[i])
            return self.norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph, (k_caches, v_caches)

    def prefill(self, ids):
        positions = torch.arange(ids.shape[0], device="cuda")
        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(LAYERS):
            x = self.layer(i, x, positions)
        return self.norm(x[-1:], self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T

    def decode_graph(self, context):
        """A CUDA graph of one decode step at position `context` over a static cache."""
        k_caches = [torch.randn(1, KV_HEADS, context + 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
                    for _ in range(LAYERS)]
        v_caches = [torch.randn_like(k) for k in k_caches]
        tok = torch.zeros(1, dtype=torch.long, device="cuda")
        positions = torch.full((1,), context, device="cuda")

        def step():
            x = self.w["model.embed_tokens.weight"][tok]
            for i in range(LAYERS):
                x = self.layer(i, x, positions, k_caches[i], v_caches[i], context)
            return self.norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph, (k_caches, v_caches)


def bench_torch(weights, prefill, decode, batches=(), batch_context=8192):
    model = TorchLlama(weights)
    out = {"prefill": [], "decode_batch1": [], "decode_batched": []}
    with torch.inference_mode():
        for n in prefill:
            ids = torch.randint(0, VOCAB, (n,), device="cuda")
            ms = time_ms(lambda: model.prefill(ids), warmup=2, repeats=5)
            log(f"[torch] prefill {n}: {ms:.2f} ms")
            out["prefill"].append({"tokens": n, "median_ms": ms})
        for c in decode:
            graph, keep = model.decode_graph(c)
            ms = time_ms(graph.replay, warmup=5, repeats=50)
            log(f"[torch] decode at {c}: {ms:.3f} ms/token (CUDA graph)")
            out["decode_batch1"].append({"context": c, "median_ms": ms})
            del graph, keep
        for b in batches:
            graph, keep = model.decode_batch_graph(b, batch_context)
            ms = time_ms(graph.replay, warmup=5, repeats=30)
            log(f"[torch] decode batch {b} at {batch_context}: {ms:.3f} ms/step (CUDA graph)")
            out["decode_batched"].append({"batch": b, "context": batch_context, "median_ms": ms})
            del graph, keep
            torch.cuda.empty_cache()
    torch.cuda.empty_cache()
    return out


def bench_transformers(model_dir, weights, prefill, decode):
    import transformers
    from transformers import LlamaForCausalLM
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    except TypeError:
        model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.cuda().eval()
    out = {"version": transformers.__version__, "attn_implementation": "sdpa", "prefill": [], "decode_batch1": []}
    with torch.inference_mode():
        for n in prefill:
            ids = torch.randint(0, VOCAB, (1, n), device="cuda")
            ms = time_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), warmup=2, repeats=5)
            log(f"[transformers] prefill {n}: {ms:.2f} ms")
            out["prefill"].append({"tokens": n, "median_ms": ms})
        for c in decode:
            ids = torch.randint(0, VOCAB, (1, c), device="cuda")
            result = model(ids, use_cache=True, logits_to_keep=1)
            cache = result.past_key_values
            tok = torch.randint(0, VOCAB, (1, 1), device="cuda")
            times = []
            for s in range(18):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(tok, past_key_values=cache, use_cache=True)
                end.record()
                end.synchronize()
                if s >= 2:
                    times.append(start.elapsed_time(end))
            out["decode_batch1"].append({"context": c, "median_ms": median(times)})
            log(f"[transformers] decode at {c}: {median(times):.3f} ms/token")
            del cache, result
    del model
    torch.cuda.empty_cache()
    return out


class GpuMemorySampler:
    """Peak device memory in use (all processes) while a block runs, minus the start."""

    def __enter__(self):
        self.stop = False
        free, total = torch.cuda.mem_get_info()
        self.base = total - free
        self.peak = self.base

        def loop():
            while not self.stop:
                free, total = torch.cuda.mem_get_info()
                self.peak = max(self.peak, total - free)
                time.sleep(0.05)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()

    @property
    def peak_gib(self):
        return (self.peak - self.base) / 2 ** 30


def bench_kvgate(bench_bin, model_dir, weights, prefill, decode, out_dir, env=None, label=None, batches=(),
                 batch_context=8192, kv_dtype="auto"):
    path = os.path.join("/tmp", f"kvgate-{label or weights}.json")  # folded into gpu-engine.json
    cmd = [bench_bin, "--model", model_dir, "--backend", "cuda", "--weights", weights,
           "--prefill", ",".join(map(str, prefill)), "--decode", ",".join(map(str, decode)), "--json", path]
    if batches:
        cmd += ["--decode-batch", ",".join(map(str, batches)), "--batch-context", str(batch_context),
                "--kv-dtype", kv_dtype]
    log("$", " ".join(f"{k}={v}" for k, v in (env or {}).items()), " ".join(cmd))
    with GpuMemorySampler() as mem:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})})
    log(proc.stderr)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "weights": weights}
    with open(path) as f:
        result = json.load(f)
    result["peak_gpu_memory_gib"] = mem.peak_gib
    return result


def end_to_end_check(weights, kvgate_results):
    """Last-token logits of the first prompt: kvgate (fp32, bf16) and the pure-PyTorch bf16
    forward against a float32 PyTorch forward of the same bf16 weights."""
    check = next((r["check"] for r in kvgate_results if "check" in r), None)
    if check is None:
        return {"error": "no kvgate logits"}
    ids = torch.tensor(check["tokens"], device="cuda")
    with torch.inference_mode():
        ref = TorchLlama({k: v.float() for k, v in weights.items()}).prefill(ids).float()[0]
        torch_bf16 = TorchLlama(weights).prefill(ids).float()[0]

    def rel(x):
        x = torch.as_tensor(x, device="cuda", dtype=torch.float32)
        return {"rel_l2": ((x - ref).norm() / ref.norm()).item(), "max_abs": (x - ref).abs().max().item(),
                "argmax_equal": bool(x.argmax() == ref.argmax())}

    out = {"tokens": len(check["tokens"]), "reference": "PyTorch float32 forward of the bf16 weights",
           "torch_bf16": rel(torch_bf16)}
    for r in kvgate_results:
        if "check" in r:
            out[f"kvgate_{r['weights']}"] = rel(r["check"]["logits"])
            del r["check"]
    log("end-to-end check", out)
    return out


def floors(fl, prefill, decode, batches=(), batch_context=8192):
    matrix_params = LAYERS * (HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2 + 3 * HIDDEN * INTER)
    rows = {"prefill": [], "decode_batch1": [], "decode_batched": []}
    for n in prefill:
        gemm_flops = 2 * n * matrix_params + 2 * VOCAB * HIDDEN
        attn_flops = LAYERS * HEADS * 4 * HEAD_DIM * n * (n + 1) / 2
        rows["prefill"].append({"tokens": n, "gemm_flops": gemm_flops, "attention_flops": attn_flops,
                                "floor_ms": gemm_flops / (fl["gemm_tflop_per_s"] * 1e12) * 1e3,
                                "floor_with_attention_ms": (gemm_flops + attn_flops) / (fl["gemm_tflop_per_s"] * 1e12) * 1e3})
    for c in decode:
        weight_bytes = 2 * (matrix_params + VOCAB * HIDDEN)  # bf16 matrices + lm_head
        kv_bytes = LAYERS * 2 * KV_HEADS * HEAD_DIM * (c + 1) * 2  # bf16 K and V
        rows["decode_batch1"].append({"context": c, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
                                      "floor_ms": (weight_bytes + kv_bytes) / (fl["copy_tb_per_s"] * 1e12) * 1e3})
    for b in batches:
        weight_bytes = 2 * (matrix_params + VOCAB * HIDDEN)
        kv_bytes = b * LAYERS * 2 * KV_HEADS * HEAD_DIM * (batch_context + 1) * 2  # bf16 K and V
        rows["decode_batched"].append({
            "batch": b, "context": batch_context, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "floor_ms": (weight_bytes + kv_bytes) / (fl["copy_tb_per_s"] * 1e12) * 1e3,
            # the floor of fp32 pages (--kv-dtype float32, the pages before bf16)
            "floor_fp32_pages_ms": (weight_bytes + 2 * kv_bytes) / (fl["copy_tb_per_s"] * 1e12) * 1e3})
    return rows


def markdown(r):
    def find(rows, key, value):
        for row in rows or []:
            if row.get(key) == value:
                return row.get("median_ms")
        return None

    def fmt(x, digits=1):
        return "-" if x is None else f"{x:,.{digits}f}"

    k32, k16 = r["kvgate_fp32"], r["kvgate_bf16"]
    klt = r.get("kvgate_bf16_step_before", {})
    kfp = r.get("kvgate_bf16_fp32_kv", {})
    lines = [
        "# GPU engine benchmark (issue 10)", "",
        f"Device: {r['device']} (driver {r['driver']}), {r['date']}, commit `{r['commit']}`; "
        f"PyTorch {r['torch_version']}, transformers {r['transformers'].get('version', '-')}.",
        "Model: random Llama-3.1-8B shapes cut to 8 layers (bf16 checkpoint, vocab 1500, 1.76B parameters), "
        "written and loaded in the same run. kvgate = `bench/gpu_engine_bench.cc` over `engine::Model` on "
        "`--backend cuda`: *fp32* is the path before issue 10 (fp32 weights, cuBLAS SGEMM, fp32 attention), "
        "*bf16* the new one (bf16 weights, cuBLASLt, tensor-core prefill attention). Prefill: one shot, "
        "last-token logits to the host, median of 3. Decode: batch 1, one token over the contiguous cache, "
        "median of 32 steps. Peers: pure PyTorch bf16 (matmuls + SDPA; decode CUDA-graphed over a static "
        "cache) and transformers eager (sdpa), medians by CUDA events. *bf16, step before* is the bf16 "
        "path with `KVGATE_GEMV_BF16=0 KVGATE_GROUPED_DECODE_ATTENTION=0`: products of at most 8 rows on "
        "cuBLASLt instead of the weight-streaming kernel (cuda/kernels/gemv_bf16.cuh), and decode attention "
        "per query head (attention.cu, head_paged_decode_attention.cu's first kernel) instead of per GQA group "
        "(grouped_decode_core.cuh). Batched decode: B sequences of C random tokens prefilled into the "
        "head-paged pool (bf16 pages, policy full; *before*: " + r.get("batched_before", "-") + "), then one "
        "DecodeStepGreedy for all (argmax on the device, the step replayed as a CUDA graph), median of 32 "
        "steps; PyTorch "
        "runs the same batch CUDA-graphed over a static [B, kv, C, d] bf16 cache.",
        f"Floors from the same run: bf16 GEMM {r['floors']['gemm_tflop_per_s']:.0f} TFLOP/s (torch.matmul "
        f"8192^3, random), device copy {r['floors']['copy_tb_per_s']:.2f} TB/s (read + write). Prefill floor = "
        "GEMM FLOPs / GEMM rate (with attention FLOPs in brackets); decode floor = (bf16 weights + bf16 KV) / "
        "copy bandwidth.", "",
        "| figure | kvgate fp32 (before) | kvgate bf16, step before | kvgate bf16 (now) | pure PyTorch | transformers | floor | now / PyTorch | now / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["floors_table"]["prefill"]:
        n = row["tokens"]
        after, torch_ms = find(k16.get("prefill"), "tokens", n), find(r["torch"].get("prefill"), "tokens", n)
        lines.append(
            f"| prefill {n:,} tokens (ms) | {fmt(find(k32.get('prefill'), 'tokens', n))} | "
            f"{fmt(find(klt.get('prefill'), 'tokens', n))} | {fmt(after)} | "
            f"{fmt(torch_ms)} | {fmt(find(r['transformers'].get('prefill'), 'tokens', n))} | "
            f"{fmt(row['floor_ms'])} ({fmt(row['floor_with_attention_ms'])}) | "
            f"{fmt(after / torch_ms if after and torch_ms else None, 2)}x | "
            f"{fmt(after / row['floor_ms'] if after else None, 2)}x |")
    for row in r["floors_table"]["decode_batch1"]:
        c = row["context"]
        after, torch_ms = find(k16.get("decode_batch1"), "context", c), find(r["torch"].get("decode_batch1"), "context", c)
        lines.append(
            f"| decode batch 1 at {c:,} (ms/token) | {fmt(find(k32.get('decode_batch1'), 'context', c), 2)} | "
            f"{fmt(find(klt.get('decode_batch1'), 'context', c), 2)} | {fmt(after, 2)} | {fmt(torch_ms, 2)} | {fmt(find(r['transformers'].get('decode_batch1'), 'context', c), 2)} | "
            f"{fmt(row['floor_ms'], 2)} | {fmt(after / torch_ms if after and torch_ms else None, 2)}x | "
            f"{fmt(after / row['floor_ms'] if after else None, 2)}x |")
    for row in r["floors_table"].get("decode_batched", []):
        b, c = row["batch"], row["context"]
        after = find([x for x in k16.get("decode_batched", []) if x.get("batch") == b], "context", c)
        torch_ms = find([x for x in r["torch"].get("decode_batched", []) if x.get("batch") == b], "context", c)
        before = find([x for x in kfp.get("decode_batched", []) if x.get("batch") == b], "context", c)
        lines.append(
            f"| decode batch {b} at {c:,} (ms/step, head-paged pool; step before = batched before) | - | {fmt(before, 2)} | {fmt(after, 2)} | {fmt(torch_ms, 2)} | - | "
            f"{fmt(row['floor_ms'], 2)} (fp32 pages {fmt(row['floor_fp32_pages_ms'], 2)}) | "
            f"{fmt(after / torch_ms if after and torch_ms else None, 2)}x | "
            f"{fmt(after / row['floor_ms'] if after else None, 2)}x |")
    lines.append(f"| peak GPU memory of the kvgate process (GiB) | {fmt(k32.get('peak_gpu_memory_gib'), 1)} | "
                 f"{fmt(klt.get('peak_gpu_memory_gib'), 1)} | {fmt(k16.get('peak_gpu_memory_gib'), 1)} | - | - | 3.3 (bf16 weights) | | |")
    graphed = [f"batch {x['batch']}: {x.get('graph_steps', '-')} graph-replayed, {x.get('op_by_op_steps', '-')} op by op"
               + (f" (recording failed: {x['graph_record_error']})" if x.get("graph_record_error") else "")
               + (f", host BeginStep (page tables built and uploaded while the GPU waits) "
                  f"{fmt(x['host_begin_step_median_ms'], 2)} ms and EndStep {fmt(x.get('host_end_step_median_ms'), 2)} ms "
                  f"of the {fmt(x['median_ms'], 2)} ms step" if "host_begin_step_median_ms" in x else "")
               for x in k16.get("decode_batched", [])]
    if graphed:
        lines += ["", "Batched steps of the kvgate bf16 run, warm-ups included: " + "; ".join(graphed) + "."]
    chk = r.get("end_to_end_check", {})
    if "torch_bf16" in chk:
        lines += ["", f"End-to-end check, last-token logits of a {chk['tokens']}-token prompt against a float32 "
                  "PyTorch forward of the same bf16 weights (relative L2 error, max |diff|, same argmax):", ""]
        for key in ("kvgate_fp32", "kvgate_bf16", "torch_bf16"):
            if key in chk:
                e = chk[key]
                lines.append(f"- {key}: {e['rel_l2']:.2e}, {e['max_abs']:.2e}, {e['argmax_equal']}")
    for name, res in (("fp32", k32), ("bf16", k16), ("bf16 step before", klt), ("bf16 fp32 KV", kfp)):
        if "error" in res:
            lines += ["", f"kvgate {name} failed: `{res['error'][-500:]}`"]
    return "\n".join(lines) + "\n"


def guarded(name, fn, *args):
    """fn(*args), or {"error": ...}: one failing peer must not lose the rest of the run."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        import traceback
        log(f"[{name}] failed:", traceback.format_exc())
        torch.cuda.empty_cache()
        return {"error": repr(e)[-1000:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench-bin", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model-dir", default="/tmp/kvgate-llama31-8l")
    ap.add_argument("--prefill", default="2048,8192,32768")
    ap.add_argument("--decode", default="1024,8192,32768")
    ap.add_argument("--baseline-prefill", default="2048,8192", help="fp32 (before) prefill sizes")
    ap.add_argument("--commit", default=os.environ.get("KVGATE_COMMIT", "unknown"))
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--decode-batch", default="32,64", help="batched decode sizes (kvgate bf16 and PyTorch)")
    ap.add_argument("--batch-context", type=int, default=8192, help="context of every batched-decode sequence")
    ap.add_argument("--batched-before", choices=("no-graphs", "fp32-kv"), default="no-graphs",
                    help="what the batched decode's before column runs")
    ap.add_argument("--step-before", action="store_true",
                    help="also the bf16 step without the decode kernels (KVGATE_GEMV_BF16=0 ...)")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    prefill, decode, batches = ints(args.prefill), ints(args.decode), ints(args.decode_batch)
    import transformers
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            stdout=subprocess.PIPE, text=True).stdout.strip()
    r = {"device": torch.cuda.get_device_name(), "driver": driver,
         "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "commit": args.commit, "torch_version": torch.__version__,
         "model": {"layers": LAYERS, "hidden": HIDDEN, "intermediate": INTER, "heads": HEADS, "kv_heads": KV_HEADS,
                   "head_dim": HEAD_DIM, "vocab": VOCAB, "dtype": "bf16"}}
    t0 = time.time()
    r["floors"] = measure_floors()
    log("floors", r["floors"], f"{time.time() - t0:.0f}s")
    weights = make_weights()
    write_checkpoint(weights, args.model_dir)
    log(f"checkpoint written {time.time() - t0:.0f}s")
    r["torch"] = guarded("torch", bench_torch, weights, prefill, decode, batches, args.batch_context)
    log(f"torch done {time.time() - t0:.0f}s")
    r["transformers"] = {} if args.skip_transformers else guarded("transformers", bench_transformers, args.model_dir,
                                                                  weights, prefill, decode)
    log(f"transformers done {time.time() - t0:.0f}s")
    del weights
    torch.cuda.empty_cache()
    r["kvgate_bf16"] = bench_kvgate(args.bench_bin, args.model_dir, "bf16", prefill, decode, args.out_dir,
                                    batches=batches, batch_context=args.batch_context)
    # The batched step as it ran before (same binary): op by op without step graphs, or
    # over the fp32 pages and pageable uploads of the code before bf16 pages.
    if batches and args.batched_before == "no-graphs":
        r["batched_before"] = "the same binary with `KVGATE_DECODE_GRAPHS=0`: every step op by op"
        r["kvgate_bf16_fp32_kv"] = bench_kvgate(args.bench_bin, args.model_dir, "bf16", [], [], args.out_dir,
                                                env={"KVGATE_DECODE_GRAPHS": "0"}, label="bf16-no-graphs",
                                                batches=batches, batch_context=args.batch_context)
    elif batches:
        r["batched_before"] = ("the same binary with `--kv-dtype float32` and `KVGATE_PINNED_UPLOADS=0`: "
                               "the fp32 pages and pageable uploads of the code before")
        r["kvgate_bf16_fp32_kv"] = bench_kvgate(args.bench_bin, args.model_dir, "bf16", [], [], args.out_dir,
                                                env={"KVGATE_PINNED_UPLOADS": "0"}, label="bf16-fp32-kv",
                                                batches=batches,
                                                batch_context=args.batch_context, kv_dtype="float32")
    if args.step_before:
        # The bf16 path as it was before the decode kernels (cuBLASLt for products of m <= 8
        # rows, per-query-head decode attention); prefill is the same code in both.
        r["kvgate_bf16_step_before"] = bench_kvgate(
            args.bench_bin, args.model_dir, "bf16", [], decode, args.out_dir,
            env={"KVGATE_GEMV_BF16": "0", "KVGATE_GROUPED_DECODE_ATTENTION": "0"}, label="bf16-step-before",
            batches=batches, batch_context=args.batch_context)
    r["kvgate_fp32"] = bench_kvgate(args.bench_bin, args.model_dir, "fp32", ints(args.baseline_prefill), decode,
                                    args.out_dir)
    log(f"kvgate done {time.time() - t0:.0f}s")
    weights = make_weights()  # the same seed: the same weights
    r["end_to_end_check"] = guarded("check", end_to_end_check, weights, [r["kvgate_fp32"], r["kvgate_bf16"]])
    del weights
    torch.cuda.empty_cache()
    r["floors_table"] = floors(r["floors"], prefill, decode, batches, args.batch_context)
    with open(os.path.join(args.out_dir, "gpu-engine.json"), "w") as f:
        json.dump(r, f, indent=1)
    md = markdown(r)
    with open(os.path.join(args.out_dir, "gpu-engine.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
