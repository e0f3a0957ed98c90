#!/usr/bin/env python3
"""A self-contained PyTorch implementation of the Llama model family, as Hugging Face defines it.

Covers LlamaForCausalLM, MistralForCausalLM (sliding window), Qwen2ForCausalLM (q/k/v bias,
optional sliding window on the upper layers) and Qwen3ForCausalLM (q/k RMSNorm, explicit
head_dim): RoPE with rope_theta and ``default`` / ``linear`` / ``llama3`` scaling, GQA, tied
embeddings. Parameter names equal transformers' state-dict names (``model.embed_tokens.weight``,
``model.layers.N.self_attn.q_proj.weight``, ..., ``lm_head.weight``), so an HF checkpoint loads
with ``load_state_dict``.

No dependency on transformers or the safetensors package: safetensors files are read and written
by hand (8-byte little-endian header length, JSON header, raw little-endian bytes; F32/F16/BF16
and the integer types). Runs on torch 1.13 (Debian's python3-torch, CPU; explicit attention) and
on recent torch (``F.scaled_dot_product_attention`` when no extra output or mask is requested).

The numerics follow transformers' eager path: RMSNorm in fp32 then cast back, inv_freq from
``arange(0, dim, 2)`` in fp32, cos/sin from fp32 freqs, softmax in fp32. With fp32 weights it
matches transformers' logits to ~1e-5 (tests: ``test_llama_torch.py`` against tests/golden).

API (other scripts rely on these names):
    LlamaConfig.from_hf_dict(d) / .to_hf_dict()
    LlamaModel(config)(input_ids, *, return_layer_inputs=False, output_attentions_for=None,
                       return_qk=False, key_mask_fn=None, position_ids=None) -> LlamaOutput
    load_hf_checkpoint(dir, device='cpu', dtype=torch.float32) -> (model, config)
    save_hf_checkpoint(model, config, dir, dtype=torch.bfloat16)
    read_safetensors(path) -> (dict name -> tensor, metadata)
    write_safetensors(path, tensors, metadata=None)
"""

import dataclasses
import json
import math
import os
import struct
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# safetensors, by hand
# --------------------------------------------------------------------------------------------------

