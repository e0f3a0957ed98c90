#include "gates/snapkv.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda/cpu/reference_ops.h"
#include "gates/internal/test_util.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

using testing::RandomCapture;
using testing::Shape;

// Slow double recomputation, written as kvpress does it: full attention rows of the
// window queries with a causal mask, softmax, slice [:, :m], mean over queries, explicit
// zero-padded average pool, mean over the group.
std::vector<double> SlowSnapKv(const PrefillCapture& c, int32_t window, int32_t kernel) {
  const ModelShape& s = c.shape;
  const int32_t n = c.prompt_tokens, d = s.head_dim, G = s.group_size(), w = std::min(window, n), m = n - w;
  std::vector<double> out(static_cast<size_t>(s.num_layers) * s.num_kv_heads * n, 0.0);
  for (int32_t l = 0; l < s.num_layers; ++l) {
    for (int32_t qh = 0; qh < s.num_q_heads; ++qh) {
      const int32_t h = qh / G;
      std::vector<std::vector<double>> attn(w, std::vector<double>(n, 0.0));
      for (int32_t i = 0; i < w; ++i) {
        const int32_t row = c.num_last_queries - w + i;
        std::vector<double> logit(n, -std::numeric_limits<double>::infinity());
        for (int32_t j = 0; j < n; ++j) {
          if (j > n - w + i) continue;  // causal mask
          double dot = 0;
          for (int32_t e = 0; e < d; ++e) {
            dot += double(c.last_queries[l][(size_t(row) * s.num_q_heads + qh) * d + e]) *
                   double(c.keys[l][(size_t(h) * n + j) * d + e]);
          }
          logit[j] = dot / std::sqrt(double(d));
        }
        double mx = -std::numeric_limits<double>::infinity();
        for (double x : logit) mx = std::max(mx, x);
        double z = 0;
        for (double x : logit) z += std::exp(x - mx);
        for (int32_t j = 0; j < n; ++j) attn[i][j] = std::exp(logit[j] - mx) / z;
      }
      std::vector<double> mean(m, 0.0);
      for (int32_t j = 0; j < m; ++j) {
        for (int32_t i = 0; i < w; ++i) mean[j] += attn[i][j];
        mean[j] /= w;
      }
      const int32_t pad = kernel / 2;
      std::vector<double> padded(m + 2 * pad, 0.0);
      for (int32_t j = 0; j < m; ++j) padded[j + pad] = mean[j];
      for (int32_t j = 0; j < m; ++j) {
        double acc = 0;
        for (int32_t t = 0; t < kernel; ++t) acc += padded[j + t];
        out[(size_t(l) * s.num_kv_heads + h) * n + j] += acc / kernel / G;
      }
    }
  }
  return out;
}

// `scored` is what SnapKvScores reads (keys and queries, or the backend's window probs);
// `c` holds the keys and queries the slow recomputation reads.
void ExpectMatchesSlow(const PrefillCapture& c, int32_t window, int32_t kernel,
                       const PrefillCapture* scored = nullptr) {
  auto grid = SnapKvScores(scored != nullptr ? *scored : c, window, kernel);
  ASSERT_TRUE(grid.ok()) << grid.status();
  const std::vector<double> want = SlowSnapKv(c, window, kernel);
  const int32_t n = c.prompt_tokens, m = n - std::min(window, n);
  for (int32_t l = 0; l < c.shape.num_layers; ++l) {
    for (int32_t h = 0; h < c.shape.num_kv_heads; ++h) {
      for (int32_t j = 0; j < n; ++j) {
        const float got = grid->at(l, h, j);
        if (j >= m) {
          EXPECT_EQ(got, std::numeric_limits<float>::infinity()) << "window row " << j;
          continue;
        }
        const double ref = want[(size_t(l) * c.shape.num_kv_heads + h) * n + j];
        // Float output of a double computation: 1 ulp-ish relative.
        EXPECT_NEAR(got, ref, 1e-6 * std::abs(ref) + 1e-12) << "l=" << l << " h=" << h << " j=" << j;
      }
    }
  }
}

TEST(SnapKvScoresTest, MatchesSlowDoubleRecomputation) {
  ExpectMatchesSlow(RandomCapture(Shape(2, 4, 2, 8, 16), 80, 16, false, 1), 16, 5);
  ExpectMatchesSlow(RandomCapture(Shape(1, 6, 2, 4, 8), 97, 64, false, 2), 64, 5);   // G = 3, default window
  ExpectMatchesSlow(RandomCapture(Shape(1, 2, 2, 8, 8), 30, 20, false, 3), 12, 3);   // uses the last 12 of 20
  ExpectMatchesSlow(RandomCapture(Shape(1, 2, 1, 8, 8), 9, 8, false, 4), 8, 7);      // kernel wider than m
}

// The capture the backend fills for a SnapKV request: the window's mean attention of
// every query head (ops::WindowAttentionProbs, here its reference), no keys, no queries.
PrefillCapture WithWindowProbs(const PrefillCapture& c, int32_t window) {
  const ModelShape& s = c.shape;
  const int32_t n = c.prompt_tokens, w = std::min(window, n);
  PrefillCapture out;
  out.shape = s;
  out.prompt_tokens = n;
  out.num_window_queries = w;
  for (int32_t l = 0; l < s.num_layers; ++l) out.window_probs.push_back(testing::ReferenceWindowScores(c, l, w, false));
  return out;
}

