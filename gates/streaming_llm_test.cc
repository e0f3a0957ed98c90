#include "gates/streaming_llm.h"

#include <numeric>

#include "gates/internal/test_util.h"
#include "gates/policy.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

std::vector<int32_t> Range(int32_t begin, int32_t end) {
  std::vector<int32_t> v(std::max(0, end - begin));
  std::iota(v.begin(), v.end(), begin);
  return v;
}

std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

ResolvedBudget Resolve(int32_t n, int32_t budget, std::optional<int32_t> sink = {},
                       std::optional<int32_t> recent = {}, std::vector<TokenRange> ranges = {}) {
  EvictionSpec spec;
  spec.policy = "streaming_llm";
  spec.budget_tokens = budget;
  spec.sink_tokens = sink;
  spec.recent_tokens = recent;
  spec.protected_ranges = std::move(ranges);
  auto r = ResolveBudget(spec, n, kStreamingLlmDefaultSink, 0);
  EXPECT_TRUE(r.ok()) << r.status();
  return *r;
}

TEST(StreamingLlmTest, SinkPlusMostRecentExactSets) {
  // keep k, default sink 4: [0, 4) U [n - (k - 4), n).
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 8)), Concat(Range(0, 4), Range(16, 20)));
  EXPECT_EQ(StreamingLlmPositions(Resolve(100, 10)), Concat(Range(0, 4), Range(94, 100)));
  EXPECT_EQ(StreamingLlmPositions(Resolve(100, 5)), Concat(Range(0, 4), Range(99, 100)));
  // Recent window inside the budget changes nothing.
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 8, {}, 2)), Concat(Range(0, 4), Range(16, 20)));
  // Explicit sink.
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 8, 1)), Concat(Range(0, 1), Range(13, 20)));
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 8, 0)), Range(12, 20));
}

TEST(StreamingLlmTest, EdgeBudgets) {
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 1)), Range(0, 4));  // budget below the sink
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 4)), Range(0, 4));
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 20)), Range(0, 20));
  EXPECT_EQ(StreamingLlmPositions(Resolve(3, 2)), Range(0, 3));  // sink clipped to n = 3
  // Protections above the budget: exactly the protected rows.
  EXPECT_EQ(StreamingLlmPositions(Resolve(20, 5, 4, 3)), Concat(Range(0, 4), Range(17, 20)));
}

TEST(StreamingLlmTest, ProtectedRangeCountsTowardTheBudget) {
  // Range [8, 10) protected: 4 sink + 2 range + (10 - 6) most recent.
  EXPECT_EQ(StreamingLlmPositions(Resolve(30, 10, {}, {}, {{8, 10}})),
            Concat(Concat(Range(0, 4), Range(8, 10)), Range(26, 30)));
}

TEST(StreamingLlmTest, PolicyKeepsTheSameRowsInEveryHead) {
  const ModelShape shape = testing::Shape(3, 4, 2, 8, 16);
  auto policy = CreatePolicy("streaming_llm", {}, shape);
  ASSERT_TRUE(policy.ok()) << policy.status();
  EXPECT_EQ((*policy)->default_sink(), 4);
  EXPECT_EQ((*policy)->default_recent(), 0);
  EXPECT_FALSE((*policy)->needs().keys);
  EvictionSpec spec;
  spec.policy = "streaming_llm";
  spec.keep_ratio = 0.25f;
  auto budget = ResolveBudget(spec, 40, (*policy)->default_sink(), (*policy)->default_recent());
  ASSERT_TRUE(budget.ok());
  PrefillCapture capture;  // needs nothing
  capture.shape = shape;
  capture.prompt_tokens = 40;
  auto plan = (*policy)->Plan(capture, *budget, HeadBudget::kPolicyDefault);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->heads.size(), 6u);
  for (const HeadKeep& h : plan->heads) EXPECT_EQ(h.positions, Concat(Range(0, 4), Range(34, 40)));
  EXPECT_EQ(plan->KeptEntries(), 60);
  EXPECT_STATUS((*policy)->Plan(capture, *budget, HeadBudget::kAdaptive), absl::StatusCode::kInvalidArgument,
                "ADAPTIVE");
}

}  // namespace
}  // namespace kvgate::gates