_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def _check_little_endian():
    if sys.byteorder != "little":
        raise RuntimeError("llama_torch's safetensors reader/writer assumes a little-endian host")


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Reads a .safetensors file into CPU tensors of the stored dtype. Returns (tensors, metadata)."""
    _check_little_endian()
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise ValueError("%s: too short for a safetensors file" % path)
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError("%s: header length %d exceeds the file" % (path, n))
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + n:]
    tensors = {}
    for name, info in header.items():
        dtype = _ST_TO_TORCH.get(info["dtype"])
        if dtype is None:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, info["dtype"]))
        begin, end = info["data_offsets"]
        shape = [int(s) for s in info["shape"]]
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if end - begin != numel * itemsize or end > len(data):
            raise ValueError("%s: tensor %s: %d bytes for shape %s of %s" % (path, name, end - begin, shape, info["dtype"]))
        buf = bytearray(data[begin:end])  # writable copy: torch.frombuffer warns on read-only memory
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        elif dtype == torch.bfloat16:
            t = torch.frombuffer(buf, dtype=torch.int16).view(torch.bfloat16).reshape(shape)
        elif dtype == torch.bool:
            t = torch.frombuffer(buf, dtype=torch.uint8).to(torch.bool).reshape(shape)
        else:
            t = torch.frombuffer(buf, dtype=dtype).reshape(shape)
        tensors[name] = t
    return tensors, metadata


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    if t.dtype == torch.bool:
        return t.to(torch.uint8).numpy().tobytes()
    return t.numpy().tobytes()


def write_safetensors(path: str, tensors, metadata: Optional[Dict[str, str]] = None) -> None:
    """Writes tensors (a dict name->tensor, or a list of (name, tensor) pairs, in that order).

    Metadata values must be strings. The header is padded with spaces to a multiple of 8 bytes.
    The file is written to path + '.tmp' and renamed.
    """
    _check_little_endian()
    items = list(tensors.items()) if isinstance(tensors, dict) else list(tensors)
    header: Dict[str, Any] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise TypeError("safetensors metadata values must be strings (%s=%r)" % (k, v))
        header["__metadata__"] = dict(metadata)
    blobs = []
    offset = 0
    for name, t in items:
        if t.dtype not in _TORCH_TO_ST:
            raise TypeError("%s: unsupported dtype %s" % (name, t.dtype))
        blob = _tensor_bytes(t)
        header[name] = {"dtype": _TORCH_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
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


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@dataclasses.dataclass
class LlamaConfig:
    architectures: List[str] = dataclasses.field(default_factory=lambda: ["LlamaForCausalLM"])
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    attention_bias: Optional[bool] = None   # None: the architecture's default (Qwen2: True, else False)
    sliding_window: Optional[int] = None
    torch_dtype: Optional[str] = None
    # Less common keys, kept so that to_hf_dict() round-trips the checkpoints we read.
    model_type: Optional[str] = None
    hidden_act: str = "silu"
    mlp_bias: bool = False
    use_sliding_window: Optional[bool] = None  # Qwen2/Qwen3: the window applies only if true
    max_window_layers: Optional[int] = None    # Qwen2/Qwen3: layers >= this use the window
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type is None:
            self.model_type = _MODEL_TYPES.get(self.architecture, "llama")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads %d is not a multiple of num_key_value_heads %d"
                             % (self.num_attention_heads, self.num_key_value_heads))
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError("hidden_act %r is not supported (only silu)" % self.hidden_act)

    @property
    def architecture(self) -> str:
        return (self.architectures or ["LlamaForCausalLM"])[0]

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def qkv_bias(self) -> bool:
        if self.model_type == "qwen2":
            return True
        return bool(self.attention_bias)

    def o_bias(self) -> bool:
        if self.model_type == "qwen2":
            return False
        return bool(self.attention_bias)

    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    def layer_window(self, layer: int) -> int:
        """Sliding window of a layer in tokens (query i sees keys i-w+1..i), 0 = unlimited."""
        if not self.sliding_window:
            return 0
        if self.model_type == "mistral":
            return int(self.sliding_window)
        if self.model_type in ("qwen2", "qwen3"):
            if self.use_sliding_window and layer >= int(self.max_window_layers or 0):
                return int(self.sliding_window)
            return 0
        return 0  # Llama has no sliding window

    _KNOWN = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
              "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "attention_bias", "sliding_window", "torch_dtype", "model_type", "hidden_act", "mlp_bias",
              "use_sliding_window", "max_window_layers")

    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any]) -> "LlamaConfig":
        d = dict(d)
        if "text_config" in d and "hidden_size" not in d:
            d = dict(d["text_config"])
        # transformers 5 may write rope_parameters instead of rope_theta / rope_scaling.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" not in d:
            d["rope_theta"] = rp.get("rope_theta", 10000.0)
            rtype = rp.get("rope_type", rp.get("type", "default"))
            if rtype != "default":
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        if not d.get("architectures") and d.get("model_type"):
            inv = {v: k for k, v in _MODEL_TYPES.items()}
            d["architectures"] = [inv.get(d["model_type"], "LlamaForCausalLM")]
        kwargs = {k: d[k] for k in cls._KNOWN if k in d}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in cls._KNOWN}
        if kwargs.get("head_dim") is None:
            kwargs.pop("head_dim", None)
        return cls(**kwargs)

    def to_hf_dict(self) -> Dict[str, Any]:
        d = dict(self.extra)
        d.pop("rope_parameters", None)
        d.pop("dtype", None)
        for k in self._KNOWN:
            v = getattr(self, k)
            if v is None and k in ("attention_bias", "use_sliding_window", "max_window_layers", "torch_dtype"):
                continue
            d[k] = v
        return d

    @classmethod
    def from_json_file(cls, path: str) -> "LlamaConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """inv_freq [head_dim/2] in fp32, as transformers' rope init functions compute it."""
    dim = config.head_dim
    base = float(config.rope_theta)
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if not rs:
        return inv
    rtype = rs.get("rope_type", rs.get("type", "default"))
    if rtype == "default":
        return inv
    if rtype == "linear":
        return inv / float(rs["factor"])
    if rtype == "llama3":
        factor = float(rs["factor"])
        low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        is_medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(is_medium, smoothed, out)
    raise NotImplementedError("rope_scaling type %r is not supported (default, linear, llama3)" % rtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d]; cos/sin [B, T, d] (already in x's dtype)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.config = config
        self.layer = layer
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias())
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias())
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias())
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias())
        if config.qk_norm():
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.window = config.layer_window(layer)

    def project(self, x, cos, sin):
        """Post-RoPE q [B, Hq, T, d], k [B, Hkv, T, d] and v [B, Hkv, T, d]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm():
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask_bias, *, want_probs_rows=None, key_keep=None, use_sdpa=True):
        """mask_bias: [T, T] additive (0 / -inf) causal(+window) mask.

        key_keep: optional [B, Hkv, T] float in [0, 1]; key j is visible to query i != j in
        proportion to key_keep[j] (a hard 0/1 mask in the forward; with a straight-through
        estimator its gradient flows). A token always sees itself, as in the engine.
        """
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        g = self.num_heads // self.num_kv_heads
        kr = k.repeat_interleave(g, dim=1) if g > 1 else k
        vr = v.repeat_interleave(g, dim=1) if g > 1 else v
        probs_out = None
        if key_keep is None and want_probs_rows is None and use_sdpa and hasattr(F, "scaled_dot_product_attention"):
            o = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask_bias.to(q.dtype))
        else:
            scores = torch.matmul(q, kr.transpose(2, 3)) * (self.head_dim ** -0.5) + mask_bias.to(q.dtype)
            p = torch.softmax(scores.float(), dim=-1)
            if key_keep is not None:
                keep = key_keep.float().repeat_interleave(g, dim=1) if g > 1 else key_keep.float()  # [B, Hq, T]
                eye = torch.eye(t, device=x.device, dtype=torch.float32)
                m = keep.unsqueeze(2) * (1 - eye) + eye  # [B, Hq, T(query), T(key)]
                p = p * m
                p = p / p.sum(-1, keepdim=True)
            p = p.to(q.dtype)
            if want_probs_rows is not None:
                probs_out = p[:, :, want_probs_rows, :]
            o = torch.matmul(p, vr)
        o = o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(o), q, k, probs_out


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=config.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class _Backbone(nn.Module):
    """transformers' LlamaModel (named 'model' in the CausalLM), holding the parameters."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclasses.dataclass
