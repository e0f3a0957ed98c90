#!/usr/bin/env python3
"""Convert a released Fast KVzip gate checkpoint into kvgate's gate file format.

Input: the authors' ``q{G}_dim16_sink16.pt`` (Hugging Face repo ``Jang-Hyun/Fast-KVzip``,
file ``<model name lower-cased>/q{G}_dim16_sink16.pt``). It is a ``torch.save``d dict whose
``"module"`` entry is a list with one state dict per gated layer of FastKVzip's ``Weight``
module (``prefill/attention/gate.py``, ``math/method/load_gate.py``, and the identical
``kvpress/presses/fastkvzip_press.py``):

    q_proj.weight  [H_kv * G * r, D]   model dtype (bf16)   Linear, bias=True
    q_proj.bias    [H_kv * G * r]      model dtype
    k_proj.weight  [H_kv * r, D]       model dtype          Linear, bias=False
    q_norm.weight  [r]                 fp32                 Qwen3RMSNorm(r), eps 1e-6
    k_norm.weight  [r]                 fp32                 Qwen3RMSNorm(r), eps 1e-6
    k_base         [H_kv, 1, S, r]     fp32                 learned sink keys
    b              [H_kv, 1, G]        model dtype          logit bias, added once

(The authors derive H_kv = k_proj rows / r and G = q_proj rows / k_proj rows, and S from
the ``sink(\\d+)`` part of the file name; this script does the same and cross-checks S
against k_base.) The other entries of the dict (training losses) are ignored.

Output: one safetensors file in kvgate's format ``kvgate.fast_kvzip.v1`` (gates/README.md):

    layers.{i}.q_proj.weight [H_kv*G*r, D]   layers.{i}.q_proj.bias [H_kv*G*r]
    layers.{i}.k_proj.weight [H_kv*r, D]     layers.{i}.q_norm.weight [r]
    layers.{i}.k_norm.weight [r]             layers.{i}.k_base [H_kv, S, r]
    layers.{i}.b [H_kv, G]

with string metadata format, num_layers, hidden_size, num_kv_heads, group_size, rank,
num_sinks, norm_eps, source, source_sha256, converter. Dtypes are kept (BF16/F16/F32) unless
``--dtype f32``; values are never rounded. k_base and b lose their singleton axis only.

Usage:
    python3 gates/train/convert_fastkvzip.py q4_dim16_sink16.pt gate.safetensors \\
        --model-config /models/Qwen3-8B/config.json [--trust-pickle] [--dtype f32]
        [--probe probe.json]

``torch.load`` of this file needs ``weights_only=False`` (the dict holds numpy arrays of
training losses), which runs pickle code: pass ``--trust-pickle`` only for a file you
downloaded from the authors' repository yourself. Requires torch (and numpy).
"""

import argparse
import hashlib
import json
import math
import os
import re
import struct
import sys

FORMAT = "kvgate.fast_kvzip.v1"
CONVERTER = "gates/train/convert_fastkvzip.py v1"
NAMES = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "q_norm.weight", "k_norm.weight", "k_base", "b")


def fail(message):
    sys.stderr.write("convert_fastkvzip: error: %s\n" % message)
    sys.exit(1)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(torch, path, trust_pickle):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # numpy arrays in the dict need the full unpickler
        if not trust_pickle:
            fail(
                "%s cannot be read with weights_only=True (%s). The released files hold numpy "
                "training curves next to the weights; re-run with --trust-pickle if you trust "
                "the file (it executes pickle code)." % (path, str(safe_error).splitlines()[0])
            )
    return torch.load(path, map_location="cpu", weights_only=False)


def find_key(state, name, layer):
    """The key that is `name` or ends in '.' + name (tolerates a wrapper prefix)."""
    matches = [k for k in state.keys() if k == name or k.endswith("." + name)]
    if len(matches) != 1:
        fail("layer %d: expected exactly one key for '%s', found %s (keys: %s)"
             % (layer, name, matches, sorted(state.keys())))
    return matches[0]


