#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>

namespace kvgate::engine {
namespace {

TEST(SamplerTest, GreedyTakesTheLowestIdAmongTies) {
  Sampler sampler({});
  EXPECT_EQ(sampler.Sample(std::vector<float>{0.0f, 3.0f, 1.0f, 3.0f}), 1);
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  std::vector<float> logits(50);
  for (int i = 0; i < 50; ++i) logits[i] = std::sin(i * 1.7f);
  auto draw = [&](uint64_t seed) {
    Sampler sampler({.temperature = 1.0f, .seed = seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 40; ++i) out.push_back(sampler.Sample(logits));
    return out;
  };
  EXPECT_EQ(draw(1), draw(1));
  EXPECT_NE(draw(1), draw(2));
}

TEST(SamplerTest, FiltersNarrowTheCandidates) {
  const std::vector<float> logits = {2.0f, 1.9f, 0.0f, -1.0f, 1.95f};
  for (uint64_t seed = 0; seed < 200; ++seed) {
    Sampler top_k({.temperature = 1.0f, .top_k = 2, .seed = seed});
    const int32_t k = top_k.Sample(logits);
    EXPECT_TRUE(k == 0 || k == 4) << k;
    Sampler top_p({.temperature = 1.0f, .top_p = 0.01f, .seed = seed});
    EXPECT_EQ(top_p.Sample(logits), 0);
    Sampler min_p({.temperature = 1.0f, .min_p = 1.0f, .seed = seed});
    EXPECT_EQ(min_p.Sample(logits), 0);
  }
}

TEST(SamplerTest, FrequenciesFollowTheSoftmax) {
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler sampler({.temperature = 1.0f, .seed = 42});
  std::map<int32_t, int> counts;
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) ++counts[sampler.Sample(logits)];
  EXPECT_NEAR(counts[0] / double(draws), 0.5, 0.02);
  EXPECT_NEAR(counts[1] / double(draws), 0.3, 0.02);
  EXPECT_NEAR(counts[2] / double(draws), 0.2, 0.02);
}

TEST(SamplerTest, ValidationNamesTheField) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(ValidateSamplingOptions({.temperature = nan}).message().find("temperature"), std::string::npos);
  EXPECT_NE(ValidateSamplingOptions({.temperature = -1}).message().find("temperature"), std::string::npos);
  EXPECT_NE(ValidateSamplingOptions({.top_p = 0.0f}).message().find("top_p"), std::string::npos);
  EXPECT_NE(ValidateSamplingOptions({.top_p = 1.5f}).message().find("top_p"), std::string::npos);
  EXPECT_NE(ValidateSamplingOptions({.top_k = -2}).message().find("top_k"), std::string::npos);
  EXPECT_NE(ValidateSamplingOptions({.min_p = 2.0f}).message().find("min_p"), std::string::npos);
  EXPECT_TRUE(ValidateSamplingOptions({}).ok());
}

TEST(SamplerTest, RestoredStateContinuesTheSameSequence) {
  SamplingOptions options;
  options.temperature = 1.0f;
  options.seed = 11;
  const std::vector<float> logits = {0.1f, 0.5f, 0.2f, 0.9f, 0.3f, 0.0f, 0.7f};
  Sampler original(options);
  (void)original.Sample(logits);
  Sampler resumed(SamplingOptions{.temperature = 1.0f, .seed = 999});
  ASSERT_TRUE(resumed.RestoreState(original.SaveState()).ok());
  for (int i = 0; i < 64; ++i) EXPECT_EQ(original.Sample(logits), resumed.Sample(logits)) << i;
  EXPECT_EQ(resumed.RestoreState("not a generator state").code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::engine
