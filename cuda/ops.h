// File: argument structs of every compute op, shared by the CPU reference (<Op>Ref in
// cuda/cpu/reference_ops.h), the threaded CPU backend and the CUDA launchers
// (Launch<Op> in cuda/kernels/). Pointers are raw and live in the memory of the backend
// that runs the op ("backend memory": host for cpu, device for cuda); shapes travel
// here. All tensors are float32, row-major, contiguous.
#pragma once

#include <cstdint>

namespace kvgate::ops {

// out[t, :] = table[token_ids[t], :]. Ids are validated by the caller (engine).
struct EmbedArgs {
  const int32_t* token_ids = nullptr;  // [num_tokens], in, backend
  const float* table = nullptr;        // [vocab_size, dim], in, backend
  float* out = nullptr;                // [num_tokens, dim], out, backend
  int32_t num_tokens = 0, dim = 0, vocab_size = 0;
};

// y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]): the layout of a torch.nn.Linear weight.
struct MatMulArgs {
  const float* x = nullptr;     // [m, k], in, backend
  const float* w = nullptr;     // [n, k], in, backend
  const float* bias = nullptr;  // [n] or null, in, backend
  float* y = nullptr;           // [m, n], out, backend; must not alias x or w
  int32_t m = 0, n = 0, k = 0;
};

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]  (Llama RMSNorm).
struct RmsNormArgs {
  const float* x = nullptr;       // [rows, dim], in, backend
  const float* weight = nullptr;  // [dim], in, backend
  float* out = nullptr;           // [rows, dim], out, backend; may alias x
  int32_t rows = 0, dim = 0;
  float eps = 1e-6f;
};

// Rotary embedding in the Hugging Face "rotate_half" layout, in place. With
// half = head_dim / 2 and angle = positions[t] * inv_freq[i] (float32 product):
//   x[i]        <- x[i] * cos(angle) - x[i + half] * sin(angle)
//   x[i + half] <- x[i + half] * cos(angle) + x[i] * sin(angle)
struct RopeArgs {
  float* x = nullptr;                  // [num_tokens, num_heads, head_dim], in/out, backend
  const int32_t* positions = nullptr;  // [num_tokens], in, backend
  const float* inv_freq = nullptr;     // [head_dim / 2], in, backend
  int32_t num_tokens = 0, num_heads = 0, head_dim = 0;
};

// Writes the K and V rows of new tokens into a head-major contiguous cache:
// cache[h, start_row + t, :] = k[t, h, :].
struct StoreKvArgs {
  const float* k = nullptr;  // [num_tokens, num_kv_heads, head_dim], in, backend
  const float* v = nullptr;  // [num_tokens, num_kv_heads, head_dim], in, backend
  float* k_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], out, backend
  float* v_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], out, backend
  int32_t num_tokens = 0, num_kv_heads = 0, head_dim = 0;
  int32_t capacity_tokens = 0;
  int32_t start_row = 0;  // first cache row written; start_row + num_tokens <= capacity
};

// Causal grouped-query attention of new queries over a head-major contiguous cache
// that already holds their own K/V rows. Query t sits at cache row q_start_row + t and
// sees rows [lo, q_start_row + t], lo = max(0, row - sliding_window + 1) when
// sliding_window > 0, else 0. Query head h reads kv head h / (num_q_heads / num_kv_heads).
struct AttentionArgs {
  const float* q = nullptr;        // [num_tokens, num_q_heads, head_dim], in, backend
  const float* k_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], in, backend
  const float* v_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], in, backend
  float* out = nullptr;            // [num_tokens, num_q_heads, head_dim], out, backend
  int32_t num_tokens = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t capacity_tokens = 0;
  int32_t q_start_row = 0;
  int32_t sliding_window = 0;  // tokens; 0 = unlimited
  float scale = 1.0f;          // usually 1 / sqrt(head_dim)
};

// out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)).
struct SiluMulArgs {
  const float* gate = nullptr;  // [n], in, backend
  const float* up = nullptr;    // [n], in, backend
  float* out = nullptr;         // [n], out, backend; may alias gate or up
  int64_t n = 0;
};

// x[i] += y[i] (residual connections).
struct AddArgs {
  float* x = nullptr;        // [n], in/out, backend
  const float* y = nullptr;  // [n], in, backend
  int64_t n = 0;
};

}  // namespace kvgate::ops