class LlamaOutput:
    logits: torch.Tensor                                   # [B, T, V]
    layer_inputs: Optional[List[torch.Tensor]] = None      # per layer [B, T, H], post input-RMSNorm
    attentions: Optional[List[torch.Tensor]] = None        # per layer [B, Hq, R, T] for the R requested rows
    queries: Optional[List[torch.Tensor]] = None           # per layer [B, Hq, T, d], post-RoPE
    keys: Optional[List[torch.Tensor]] = None              # per layer [B, Hkv, T, d], post-RoPE
    hidden_states: Optional[torch.Tensor] = None           # [B, T, H] after the final norm


class LlamaModel(nn.Module):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.use_sdpa = True

    # HF checkpoints of tied models have no lm_head.weight; older ones may carry rotary buffers.
    def load_hf_state_dict(self, state: Dict[str, torch.Tensor], strict: bool = True) -> None:
        state = {k: v for k, v in state.items() if "rotary_emb" not in k}
        if self.config.tie_word_embeddings:
            # Either name may carry the shared matrix (safetensors' dedup keeps one of them).
            shared = state.get("model.embed_tokens.weight", state.get("lm_head.weight"))
            state["model.embed_tokens.weight"] = state["lm_head.weight"] = shared
        own = dict(self.state_dict())
        missing = [k for k in own if k not in state or state[k] is None]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            raise KeyError("checkpoint does not fit the model: missing %s, unexpected %s" % (missing, unexpected))
        with torch.no_grad():
            for k, p in own.items():
                if k in state and state[k] is not None:
                    if tuple(state[k].shape) != tuple(p.shape):
                        raise ValueError("%s: checkpoint shape %s, model %s" % (k, list(state[k].shape), list(p.shape)))
                    p.copy_(state[k].to(p.dtype))

    def hf_state_dict(self) -> Dict[str, torch.Tensor]:
        sd = dict(self.state_dict())
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids [B, T] -> cos, sin [B, T, head_dim] in dtype (computed in fp32)."""
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float().view(1, 1, -1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @staticmethod
    def causal_bias(t: int, window: int, device, dtype=torch.float32) -> torch.Tensor:
        i = torch.arange(t, device=device).view(-1, 1)
        j = torch.arange(t, device=device).view(1, -1)
        ok = j <= i
        if window > 0:
            ok = ok & (i - j < window)
        bias = torch.zeros(t, t, device=device, dtype=dtype)
        return bias.masked_fill(~ok, float("-inf"))

    def forward(self, input_ids: torch.Tensor, *, return_layer_inputs: bool = False,
                output_attentions_for=None, return_qk: bool = False,
                key_mask_fn: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None,
                position_ids: Optional[torch.Tensor] = None, layers_to_run: Optional[int] = None,
                return_hidden: bool = False) -> LlamaOutput:
        """input_ids [B, T] (or [T]).

        return_layer_inputs: also return every layer's attention input (post input-RMSNorm).
        output_attentions_for: query rows (an int list / slice / LongTensor over T) whose
            attention probabilities [B, Hq, R, T] are returned per layer.
        return_qk: also return every layer's post-RoPE queries and keys.
        key_mask_fn(layer, x) -> None or keep [B, Hkv, T] in [0, 1]: in-forward eviction, called
            with the layer's attention input before its attention (Attention-Gate training).
        layers_to_run: stop after this many layers (logits are then None).
        """
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        b, t = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        cos, sin = self.rope(position_ids, h.dtype)
        biases = {}
        layer_inputs, attns, queries, keys = [], [], [], []
        n_layers = len(self.model.layers) if layers_to_run is None else layers_to_run
        for i in range(n_layers):
            layer = self.model.layers[i]
            win = layer.self_attn.window
            if win not in biases:
                biases[win] = self.causal_bias(t, win, h.device)
            x = layer.input_layernorm(h)
            if return_layer_inputs:
                layer_inputs.append(x)
            keep = key_mask_fn(i, x) if key_mask_fn is not None else None
            a, q, k, p = layer.self_attn(x, cos, sin, biases[win], want_probs_rows=output_attentions_for,
                                         key_keep=keep, use_sdpa=self.use_sdpa)
            if return_qk:
                queries.append(q)
                keys.append(k)
            if output_attentions_for is not None:
                attns.append(p)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = None
        final = None
        if layers_to_run is None:
            final = self.model.norm(h)
            logits = self.lm_head(final)
        return LlamaOutput(logits=logits,
                           layer_inputs=layer_inputs if return_layer_inputs else None,
                           attentions=attns if output_attentions_for is not None else None,
                           queries=queries if return_qk else None,
                           keys=keys if return_qk else None,
                           hidden_states=final if return_hidden else None)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_hf_weights(model_dir: str) -> Dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards named by model.safetensors.index.json."""
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        return read_safetensors(single)[0]
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            tensors, _ = read_safetensors(os.path.join(model_dir, shard))
            state.update(tensors)
        missing = [k for k in weight_map if k not in state]
        if missing:
            raise KeyError("%s: index names tensors missing from the shards: %s" % (model_dir, missing[:5]))
        return state
    raise FileNotFoundError("%s has neither model.safetensors nor model.safetensors.index.json" % model_dir)


