#include "engine/model_config.h"

#include <gtest/gtest.h>

#include <cmath>

#include "nlohmann/json.hpp"

namespace kvgate::engine {
namespace {

using nlohmann::json;

json BaseConfig(const std::string& architecture) {
  return {{"architectures", {architecture}}, {"vocab_size", 100},        {"hidden_size", 64},
          {"intermediate_size", 128},        {"num_hidden_layers", 2},   {"num_attention_heads", 4},
          {"num_key_value_heads", 2},        {"max_position_embeddings", 256}, {"rms_norm_eps", 1e-5},
          {"hidden_act", "silu"},            {"eos_token_id", 2}};
}

TEST(ModelConfigTest, ParsesEachArchitecture) {
  auto llama = ParseModelConfig(BaseConfig("LlamaForCausalLM").dump());
  ASSERT_TRUE(llama.ok()) << llama.status();
  EXPECT_EQ(llama->head_dim, 16);
  EXPECT_FALSE(llama->attention_bias);
  EXPECT_FALSE(llama->tie_word_embeddings);

  auto qwen2 = ParseModelConfig(BaseConfig("Qwen2ForCausalLM").dump());
  ASSERT_TRUE(qwen2.ok()) << qwen2.status();
  EXPECT_TRUE(qwen2->attention_bias);

  json qwen3_json = BaseConfig("Qwen3ForCausalLM");
  qwen3_json["head_dim"] = 32;
  auto qwen3 = ParseModelConfig(qwen3_json.dump());
  ASSERT_TRUE(qwen3.ok()) << qwen3.status();
  EXPECT_EQ(qwen3->head_dim, 32);
  EXPECT_TRUE(qwen3->qk_norm);

  json mistral_json = BaseConfig("MistralForCausalLM");
  mistral_json["sliding_window"] = 8;
  auto mistral = ParseModelConfig(mistral_json.dump());
  ASSERT_TRUE(mistral.ok()) << mistral.status();
  EXPECT_EQ(mistral->sliding_window, 8);
}

TEST(ModelConfigTest, ErrorsNameTheField) {
  struct Case {
    std::string field;
    json value;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"architectures", {"GPT2LMHeadModel"}, "architectures: 'GPT2LMHeadModel' is not supported"},
      {"hidden_act", "gelu", "hidden_act"},
      {"num_key_value_heads", 3, "num_key_value_heads"},
      {"vocab_size", -5, "vocab_size"},
      {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}, "rope_scaling.rope_type: 'yarn'"},
      {"tie_word_embeddings", "yes", "tie_word_embeddings"},
      // fuzz finding (model_config_fuzz timed out): 2^29 RoPE frequencies before any weight.
      {"head_dim", 1 << 30, "head_dim: 1073741824 is larger than the supported 1024"},
  };
  for (const Case& c : cases) {
    json config = BaseConfig("LlamaForCausalLM");
    config[c.field] = c.value;
    auto parsed = ParseModelConfig(config.dump());
    ASSERT_FALSE(parsed.ok()) << c.field;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(parsed.status().message().find(c.expected), std::string::npos) << parsed.status();
  }
  json wide = BaseConfig("LlamaForCausalLM");  // the same bound when head_dim is derived
  wide["hidden_size"] = 1 << 22;
  wide["num_attention_heads"] = 2;
  wide["num_key_value_heads"] = 2;
  EXPECT_NE(ParseModelConfig(wide.dump()).status().message().find("head_dim: 2097152 is larger"), std::string::npos);
  json missing = BaseConfig("LlamaForCausalLM");
  missing.erase("hidden_size");
  EXPECT_NE(ParseModelConfig(missing.dump()).status().message().find("hidden_size: missing"), std::string::npos);
  EXPECT_EQ(ParseModelConfig("not json").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LoadModelConfig("/nonexistent/model").status().code(), absl::StatusCode::kNotFound);
}

TEST(ModelConfigTest, Llama3RopeScalingMatchesTheFormula) {
  json config = BaseConfig("LlamaForCausalLM");
  config["rope_theta"] = 500000.0;
  config["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                            {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}};
  auto parsed = ParseModelConfig(config.dump());
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const std::vector<float> inv_freq = RopeInverseFrequencies(*parsed);
  ASSERT_EQ(inv_freq.size(), 8u);
  for (int i = 0; i < 8; ++i) {
    const double base = 1.0 / std::pow(500000.0, 2.0 * i / 16);
    const double wavelen = 2 * M_PI / base;
    double expected = base;
    if (wavelen > 64.0) {
      expected = base / 8.0;
    } else if (wavelen >= 16.0) {
      const double smooth = (64.0 / wavelen - 1.0) / 3.0;
      expected = (1 - smooth) * base / 8.0 + smooth * base;
    }
    EXPECT_NEAR(inv_freq[i], expected, 1e-6 * expected) << i;
  }
  // Both regimes occur at these settings, so the test is not vacuous.
  EXPECT_NEAR(inv_freq[0], 1.0f, 1e-7);
  EXPECT_NEAR(inv_freq[7], 1.0 / std::pow(500000.0, 14.0 / 16) / 8.0, 1e-12);
}

TEST(ModelConfigTest, EosIdsMayBeAList) {
  json config = BaseConfig("LlamaForCausalLM");
  config["eos_token_id"] = {7, 9};
  auto parsed = ParseModelConfig(config.dump());
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->eos_token_ids, (std::vector<int32_t>{7, 9}));
}

}  // namespace
}  // namespace kvgate::engine
