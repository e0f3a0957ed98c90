// File: Attention-Gate (arXiv 2410.12876; eviction-methods.md sections 2 and 9.1), our own
// design since no official code exists (gates/README.md explains the choices). Per layer a
// small causal multi-head attention MHA' over the layer's attention input (post
// input-RMSNorm, the same x that feeds q/k/v_proj) plus a linear read-out gives one logit
// per kv head and token; flag = sigmoid(logit) > threshold (1 = keep). Flags are decided
// inside the prefill forward: an evicted row is invisible to every later token
// (AttentionArgs::key_mask), and the cache keeps only flagged rows.
//
// Per layer, token t, with heads' = num_heads, d' = head_dim (defaults 2 and 16):
//   q_t = W_q x_t, k_t = W_k x_t, v_t = W_v x_t                [heads' * d'] each, no bias
//   o_t[a] = sum_{s <= t} softmax_s(q_t[a] . k_s[a] / sqrt(d')) v_s[a]   per gate head a,
//            causal, no RoPE (order enters only through causality)
//   z_t = W_out [o_t ; v_t] + b_out                             [H_kv] logits
//   flag_t[h] = sigmoid(z_t[h]) > threshold                     (threshold 0.5: z > 0)
// Flags of token t depend only on tokens <= t, so the same module flags each new token at
// decode time from its own small cache (AttentionGateState): 2 * heads' * d' floats per
// token per layer.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gates/eviction_spec.h"
#include "gates/policy.h"

namespace kvgate::gates {

inline constexpr char kAttentionGateFormat[] = "kvgate.attention_gate.v1";
inline constexpr int32_t kAttentionGateDefaultSink = 4;

struct AttentionGateConfig {
  int32_t num_heads = 2;    // heads' of MHA'
  int32_t head_dim = 16;    // d'
  float threshold = 0.5f;   // keep when sigmoid(logit) > threshold
};

class AttentionGate {
 public:
  struct Layer {
    std::vector<float> q_proj_weight;    // [heads' * d', D]
    std::vector<float> k_proj_weight;    // [heads' * d', D]
    std::vector<float> v_proj_weight;    // [heads' * d', D]
    std::vector<float> out_proj_weight;  // [H_kv, 2 * heads' * d'], reads [o_t ; v_t]
    std::vector<float> out_proj_bias;    // [H_kv]
  };

  // Our safetensors format (gates/README.md). NOT_FOUND for a missing file;
  // INVALID_ARGUMENT "gate weights do not fit the model: ..." naming the bad metadata key or
  // tensor.
  static absl::StatusOr<std::unique_ptr<AttentionGate>> Load(const std::string& path,
                                                             const ModelShape& shape);
  // Random weights (deterministic in seed): projections N(0, 1/D), read-out
  // N(0, 1/(2 heads' d')), bias 0, so about half of the rows are flagged.
  static std::unique_ptr<AttentionGate> CreateRandom(const ModelShape& shape, uint64_t seed,
                                                     const AttentionGateConfig& config = {});
  absl::Status Save(const std::string& path) const;

  // hidden: [n, hidden_size] of `layer` (tokens 0..n-1 of one sequence). Returns logits
  // [num_kv_heads, n].
  absl::StatusOr<std::vector<float>> Logits(int32_t layer, absl::Span<const float> hidden) const;
  // [num_kv_heads, n], 1 = keep.
  absl::StatusOr<std::vector<uint8_t>> Flags(int32_t layer, absl::Span<const float> hidden) const;
  bool Flag(float logit) const;

  const ModelShape& shape() const { return shape_; }
  const AttentionGateConfig& config() const { return config_; }
  const Layer& layer(int32_t i) const { return layers_[i]; }
  Layer& mutable_layer(int32_t i) { return layers_[i]; }

 private:
  friend class AttentionGateState;
  AttentionGate(const ModelShape& shape, const AttentionGateConfig& config) : shape_(shape), config_(config) {}
  ModelShape shape_;
  AttentionGateConfig config_;
  std::vector<Layer> layers_;
};

// The gate's own causal state for one sequence: MHA' keys and values of every token seen,
// per layer. Prefill appends the prompt, decode appends one token per step; the logits of
// appended rows equal AttentionGate::Logits over the whole sequence.
class AttentionGateState {
 public:
  explicit AttentionGateState(const AttentionGate* gate);
  // Appends `hidden` ([m, hidden_size]) of `layer` and returns the new rows' logits
  // [num_kv_heads, m].
  absl::StatusOr<std::vector<float>> Append(int32_t layer, absl::Span<const float> hidden);
  int32_t tokens(int32_t layer) const { return tokens_[layer]; }
  const AttentionGate& gate() const { return *gate_; }

  // The state as bytes, to continue it in another process (a decode worker, through
  // kv/kv_handoff.h). Little-endian: uint32 magic "KVAG", uint32 version 1, int32
  // num_layers, num_kv_heads, hidden_size, gate heads', gate d'; then per layer int32
  // tokens, keys float32 [tokens, heads' * d'], values float32 [tokens, heads' * d'].
  std::string Serialize() const;
  // A state of `gate` (not owned; must outlive the state) from Serialize's bytes.
  // INVALID_ARGUMENT for bytes that do not parse or a state of a gate of another shape.
  static absl::StatusOr<std::unique_ptr<AttentionGateState>> Deserialize(const AttentionGate* gate,
                                                                        std::string_view bytes);

 private:
  const AttentionGate* gate_;
  std::vector<int32_t> tokens_;
  std::vector<std::vector<float>> keys_, values_;  // per layer [tokens, heads' * d']
};

// The key mask of `layer` for the prefill forward: gate flags OR budget.protected_mask
// (protected rows stay visible, so prefill sees what the plan keeps). [num_kv_heads, n].
absl::StatusOr<std::vector<uint8_t>> AttentionGatePrefillKeyMask(const AttentionGate& gate, int32_t layer,
                                                                 absl::Span<const float> hidden,
                                                                 const ResolvedBudget& budget);

// Policy: keeps per (layer, kv head) the rows of the prefill key mask
// (PolicyInputs::gate_flags, else recomputed from PrefillCapture::hidden_states, which is
// exact only if those came from the masked forward). The eviction rate is learned, so a
// budget is only a cap: with keep_per_head < n, a head keeps its protected rows plus at
// most keep_per_head - #protected flagged rows, the highest-logit ones (the most recent
// ones when only flags were supplied). Rows the gate evicted are never brought back.
std::unique_ptr<Policy> MakeAttentionGatePolicy(const ModelShape& shape,
                                                std::shared_ptr<const AttentionGate> gate);

}  // namespace kvgate::gates