TEST(SnapKvScoresTest, BackendWindowProbsGiveTheSameScores) {
  for (const auto& [c, window, kernel] : {std::tuple{RandomCapture(Shape(2, 4, 2, 8, 16), 80, 16, false, 1), 16, 5},
                                          std::tuple{RandomCapture(Shape(1, 6, 2, 4, 8), 97, 64, false, 2), 64, 5},
                                          std::tuple{RandomCapture(Shape(1, 2, 2, 8, 8), 30, 20, false, 3), 12, 3},
                                          std::tuple{RandomCapture(Shape(1, 2, 1, 8, 8), 9, 8, false, 4), 8, 7}}) {
    const PrefillCapture scored = WithWindowProbs(c, window);
    ExpectMatchesSlow(c, window, kernel, &scored);
  }
  // Window probs of another window size are not used: without keys that is an error.
  const PrefillCapture c = RandomCapture(Shape(1, 2, 1, 8, 8), 40, 16, false, 9);
  EXPECT_STATUS(SnapKvScores(WithWindowProbs(c, 16), 8, 5), absl::StatusCode::kInvalidArgument, "last 8 queries");
}

TEST(SnapKvScoresTest, RejectsBadInputs) {
  const PrefillCapture c = RandomCapture(Shape(1, 2, 1, 4, 8), 40, 8, false, 5);
  EXPECT_STATUS(SnapKvScores(c, 16, 5), absl::StatusCode::kInvalidArgument, "last 16 queries");
  EXPECT_STATUS(SnapKvScores(c, 8, 4), absl::StatusCode::kInvalidArgument, "kernel");
}

TEST(SnapKvPolicyTest, PerHeadTopKWithTheWindowProtected) {
  const ModelShape shape = Shape(2, 4, 2, 8, 16);
  PolicyOptions options;
  options.snapkv_window = 16;
  auto policy = CreatePolicy("snapkv", options, shape);
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_TRUE((*policy)->needs().keys);
  EXPECT_EQ((*policy)->needs().last_queries, 16);
  EXPECT_EQ((*policy)->default_recent(), 0);  // the window is protected by Plan
  const PrefillCapture c = RandomCapture(shape, 80, 16, false, 6);
  EvictionSpec spec;
  spec.policy = "snapkv";
  spec.budget_tokens = 30;
  spec.recent_tokens = 0;  // the observation window stays protected anyway (capped at budget / 2 = 15)
  auto budget = ResolveBudget(spec, 80, (*policy)->default_sink(), (*policy)->default_recent());
  ASSERT_TRUE(budget.ok());
  auto grid = SnapKvScores(c, 15, 5);  // the window shrinks to budget / 2
  ASSERT_TRUE(grid.ok());
  std::vector<uint8_t> mask(80, 0);
  for (int32_t p = 65; p < 80; ++p) mask[p] = 1;

  auto plan = (*policy)->Plan(c, *budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const KeepPlan want = SelectPerHeadTopK(*grid, 30, mask);
  for (size_t i = 0; i < want.heads.size(); ++i) {
    EXPECT_EQ(plan->heads[i].positions, want.heads[i].positions);
    EXPECT_EQ(plan->heads[i].positions.size(), 30u);
    for (int32_t p = 65; p < 80; ++p) {
      EXPECT_TRUE(std::binary_search(plan->heads[i].positions.begin(), plan->heads[i].positions.end(), p));
    }
  }
  auto adaptive = (*policy)->Plan(c, *budget, HeadBudget::kAdaptive);
  ASSERT_TRUE(adaptive.ok());
  const KeepPlan want_ada = SelectAdaKv(*grid, 30, mask, 0.2f);
  for (size_t i = 0; i < want.heads.size(); ++i) EXPECT_EQ(adaptive->heads[i].positions, want_ada.heads[i].positions);
  EXPECT_EQ(adaptive->KeptEntries(), 30 * 4);
}

TEST(SnapKvPolicyTest, ShortPromptsEvictWithAWindowOfHalfTheBudget) {
  const ModelShape shape = Shape(1, 2, 1, 4, 8);
  auto policy = CreatePolicy("snapkv", {}, shape);  // window 64
  ASSERT_TRUE(policy.ok());
  const PrefillCapture c = RandomCapture(shape, 64, 64, false, 7);
  EvictionSpec spec;
  spec.policy = "snapkv";
  spec.keep_ratio = 0.1f;
  auto budget = ResolveBudget(spec, 64, (*policy)->default_sink(), (*policy)->default_recent());
  ASSERT_TRUE(budget.ok());
  auto plan = (*policy)->Plan(c, *budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(plan.ok());
  // keep round(6.4) = 6 rows: a 3-query observation window plus the 3 best-scored rows.
  EXPECT_EQ(plan->KeptEntries(), 6);
  EXPECT_EQ(plan->heads[0].positions.back(), 63);
  // A prompt no longer than the window keeps everything.
  spec.keep_ratio = 1.0f;
  auto all = ResolveBudget(spec, 64, (*policy)->default_sink(), (*policy)->default_recent());
  ASSERT_TRUE(all.ok());
  auto plan_all = (*policy)->Plan(c, *all, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(plan_all.ok());
  EXPECT_EQ(plan_all->KeptEntries(), 64);
}

}  // namespace
}  // namespace kvgate::gates
