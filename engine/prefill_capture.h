// File: what the engine records during a full (uncompressed) prefill for the policies
// that score after prefill. Host float32; filled only for the parts a policy asks for.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "cuda/backend.h"

namespace kvgate::engine {

struct ModelShape {
  int32_t num_layers = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t hidden_size = 0;
  int32_t group_size() const { return num_q_heads / num_kv_heads; }
};

// A layer's attention input where the model made it: a bf16 model hands over the bf16
// input its q/k/v GEMMs read (the rounding of the fp32 one, which it does not make for
// this), an fp32 model its fp32 input. Exactly one is set.
struct LayerInputOnBackend {
  const float* f32 = nullptr;     // [n, hidden_size]
  const ops::Bf16* bf16 = nullptr;  // [n, hidden_size]
};

struct CaptureRequest {
  bool keys = false;          // post-RoPE keys of every prompt token
  // With keys: only the rows this forward appends, not those the cache held before it
  // (KVzip's reconstruction forwards need their own keys, not the prompt's again).
  bool keys_of_new_rows_only = false;
  int32_t last_queries = 0;   // post-RoPE queries of this many last prompt tokens
  bool hidden_states = false; // post input-RMSNorm attention inputs (gate inputs)
  // SnapKV's observation window, scored on the backend (ops::WindowAttentionProbs): per
  // query head, the mean attention of this many last prompt queries over every key.
  int32_t window_probs = 0;
  // With window_probs = 1: the last query's raw scaled logits instead (SAGE-KV's scores).
  bool window_logits = false;
  // Called in each layer's forward, before its attention, with the layer's attention input
  // (post input-RMSNorm, [n, hidden_size]) in backend memory, valid only during the call:
  // a policy's gate scores it where it is instead of a host copy (hidden_states).
  std::function<absl::Status(int32_t layer, const LayerInputOnBackend& input, int32_t n)> layer_inputs_on_backend;
};

struct PrefillCapture {
  ModelShape shape;
  int32_t prompt_tokens = 0;  // n
  int32_t num_last_queries = 0;  // w = min(requested, n)
  // Per layer: [num_kv_heads, n, head_dim] (keys_of_new_rows_only: [num_kv_heads, the
  // forward's tokens, head_dim]).
  std::vector<std::vector<float>> keys;
  // Per layer: [w, num_q_heads, head_dim], queries of positions n - w .. n - 1.
  std::vector<std::vector<float>> last_queries;
  // Per layer: [n, hidden_size].
  std::vector<std::vector<float>> hidden_states;
  int32_t num_window_queries = 0;  // min(requested window_probs, n)
  bool window_logits = false;      // window_probs holds logits (CaptureRequest::window_logits)
  // Per layer: [num_q_heads, n], the WindowAttentionProbs of the last num_window_queries
  // queries, when a capture is filled on the host (tests). The engine leaves them where
  // they were computed instead: `backend_window_probs`, [num_layers, num_q_heads, n] in
  // the memory of `backend`, so that the policy selects on the backend (ops::SelectTop)
  // and only keep bytes come to the host.
  std::vector<std::vector<float>> window_probs;
  std::shared_ptr<const ops::DeviceBuffer> backend_window_probs;
  ops::Backend* backend = nullptr;
};

}  // namespace kvgate::engine