def load_hf_checkpoint(model_dir: str, device="cpu", dtype=torch.float32) -> Tuple[LlamaModel, LlamaConfig]:
    config = LlamaConfig.from_json_file(os.path.join(model_dir, "config.json"))
    model = LlamaModel(config)
    model.load_hf_state_dict(read_hf_weights(model_dir))  # exact upcast into the fp32 parameters
    model = model.to(device=device, dtype=dtype)
    model.inv_freq = rope_inv_freq(config).to(device)  # keep fp32 whatever the model dtype
    model.eval()
    return model, config


def save_hf_checkpoint(model: LlamaModel, config: LlamaConfig, out_dir: str, dtype=torch.bfloat16) -> None:
    """Writes config.json and model.safetensors (tied models without lm_head.weight)."""
    os.makedirs(out_dir, exist_ok=True)
    d = config.to_hf_dict()
    inv = {v: k for k, v in _DTYPE_NAMES.items()}
    d["torch_dtype"] = inv.get(dtype, "float32")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
        f.write("\n")
    tensors = [(k, v.detach().to("cpu", dtype)) for k, v in sorted(model.hf_state_dict().items())]
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors, {"format": "pt"})


def tiny_random_config(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=64, architecture="LlamaForCausalLM", **kw) -> LlamaConfig:
    """A small config for tests."""
    return LlamaConfig(architectures=[architecture], vocab_size=vocab_size, hidden_size=hidden_size,
                       intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=kw.pop("max_position_embeddings", 512),
                       bos_token_id=kw.pop("bos_token_id", 1), eos_token_id=kw.pop("eos_token_id", 2), **kw)


def init_random_(model: LlamaModel, seed: int = 0) -> LlamaModel:
    """Deterministic weights with non-trivial attention (the golden fixtures' recipe)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or name == "lm_head.weight":
                scale = 1.0 if model.config.tie_word_embeddings else 2.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / math.sqrt(model.config.hidden_size))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model
