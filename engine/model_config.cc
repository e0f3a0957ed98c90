#include "engine/model_config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvgate::engine {
namespace {

using json = nlohmann::json;

absl::Status Invalid(const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: ", field, ": ", why));
}

// Reads a required positive integer field.
absl::StatusOr<int32_t> PositiveInt(const json& config, const std::string& field) {
  if (!config.contains(field)) return Invalid(field, "missing");
  const json& value = config[field];
  if (!value.is_number_integer() || value.get<int64_t>() <= 0 || value.get<int64_t>() > (1ll << 30)) {
    return Invalid(field, absl::StrCat("must be a positive integer, got ", value.dump()));
  }
  return static_cast<int32_t>(value.get<int64_t>());
}

absl::StatusOr<double> OptionalNumber(const json& object, const std::string& field, double fallback,
                                      const std::string& where) {
  if (!object.contains(field) || object[field].is_null()) return fallback;
  if (!object[field].is_number()) return Invalid(where + field, "must be a number");
  return object[field].get<double>();
}

// A boolean field; absent or null gives `fallback`.
absl::StatusOr<bool> OptionalBool(const json& config, const std::string& field, bool fallback) {
  if (!config.contains(field) || config[field].is_null()) return fallback;
  if (!config[field].is_boolean()) return Invalid(field, "must be true or false");
  return config[field].get<bool>();
}

absl::Status ParseRope(const json& config, ModelConfig* out) {
  // transformers < 5 writes rope_theta + rope_scaling; 5.x may write rope_parameters.
  const json* scaling = nullptr;
  std::string where = "rope_scaling.";
  if (config.contains("rope_parameters") && config["rope_parameters"].is_object()) {
    scaling = &config["rope_parameters"];
    where = "rope_parameters.";
  } else if (config.contains("rope_scaling") && !config["rope_scaling"].is_null()) {
    if (!config["rope_scaling"].is_object()) return Invalid("rope_scaling", "must be an object or null");
    scaling = &config["rope_scaling"];
  }
  KVGATE_ASSIGN_OR_RETURN(out->rope.theta, OptionalNumber(config, "rope_theta", 10000.0, ""));
  if (scaling == nullptr) return absl::OkStatus();
  if (scaling->contains("rope_theta")) {
    KVGATE_ASSIGN_OR_RETURN(out->rope.theta, OptionalNumber(*scaling, "rope_theta", 10000.0, where));
  }
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (scaling->contains(key) && (*scaling)[key].is_string()) {
      type = (*scaling)[key].get<std::string>();
      break;
    }
  }
  if (type != "default" && type != "linear" && type != "llama3") {
    return Invalid(where + "rope_type", absl::StrCat("'", type, "' is not supported (supported: default, linear, llama3)"));
  }
  out->rope.type = type;
  KVGATE_ASSIGN_OR_RETURN(out->rope.factor, OptionalNumber(*scaling, "factor", 1.0, where));
  if (type == "llama3") {
    KVGATE_ASSIGN_OR_RETURN(out->rope.low_freq_factor, OptionalNumber(*scaling, "low_freq_factor", 1.0, where));
    KVGATE_ASSIGN_OR_RETURN(out->rope.high_freq_factor, OptionalNumber(*scaling, "high_freq_factor", 4.0, where));
    KVGATE_ASSIGN_OR_RETURN(double original,
                            OptionalNumber(*scaling, "original_max_position_embeddings", 8192, where));
    out->rope.original_max_position_embeddings = static_cast<int64_t>(original);
    if (out->rope.high_freq_factor <= out->rope.low_freq_factor) {
      return Invalid(where + "high_freq_factor", "must exceed low_freq_factor");
    }
  }
  if (type != "default" && out->rope.factor <= 0) return Invalid(where + "factor", "must be positive");
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

void AddEosIds(const json& value, std::vector<int32_t>* ids) {
  auto add = [&](const json& v) {
    if (!v.is_number_integer()) return;
    const int32_t id = static_cast<int32_t>(v.get<int64_t>());
    for (int32_t existing : *ids) if (existing == id) return;
    ids->push_back(id);
  };
  if (value.is_array()) {
    for (const json& v : value) add(v);
  } else {
    add(value);
  }
}

}  // namespace

