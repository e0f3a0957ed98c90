#include "gates/sage_kv.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "cuda/cpu/reference_ops.h"
#include "gates/internal/test_util.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

using testing::RandomCapture;
using testing::Shape;

ResolvedBudget SageBudget(int32_t n, int32_t budget, std::optional<int32_t> sink = {},
                          std::optional<int32_t> recent = {}) {
  EvictionSpec spec;
  spec.policy = "sage_kv";
  spec.budget_tokens = budget;
  spec.sink_tokens = sink;
  spec.recent_tokens = recent;
  auto r = ResolveBudget(spec, n, kDefaultQuarterOfBudget, kDefaultQuarterOfBudget);
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

TEST(SageKvScoresTest, MatchesSlowDoubleRecomputation) {
  const ModelShape shape = Shape(2, 6, 2, 8, 16);
  const PrefillCapture c = RandomCapture(shape, 37, 3, false, 1);  // uses the last of 3 rows
  auto scores = SageKvScores(c);
  ASSERT_TRUE(scores.ok()) << scores.status();
  for (int32_t l = 0; l < 2; ++l) {
    for (int32_t qh = 0; qh < 6; ++qh) {
      for (int32_t j = 0; j < 37; ++j) {
        double dot = 0;
        for (int32_t e = 0; e < 8; ++e) {
          dot += double(c.last_queries[l][(size_t(2) * 6 + qh) * 8 + e]) * double(c.keys[l][(size_t(qh / 3) * 37 + j) * 8 + e]);
        }
        const double ref = dot / std::sqrt(8.0);
        EXPECT_NEAR(scores->at(l, qh, j), ref, 1e-6 * std::abs(ref) + 1e-7);
      }
    }
  }
}

// The capture a SAGE-KV request gets from the backend: the last query's logits
// (ops::WindowAttentionProbs with logits, here its reference), no keys: the same scores.
TEST(SageKvScoresTest, BackendLogitsGiveTheSameScores) {
  const ModelShape shape = Shape(2, 6, 2, 8, 16);
  const PrefillCapture c = RandomCapture(shape, 37, 3, false, 1);
  PrefillCapture scored;
  scored.shape = shape;
  scored.prompt_tokens = 37;
  scored.num_window_queries = 1;
  scored.window_logits = true;
  for (int32_t l = 0; l < 2; ++l) scored.window_probs.push_back(testing::ReferenceWindowScores(c, l, 1, true));
  auto want = SageKvScores(c);
  auto got = SageKvScores(scored);
  ASSERT_TRUE(want.ok() && got.ok()) << want.status() << got.status();
  for (int32_t l = 0; l < 2; ++l) {
    for (int32_t qh = 0; qh < 6; ++qh) {
      for (int32_t j = 0; j < 37; ++j) {
        const float w = want->at(l, qh, j);
        EXPECT_NEAR(got->at(l, qh, j), w, 1e-6 * std::abs(w) + 1e-7);
      }
    }
  }
}

// Query head 0 of the group prefers keys {3, 5}, query head 1 prefers {8, 11}, and both like
// key 7 a bit: with k = 2 per query head each keeps its own pair.
TEST(SageKvSelectTest, SeparateTopKPerQueryHeadWithMasks) {
  const ModelShape shape = Shape(1, 2, 1, 2, 4);
  PrefillCapture c;
  c.shape = shape;
  c.prompt_tokens = 16;
  c.num_last_queries = 1;
  c.last_queries = {{1.0f, 0.0f, 0.0f, 1.0f}};  // q head 0 = e0, q head 1 = e1
  std::vector<float> keys(16 * 2, 0.0f);
  auto set = [&](int32_t j, float a, float b) { keys[j * 2] = a, keys[j * 2 + 1] = b; };
  set(3, 5.0f, 0.0f);
  set(5, 4.0f, 0.0f);
  set(7, 1.0f, 1.0f);
  set(8, 0.0f, 5.0f);
  set(11, 0.0f, 4.0f);
  set(0, 9.0f, 9.0f);   // sink: shared anyway
  set(15, 9.0f, 9.0f);  // last token
  c.keys = {keys};
  // B = 8: sink 2, recent 2 (includes the last token) -> |P| = 4, k = (8 - 4) / 2 = 2.
  const ResolvedBudget budget = SageBudget(16, 8);
  ASSERT_EQ(budget.sink_tokens, 2);
  ASSERT_EQ(budget.recent_tokens, 2);
  auto scores = SageKvScores(c);
  ASSERT_TRUE(scores.ok());
  auto plan = SageKvSelect(*scores, 2, budget);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->heads[0].positions, (std::vector<int32_t>{0, 1, 3, 5, 8, 11, 14, 15}));
  EXPECT_EQ(plan->heads[0].query_mask, (std::vector<uint8_t>{3, 3, 1, 1, 2, 2, 3, 3}));
  EXPECT_TRUE(plan->heads[0].scores.empty());

  // Both query heads prefer key 7 most: the union shrinks and 7 is visible to both.
  set(7, 9.0f, 9.0f);
  c.keys = {keys};
  scores = SageKvScores(c);
  plan = SageKvSelect(*scores, 2, budget);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->heads[0].positions, (std::vector<int32_t>{0, 1, 3, 7, 8, 14, 15}));
  EXPECT_EQ(plan->heads[0].query_mask, (std::vector<uint8_t>{3, 3, 1, 3, 2, 3, 3}));
}

