// File: the Llama-family model configuration read from a Hugging Face config.json
// (plus generation_config.json for extra end-of-sequence ids). Everything the engine
// does not implement is rejected here with a message naming the field.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvgate::engine {

enum class Architecture { kLlama, kMistral, kQwen2, kQwen3 };

struct RopeConfig {
  double theta = 10000.0;
  // "default", "linear" or "llama3".
  std::string type = "default";
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture_name;  // as in config.json, e.g. "Qwen3ForCausalLM"
  Architecture architecture = Architecture::kLlama;
  int32_t vocab_size = 0;
  int32_t hidden_size = 0;
  int32_t intermediate_size = 0;
  int32_t num_layers = 0;
  int32_t num_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t max_context_tokens = 0;  // max_position_embeddings
  float rms_norm_eps = 1e-6f;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2 always)
  bool qk_norm = false;         // per-head RMSNorm of q and k (Qwen3)
  int32_t sliding_window = 0;   // tokens; 0 = full attention
  std::vector<int32_t> eos_token_ids;
  int32_t bos_token_id = -1;    // -1 when absent

  // Bytes of one KV entry (K and V of one token, one layer, one kv head) in float32.
  int64_t KvEntryBytes() const { return 2 * static_cast<int64_t>(head_dim) * 4; }
  int64_t NumParameters() const;
};

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& config_json_text);
// Reads DIR/config.json and, when present, DIR/generation_config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

// inv_freq[i] for i in [0, head_dim / 2), with the configured rope scaling applied.
std::vector<float> RopeInverseFrequencies(const ModelConfig& config);

}  // namespace kvgate::engine