def read_model_config(path):
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        config = json.load(f)
    if "text_config" in config:  # multimodal wrappers (Gemma3)
        config = config["text_config"]
    return config


def dtype_name(torch, tensor):
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    if tensor.dtype not in names:
        fail("unsupported dtype %s" % tensor.dtype)
    return names[tensor.dtype]


def tensor_bytes(torch, tensor):
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().tobytes()
    return tensor.numpy().tobytes()


def write_safetensors(torch, path, tensors, metadata):
    """tensors: list of (name, torch.Tensor). Little-endian, header padded to 8 bytes."""
    if sys.byteorder != "little":
        fail("this writer assumes a little-endian host")
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, tensor in tensors:
        blob = tensor_bytes(torch, tensor)
        header[name] = {
            "dtype": dtype_name(torch, tensor),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        expected = tensor.numel() * tensor.element_size()
        if len(blob) != expected:
            fail("%s: %d bytes written, %d expected" % (name, len(blob), expected))
        offset += len(blob)
        blobs.append(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def reference_scores(torch, layer, hidden, heads, group, rank, sinks, eps):
    """FastKVzip gate.py forward in fp32 (b added once), for --probe."""
    def rms(x, w):
        x = x.float()
        return w.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    n = hidden.shape[0]
    q = hidden.float() @ layer["q_proj.weight"].float().t() + layer["q_proj.bias"].float()
    k = hidden.float() @ layer["k_proj.weight"].float().t()
    q = rms(q.view(n, heads, group, rank), layer["q_norm.weight"])
    k = rms(k.view(n, heads, 1, rank), layer["k_norm.weight"])
    logit = (k * q).sum(-1) / math.sqrt(rank) + layer["b"].float().view(1, heads, group)
    base = layer["k_base"].float().view(heads, sinks, rank)
    sink_logit = torch.einsum("hsr,nhgr->nhgs", base, q) / math.sqrt(rank)
    score = torch.sigmoid(logit - torch.logsumexp(sink_logit, dim=-1))
    return score.mean(-1).t().contiguous()  # [H_kv, n]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="the authors' q{G}_dim16_sink16.pt")
    parser.add_argument("output", help="kvgate gate file (.safetensors)")
    parser.add_argument("--model-config", help="the model's config.json (or its directory) to cross-check shapes")
    parser.add_argument("--dtype", choices=("keep", "f32"), default="keep", help="keep the checkpoint dtypes or write F32")
    parser.add_argument("--norm-eps", type=float, default=1e-6, help="RMSNorm eps of q_norm/k_norm (Qwen3RMSNorm: 1e-6)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow torch.load(weights_only=False)")
    parser.add_argument("--probe", help="also write a JSON with random layer-0 inputs and reference scores")
    args = parser.parse_args()

    try:
        import torch
    except ImportError:
        fail("needs PyTorch (pip install torch)")

    checkpoint = load_checkpoint(torch, args.input, args.trust_pickle)
    if isinstance(checkpoint, dict) and "module" in checkpoint:
        layers = checkpoint["module"]
    elif isinstance(checkpoint, (list, tuple)):
        layers = checkpoint
    else:
        fail("expected a dict with a 'module' list of per-layer state dicts")
    if not isinstance(layers, (list, tuple)) or not layers:
        fail("'module' must be a non-empty list of per-layer state dicts")

    # Shapes from layer 0, as load_fastkvzip does.
    first = {name: layers[0][find_key(layers[0], name, 0)] for name in NAMES}
    q_rows, hidden_size = first["q_proj.weight"].shape
    k_rows = first["k_proj.weight"].shape[0]
    rank = first["q_norm.weight"].shape[-1]
    if k_rows % rank or q_rows % k_rows:
        fail("q_proj rows %d / k_proj rows %d / rank %d are inconsistent" % (q_rows, k_rows, rank))
    heads = k_rows // rank
    group = q_rows // k_rows
    if first["k_base"].dim() != 4 or first["k_base"].shape[1] != 1:
        fail("k_base must be [H_kv, 1, S, r], got %s" % list(first["k_base"].shape))
    sinks = first["k_base"].shape[2]
    m = re.search(r"sink(\d+)", os.path.basename(args.input))
    if m and int(m.group(1)) != sinks:
        fail("file name says sink%s but k_base holds %d sinks" % (m.group(1), sinks))
    if sinks == 0:
        fail("sink-free gates (score = sigmoid(logit)) are not supported by kvgate.fast_kvzip.v1")

    expected = {
        "q_proj.weight": (heads * group * rank, hidden_size),
        "q_proj.bias": (heads * group * rank,),
        "k_proj.weight": (heads * rank, hidden_size),
        "q_norm.weight": (rank,),
        "k_norm.weight": (rank,),
        "k_base": (heads, 1, sinks, rank),
        "b": (heads, 1, group),
    }
    out_shape = {"k_base": (heads, sinks, rank), "b": (heads, group)}

    if args.model_config:
        config = read_model_config(args.model_config)
        checks = {
            "num_hidden_layers": len(layers),
            "hidden_size": hidden_size,
            "num_key_value_heads": heads,
        }
        for key, value in checks.items():
            if key in config and config[key] != value:
                fail("model config %s = %s but the gates imply %s (Gemma3-style gates on a subset of "
                     "layers are not supported)" % (key, config[key], value))
        if "num_attention_heads" in config and config["num_attention_heads"] != heads * group:
            fail("model config num_attention_heads = %s but the gates imply %d x %d"
                 % (config["num_attention_heads"], heads, group))

    tensors = []
    for i, state in enumerate(layers):
        keys = {name: find_key(state, name, i) for name in NAMES}
        extra = set(state.keys()) - set(keys.values())
        if extra:
            fail("layer %d: unexpected keys %s" % (i, sorted(extra)))
        for name in NAMES:
            t = state[keys[name]]
            if not torch.is_tensor(t):
                fail("layer %d: %s is not a tensor" % (i, name))
            if tuple(t.shape) != expected[name]:
                fail("layer %d: %s has shape %s, expected %s" % (i, name, list(t.shape), list(expected[name])))
            if not torch.isfinite(t.float()).all():
                fail("layer %d: %s holds non-finite values" % (i, name))
            t = t.detach().cpu().reshape(out_shape.get(name, expected[name]))
            if args.dtype == "f32":
                t = t.float()
            tensors.append(("layers.%d.%s" % (i, name), t))

    metadata = {
        "format": FORMAT,
        "num_layers": str(len(layers)),
        "hidden_size": str(hidden_size),
        "num_kv_heads": str(heads),
        "group_size": str(group),
        "rank": str(rank),
        "num_sinks": str(sinks),
        "norm_eps": repr(float(args.norm_eps)),
        "source": os.path.basename(args.input),
        "source_sha256": sha256(args.input),
        "converter": CONVERTER,
    }
    write_safetensors(torch, args.output, tensors, metadata)
    print("wrote %s: %d layers, H_kv=%d, G=%d, D=%d, rank=%d, sinks=%d"
          % (args.output, len(layers), heads, group, hidden_size, rank, sinks))

    if args.probe:
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(8, hidden_size, generator=generator)
        layer0 = {name: layers[0][find_key(layers[0], name, 0)] for name in NAMES}
        scores = reference_scores(torch, layer0, hidden, heads, group, rank, sinks, args.norm_eps)
        with open(args.probe, "w") as f:
            json.dump({"layer": 0, "hidden": hidden.tolist(), "scores": scores.tolist()}, f)
        print("wrote %s (layer-0 reference scores for 8 random inputs)" % args.probe)


if __name__ == "__main__":
    main()
