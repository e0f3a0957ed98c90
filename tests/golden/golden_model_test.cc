// The engine against Hugging Face transformers: logits and 32-token greedy
// continuations recorded by tests/golden/make_fixtures.py (float32 on CPU, eager
// attention) for random checkpoints of every supported architecture and for the real
// TinyStories model.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>

#include "cuda/cpu/cpu_backend.h"
#include "cuda/cuda_backend.h"
#include "engine/generator.h"
#include "engine/model.h"
#include "engine/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"

namespace kvgate {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// The bar for float32: max |logit difference| <= 1e-3.
constexpr double kMaxLogitDiffF32 = 1e-3;
constexpr int kGreedyTokens = 32;

struct GoldenCase {
  std::string name;
  fs::path model_dir;
  fs::path expected_json;
  std::string backend;  // "cpu", or "cuda" (skipped where no GPU is visible)
};

void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.backend << ":" << c.name; }

std::vector<GoldenCase> FindCases() {
  std::vector<GoldenCase> cases;
  const fs::path models = testing::GoldenDir() / "models";
  std::error_code ec;
  if (fs::is_directory(models, ec)) {
    for (const auto& entry : fs::directory_iterator(models)) {
      cases.push_back({entry.path().filename().string(), entry.path(), entry.path() / "expected.json", "cpu"});
    }
  }
  cases.push_back({"tinystories-656k", testing::TinyStoriesDir(),
                   testing::GoldenDir() / "tinystories-656k" / "expected.json", "cpu"});
  cases.push_back({"kvgate-tiny", testing::KvgateTinyDir(), testing::GoldenDir() / "kvgate-tiny" / "expected.json",
                   "cpu"});
  std::sort(cases.begin(), cases.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  const size_t cpu_cases = cases.size();
  for (size_t i = 0; i < cpu_cases; ++i) {
    cases.push_back(cases[i]);
    cases.back().backend = "cuda";
  }
  return cases;
}

class GoldenModelTest : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(GoldenModelTest, LogitsAndGreedyMatchTransformers) {
  const GoldenCase& c = GetParam();
  KVGATE_SKIP_UNLESS_EXISTS(c.model_dir);  // tinystories-656k lives in ../shared
  ASSERT_TRUE(fs::exists(c.expected_json)) << "golden fixture missing: " << c.expected_json
                                           << " (run tests/golden/make_fixtures.py, see tests/golden/README.md)";
  std::ifstream in(c.expected_json);
  const json expected = json::parse(in);
  std::unique_ptr<ops::Backend> backend;
  if (c.backend == "cuda") {
    if (ops::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    auto cuda = ops::CreateBackend("cuda");
    ASSERT_TRUE(cuda.ok()) << cuda.status();
    backend = std::move(*cuda);
  } else {
    backend = ops::CreateCpuBackend(2);
  }
  // transformers' reference is float32: compare float32 weights on every backend (the
  // CUDA backend's default bf16 weights have their own parity tests, cuda_bf16_ops_test,
  // and end-to-end figures in bench/results/gpu-engine.md).
  engine::LoadOptions load;
  load.weights = engine::WeightDType::kF32;
  auto model = engine::Model::Load(c.model_dir.string(), backend.get(), load);
  ASSERT_TRUE(model.ok()) << model.status();
  auto tokenizer = engine::Tokenizer::FromFile((c.model_dir / "tokenizer.json").string());
  ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
  const int vocab = (*model)->config().vocab_size;

  ASSERT_FALSE(expected["prompts"].empty());
  for (size_t p = 0; p < expected["prompts"].size(); ++p) {
    const json& prompt = expected["prompts"][p];
    const std::vector<int32_t> ids = prompt["ids"].get<std::vector<int32_t>>();
    SCOPED_TRACE(c.name + " prompt " + std::to_string(p) + " (" + std::to_string(ids.size()) + " tokens)");
    if (expected.contains("texts") && p < expected["texts"].size()) {
      auto encoded = (*tokenizer)->Encode(expected["texts"][p].get<std::string>());
      ASSERT_TRUE(encoded.ok()) << encoded.status();
      EXPECT_EQ(*encoded, ids) << "tokenizer disagrees with transformers on the prompt text";
    }
    auto cache = *(*model)->NewCache(static_cast<int32_t>(ids.size()));
    auto logits = (*model)->Forward(ids, cache.get(), engine::LogitsMode::kAllTokens);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const auto positions = prompt["logits_positions"].get<std::vector<int>>();
    ASSERT_EQ(positions.size(), prompt["logits"].size());
    double worst = 0;
    for (size_t i = 0; i < positions.size(); ++i) {
      const auto row = prompt["logits"][i].get<std::vector<double>>();
      ASSERT_EQ(static_cast<int>(row.size()), vocab);
      for (int v = 0; v < vocab; ++v) {
        worst = std::max(worst, std::fabs(row[v] - (*logits)[size_t{1} * positions[i] * vocab + v]));
      }
    }
    EXPECT_LE(worst, kMaxLogitDiffF32) << "max |logit difference|";
    RecordProperty("max_logit_diff_prompt_" + std::to_string(p), std::to_string(worst));
    std::cout << "[golden] " << c.backend << " " << c.name << " prompt " << p << ": max |logit diff| " << worst << "\n";

    engine::Generator generator(model->get(), tokenizer->get());
    engine::GenerateOptions options;
    options.max_tokens = kGreedyTokens;
    options.ignore_eos = true;
    auto result = generator.Generate(ids, options);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->token_ids, prompt["greedy"].get<std::vector<int32_t>>()) << "greedy continuation";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenModelTest, ::testing::ValuesIn(FindCases()),
                         [](const auto& info) {
                           std::string name = info.param.backend + "_" + info.param.name;
                           for (char& ch : name) if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

// The fixture set must cover every architecture; a missing directory fails loudly
// rather than silently testing less.
TEST(GoldenCoverageTest, EveryArchitectureHasAFixture) {
  std::set<std::string> architectures;
  for (const GoldenCase& c : FindCases()) {
    if (c.backend != "cpu") continue;
    std::ifstream in(c.model_dir / "config.json");
    if (!in) continue;
    architectures.insert(json::parse(in)["architectures"][0].get<std::string>());
  }
  for (const char* arch : {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}) {
    EXPECT_TRUE(architectures.count(arch)) << "no golden fixture for " << arch;
  }
}

}  // namespace
}  // namespace kvgate