int64_t ModelConfig::NumParameters() const {
  const int64_t h = hidden_size, q = static_cast<int64_t>(num_heads) * head_dim,
                kv = static_cast<int64_t>(num_kv_heads) * head_dim;
  int64_t per_layer = h * q + 2 * h * kv + q * h + 3 * h * intermediate_size + 2 * h;
  if (attention_bias) per_layer += q + 2 * kv;
  if (qk_norm) per_layer += 2 * head_dim;
  int64_t total = per_layer * num_layers + static_cast<int64_t>(vocab_size) * h + h;
  if (!tie_word_embeddings) total += static_cast<int64_t>(vocab_size) * h;
  return total;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& text) {
  json config = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError("config.json: not a JSON object");
  }
  ModelConfig out;
  if (!config.contains("architectures") || !config["architectures"].is_array() ||
      config["architectures"].empty() || !config["architectures"][0].is_string()) {
    return Invalid("architectures", "missing; expected e.g. [\"LlamaForCausalLM\"]");
  }
  out.architecture_name = config["architectures"][0].get<std::string>();
  if (out.architecture_name == "LlamaForCausalLM") {
    out.architecture = Architecture::kLlama;
  } else if (out.architecture_name == "MistralForCausalLM") {
    out.architecture = Architecture::kMistral;
  } else if (out.architecture_name == "Qwen2ForCausalLM") {
    out.architecture = Architecture::kQwen2;
  } else if (out.architecture_name == "Qwen3ForCausalLM") {
    out.architecture = Architecture::kQwen3;
  } else {
    return Invalid("architectures", absl::StrCat("'", out.architecture_name,
                                                 "' is not supported (supported: LlamaForCausalLM, "
                                                 "MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"));
  }
  KVGATE_ASSIGN_OR_RETURN(out.vocab_size, PositiveInt(config, "vocab_size"));
  KVGATE_ASSIGN_OR_RETURN(out.hidden_size, PositiveInt(config, "hidden_size"));
  KVGATE_ASSIGN_OR_RETURN(out.intermediate_size, PositiveInt(config, "intermediate_size"));
  KVGATE_ASSIGN_OR_RETURN(out.num_layers, PositiveInt(config, "num_hidden_layers"));
  KVGATE_ASSIGN_OR_RETURN(out.num_heads, PositiveInt(config, "num_attention_heads"));
  out.num_kv_heads = out.num_heads;
  if (config.contains("num_key_value_heads") && !config["num_key_value_heads"].is_null()) {
    KVGATE_ASSIGN_OR_RETURN(out.num_kv_heads, PositiveInt(config, "num_key_value_heads"));
  }
  if (out.num_heads % out.num_kv_heads != 0) {
    return Invalid("num_key_value_heads", absl::StrCat(out.num_kv_heads, " does not divide num_attention_heads ",
                                                      out.num_heads));
  }
  if (config.contains("head_dim") && !config["head_dim"].is_null()) {
    KVGATE_ASSIGN_OR_RETURN(out.head_dim, PositiveInt(config, "head_dim"));
  } else {
    if (out.hidden_size % out.num_heads != 0) {
      return Invalid("hidden_size", "not divisible by num_attention_heads and no head_dim given");
    }
    out.head_dim = out.hidden_size / out.num_heads;
  }
  if (out.head_dim % 2 != 0) return Invalid("head_dim", "must be even for rotary embeddings");
  // Real models use 64-256; the bound keeps a hostile config from sizing per-head tables
  // (RoPE frequencies, attention scratch) in gigabytes (a fuzz finding: head_dim 2^30 took
  // 20 s and 2.4 GB before any weight was read).
  constexpr int32_t kMaxHeadDim = 1024;
  if (out.head_dim > kMaxHeadDim) {
    return Invalid("head_dim", absl::StrCat(out.head_dim, " is larger than the supported ", kMaxHeadDim));
  }
  KVGATE_ASSIGN_OR_RETURN(out.max_context_tokens, PositiveInt(config, "max_position_embeddings"));
  KVGATE_ASSIGN_OR_RETURN(double eps, OptionalNumber(config, "rms_norm_eps", 1e-6, ""));
  out.rms_norm_eps = static_cast<float>(eps);
  KVGATE_RETURN_IF_ERROR(ParseRope(config, &out));

  for (const char* act_field : {"hidden_act", "hidden_activation"}) {
    if (config.contains(act_field) && config[act_field].is_string() &&
        config[act_field].get<std::string>() != "silu") {
      return Invalid(act_field, absl::StrCat("'", config[act_field].get<std::string>(), "' is not supported (only silu)"));
    }
  }
  KVGATE_ASSIGN_OR_RETURN(bool mlp_bias, OptionalBool(config, "mlp_bias", false));
  if (mlp_bias) return Invalid("mlp_bias", "true is not supported");
  KVGATE_ASSIGN_OR_RETURN(out.tie_word_embeddings, OptionalBool(config, "tie_word_embeddings", false));
  switch (out.architecture) {
    case Architecture::kQwen2:
      out.attention_bias = true;
      break;
    case Architecture::kLlama:
    case Architecture::kQwen3: {
      KVGATE_ASSIGN_OR_RETURN(out.attention_bias, OptionalBool(config, "attention_bias", false));
      break;
    }
    case Architecture::kMistral:
      break;
  }
  out.qk_norm = out.architecture == Architecture::kQwen3;
  const bool qwen = out.architecture == Architecture::kQwen2 || out.architecture == Architecture::kQwen3;
  KVGATE_ASSIGN_OR_RETURN(bool use_sliding_window, OptionalBool(config, "use_sliding_window", false));
  if (qwen && use_sliding_window) {
    return Invalid("use_sliding_window", "true is not supported for Qwen models (per-layer windows)");
  }
  if (out.architecture == Architecture::kMistral && config.contains("sliding_window") &&
      !config["sliding_window"].is_null()) {
    KVGATE_ASSIGN_OR_RETURN(out.sliding_window, PositiveInt(config, "sliding_window"));
  }
  if (config.contains("eos_token_id")) AddEosIds(config["eos_token_id"], &out.eos_token_ids);
  if (config.contains("bos_token_id") && config["bos_token_id"].is_number_integer()) {
    out.bos_token_id = static_cast<int32_t>(config["bos_token_id"].get<int64_t>());
  }
  return out;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory '", model_dir, "' does not exist"));
  }
  KVGATE_ASSIGN_OR_RETURN(std::string text, ReadFile((fs::path(model_dir) / "config.json").string()));
  auto config = ParseModelConfig(text);
  if (!config.ok()) {
    return absl::Status(config.status().code(), absl::StrCat(model_dir, "/", config.status().message()));
  }
  const fs::path generation = fs::path(model_dir) / "generation_config.json";
  if (fs::exists(generation, ec)) {
    auto generation_text = ReadFile(generation.string());
    if (generation_text.ok()) {
      json parsed = json::parse(*generation_text, nullptr, false);
      if (parsed.is_object() && parsed.contains("eos_token_id")) {
        AddEosIds(parsed["eos_token_id"], &config->eos_token_ids);
      }
    }
  }
  return config;
}

std::vector<float> RopeInverseFrequencies(const ModelConfig& config) {
  const int half = config.head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; ++i) {
    // float32 as in transformers: base ** (arange(0, dim, 2).float() / dim)
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(config.head_dim);
    inv_freq[i] = 1.0f / std::pow(static_cast<float>(config.rope.theta), exponent);
  }
  const RopeConfig& rope = config.rope;
  if (rope.type == "linear") {
    for (float& f : inv_freq) f = static_cast<float>(f / rope.factor);
  } else if (rope.type == "llama3") {
    const double old_context = static_cast<double>(rope.original_max_position_embeddings);
    const double low_freq_wavelen = old_context / rope.low_freq_factor;
    const double high_freq_wavelen = old_context / rope.high_freq_factor;
    for (float& f : inv_freq) {
      const double wavelen = 2.0 * std::numbers::pi / f;
      if (wavelen > low_freq_wavelen) {
        f = static_cast<float>(f / rope.factor);
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth = (old_context / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rope.factor + smooth * f);
      }
    }
  }
  return inv_freq;
}

}  // namespace kvgate::engine
