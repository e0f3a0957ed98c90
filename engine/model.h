// File: a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) whose forward pass
// runs on an ops::Backend, with a per-sequence KV cache. Knows nothing of gRPC.
//
// A Model is immutable after loading and may serve many sequences, but Forward calls on
// one Model must not overlap (they share scratch buffers).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cuda/backend.h"
#include "engine/model_config.h"

namespace kvgate::engine {

// K and V of one sequence, head-major and contiguous per layer:
// k[layer] is [num_kv_heads, capacity_tokens, head_dim] in backend memory.
// Row r of every head holds the token at position r (no eviction yet).
class KvCache {
 public:
  int32_t length_tokens() const { return length_tokens_; }
  int32_t capacity_tokens() const { return capacity_tokens_; }
  // Entries held: layers * kv_heads * length.
  int64_t num_entries() const;
  float* k(int layer) const { return k_[layer].as<float>(); }
  float* v(int layer) const { return v_[layer].as<float>(); }

 private:
  friend class Model;
  int32_t length_tokens_ = 0;
  int32_t capacity_tokens_ = 0;
  int32_t num_kv_heads_ = 0;
  std::vector<ops::DeviceBuffer> k_, v_;
};

// Which logits Forward returns.
enum class LogitsMode { kLastToken, kAllTokens };

class Model {
 public:
  // Loads DIR/config.json (+ generation_config.json) and the safetensors weights.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& model_dir,
                                                     ops::Backend* backend);
  // A model with seeded random weights (benchmarks); norms 1, other weights N(0, 0.02).
  static absl::StatusOr<std::unique_ptr<Model>> CreateRandom(const ModelConfig& config,
                                                             uint64_t seed, ops::Backend* backend);

  const ModelConfig& config() const { return config_; }
  ops::Backend* backend() const { return backend_; }

  // A cache for up to capacity_tokens tokens (<= max context).
  absl::StatusOr<std::unique_ptr<KvCache>> NewCache(int32_t capacity_tokens) const;

  // Runs `tokens` at positions [cache->length, cache->length + n), appends their K/V to
  // the cache and returns logits: [vocab] for kLastToken, [n, vocab] for kAllTokens.
  // Ids outside [0, vocab) and overflowing the cache are INVALID_ARGUMENT.
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const int32_t> tokens, KvCache* cache,
                                             LogitsMode mode = LogitsMode::kLastToken);

 private:
  struct Layer {
    ops::DeviceBuffer input_norm, post_attention_norm;
    ops::DeviceBuffer wq, wk, wv, wo, bq, bk, bv, q_norm, k_norm;
    ops::DeviceBuffer gate, up, down;
  };
  // Supplies a tensor by name and shape as float32 host data.
  using TensorSource = std::function<absl::StatusOr<std::vector<float>>(
      const std::string& name, const std::vector<int64_t>& shape)>;

  Model(ModelConfig config, ops::Backend* backend) : config_(std::move(config)), backend_(backend) {}
  absl::Status LoadWeights(const TensorSource& source, bool lm_head_present);
  absl::StatusOr<ops::DeviceBuffer> Upload(const TensorSource& source, const std::string& name,
                                           const std::vector<int64_t>& shape);
  absl::Status EnsureScratch(int32_t num_tokens);

  ModelConfig config_;
  ops::Backend* backend_;
  std::vector<Layer> layers_;
  ops::DeviceBuffer embed_, final_norm_, lm_head_;  // lm_head_ empty when tied
  ops::DeviceBuffer inv_freq_;

  // Scratch sized for scratch_tokens_ tokens.
  int32_t scratch_tokens_ = 0;
  ops::DeviceBuffer ids_, positions_, x_, h_, q_, k_, v_, attn_, gate_, up_, logits_;
};

}  // namespace kvgate::engine