// Brute force: per query head, sort the middle keys by (score desc, position asc).
TEST(SageKvSelectTest, MatchesBruteForceAndPaperDefaults) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    const ModelShape shape = Shape(2, 8, 2, 8, 16);  // G = 4
    const int32_t n = 200, B = 64;
    const PrefillCapture c = RandomCapture(shape, n, 1, false, seed);
    const ResolvedBudget budget = SageBudget(n, B);
    EXPECT_EQ(budget.sink_tokens, 16);  // B / 4
    EXPECT_EQ(budget.recent_tokens, 16);
    auto scores = SageKvScores(c);
    ASSERT_TRUE(scores.ok());
    auto plan = SageKvSelect(*scores, 4, budget);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int32_t k = B / (2 * 4);  // 8 per query head
    for (int32_t l = 0; l < 2; ++l) {
      for (int32_t h = 0; h < 2; ++h) {
        std::map<int32_t, uint8_t> want;
        for (int32_t p = 0; p < 16; ++p) want[p] = 0xf;
        for (int32_t p = n - 16; p < n; ++p) want[p] = 0xf;
        for (int32_t g = 0; g < 4; ++g) {
          std::vector<std::pair<float, int32_t>> middle;
          for (int32_t p = 16; p < n - 16; ++p) middle.push_back({-scores->at(l, h * 4 + g, p), p});
          std::sort(middle.begin(), middle.end());
          for (int32_t i = 0; i < k; ++i) want[middle[i].second] |= static_cast<uint8_t>(1 << g);
        }
        const HeadKeep& got = plan->at(l, h);
        std::vector<int32_t> want_pos;
        std::vector<uint8_t> want_mask;
        for (auto [p, m] : want) want_pos.push_back(p), want_mask.push_back(m);
        EXPECT_EQ(got.positions, want_pos);
        EXPECT_EQ(got.query_mask, want_mask);
        EXPECT_LE(got.positions.size(), static_cast<size_t>(B));  // union <= B
        for (int32_t g = 0; g < 4; ++g) {  // each query head sees sink + k + recent = 40
          EXPECT_EQ(std::count_if(got.query_mask.begin(), got.query_mask.end(), [g](uint8_t m) { return m >> g & 1; }),
                    16 + k + 16);
        }
      }
    }
  }
}

TEST(SageKvSelectTest, OverridesShortPromptsAndLastTokenAlwaysKept) {
  const ModelShape shape = Shape(1, 2, 1, 4, 8);
  const PrefillCapture c = RandomCapture(shape, 50, 1, false, 9);
  auto scores = SageKvScores(c);
  ASSERT_TRUE(scores.ok());
  // sink 0, recent 0: |P| = 1 (the last token), k = (11 - 1) / 2 = 5.
  auto plan = SageKvSelect(*scores, 2, SageBudget(50, 11, 0, 0));
  ASSERT_TRUE(plan.ok());
  const HeadKeep& h = plan->heads[0];
  EXPECT_EQ(h.positions.back(), 49);
  EXPECT_EQ(h.query_mask.back(), 3);
  for (int32_t g = 0; g < 2; ++g) {
    EXPECT_EQ(std::count_if(h.query_mask.begin(), h.query_mask.end(), [g](uint8_t m) { return m >> g & 1; }), 6);
  }
  // n <= B keeps everything, without masks.
  auto all = SageKvSelect(*scores, 2, SageBudget(50, 50));
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(all->heads[0].positions.size(), 50u);
  EXPECT_TRUE(all->heads[0].query_mask.empty());
  // Protections above the budget: exactly sink + recent, visible to all.
  auto tight = SageKvSelect(*scores, 2, SageBudget(50, 4, 3, 3));
  ASSERT_TRUE(tight.ok());
  EXPECT_EQ(tight->heads[0].positions, (std::vector<int32_t>{0, 1, 2, 47, 48, 49}));
  EXPECT_EQ(tight->heads[0].query_mask, std::vector<uint8_t>(6, 3));
}

TEST(SageKvPolicyTest, EndToEndAndErrors) {
  const ModelShape shape = Shape(2, 8, 2, 4, 8);
  auto policy = CreatePolicy("sage_kv", {}, shape);
  ASSERT_TRUE(policy.ok());
  EXPECT_EQ((*policy)->needs().last_queries, 1);
  EXPECT_TRUE((*policy)->needs().keys);
  EXPECT_EQ((*policy)->default_sink(), kDefaultQuarterOfBudget);
  const PrefillCapture c = RandomCapture(shape, 120, 1, false, 4);
  const ResolvedBudget budget = SageBudget(120, 32);
  auto plan = (*policy)->Plan(c, budget, HeadBudget::kUniform);
  ASSERT_TRUE(plan.ok()) << plan.status();
  for (const HeadKeep& h : plan->heads) {
    EXPECT_LE(h.positions.size(), 32u);
    EXPECT_EQ(h.positions.size(), h.query_mask.size());
  }
  EXPECT_STATUS((*policy)->Plan(c, budget, HeadBudget::kAdaptive), absl::StatusCode::kInvalidArgument, "ADAPTIVE");
  EXPECT_STATUS(CreatePolicy("sage_kv", {}, Shape(1, 16, 1, 4, 8)), absl::StatusCode::kInvalidArgument, "group size");
  PrefillCapture wrong = c;
  wrong.keys.pop_back();
  EXPECT_STATUS((*policy)->Plan(wrong, budget, HeadBudget::kUniform), absl::StatusCode::kInvalidArgument, "keys");
}

}  // namespace
}  // namespace kvgate::gates
