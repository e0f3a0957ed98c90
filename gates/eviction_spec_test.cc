#include "gates/eviction_spec.h"

#include <cmath>
#include <limits>
#include <optional>

#include "gates/internal/test_util.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

using absl::StatusCode;

TEST(PolicyNamesTest, ExactListInDocumentationOrder) {
  EXPECT_EQ(PolicyNames(), (std::vector<std::string>{"full", "streaming_llm", "snapkv", "sage_kv", "kvzip",
                                                     "fast_kvzip", "attention_gate"}));
}

TEST(ValidateEvictionSpecTest, AcceptsEveryPolicyAndValidBudgets) {
  for (const std::string& name : PolicyNames()) {
    EvictionSpec spec;
    spec.policy = name;
    EXPECT_TRUE(ValidateEvictionSpec(spec).ok()) << name;
  }
  EvictionSpec spec;
  spec.policy = "snapkv";
  for (float r : {1e-6f, 0.3f, 1.0f}) {
    spec.keep_ratio = r;
    EXPECT_TRUE(ValidateEvictionSpec(spec).ok()) << r;
  }
  spec.keep_ratio = 0.0f;
  spec.budget_tokens = 128;
  spec.sink_tokens = 0;
  spec.recent_tokens = 0;
  spec.protected_ranges = {{0, 1}, {5, 9}};
  spec.head_budget = HeadBudget::kAdaptive;
  EXPECT_TRUE(ValidateEvictionSpec(spec).ok());
}

struct BadSpecCase {
  std::string name;
  EvictionSpec spec;
  std::string field;  // the message must name it
};

std::vector<BadSpecCase> BadSpecs() {
  std::vector<BadSpecCase> cases;
  auto add = [&](std::string name, auto edit, std::string field) {
    EvictionSpec s;
    s.policy = "snapkv";
    edit(s);
    cases.push_back({std::move(name), s, std::move(field)});
  };
  add("unknown policy", [](EvictionSpec& s) { s.policy = "h2o"; }, "policy");
  add("empty policy", [](EvictionSpec& s) { s.policy = ""; }, "policy");
  add("NaN ratio", [](EvictionSpec& s) { s.keep_ratio = std::nanf(""); }, "keep_ratio");
  add("negative ratio", [](EvictionSpec& s) { s.keep_ratio = -0.25f; }, "keep_ratio");
  add("ratio above 1", [](EvictionSpec& s) { s.keep_ratio = 1.0001f; }, "keep_ratio");
  add("infinite ratio", [](EvictionSpec& s) { s.keep_ratio = std::numeric_limits<float>::infinity(); }, "keep_ratio");
  add("negative budget", [](EvictionSpec& s) { s.budget_tokens = -1; }, "budget_tokens");
  add("both set", [](EvictionSpec& s) { s.keep_ratio = 0.5f; s.budget_tokens = 10; }, "keep_ratio and budget_tokens");
  add("negative sink", [](EvictionSpec& s) { s.sink_tokens = -4; }, "sink_tokens");
  add("negative recent", [](EvictionSpec& s) { s.recent_tokens = -1; }, "recent_tokens");
  add("empty range", [](EvictionSpec& s) { s.protected_ranges = {{0, 2}, {3, 3}}; }, "protected_ranges[1]");
  add("reversed range", [](EvictionSpec& s) { s.protected_ranges = {{7, 2}}; }, "protected_ranges[0]");
  add("negative begin", [](EvictionSpec& s) { s.protected_ranges = {{-1, 2}}; }, "protected_ranges[0]");
  for (const char* p : {"sage_kv", "streaming_llm", "attention_gate"}) {
    add(std::string("adaptive ") + p, [p](EvictionSpec& s) { s.policy = p; s.head_budget = HeadBudget::kAdaptive; },
        "head_budget");
  }
  return cases;
}

TEST(ValidateEvictionSpecTest, RejectsBadSpecsNamingTheField) {
  for (const BadSpecCase& c : BadSpecs()) {
    SCOPED_TRACE(c.name);
    EXPECT_STATUS(ValidateEvictionSpec(c.spec), StatusCode::kInvalidArgument, c.field);
    // ResolveBudget validates first.
    EXPECT_STATUS(ResolveBudget(c.spec, 100, 4, 0), StatusCode::kInvalidArgument, c.field);
  }
}

TEST(FastKvzipPrefillWindowTest, Table) {
  EXPECT_EQ(FastKvzipPrefillWindow(-3), 0);
  EXPECT_EQ(FastKvzipPrefillWindow(0), 0);
  EXPECT_EQ(FastKvzipPrefillWindow(49), 0);      // int(0.98)
  EXPECT_EQ(FastKvzipPrefillWindow(100), 2);
  EXPECT_EQ(FastKvzipPrefillWindow(15999), 319);  // int(319.98)
  EXPECT_EQ(FastKvzipPrefillWindow(16000), 4096);
  EXPECT_EQ(FastKvzipPrefillWindow(1 << 20), 4096);
}

struct ResolveCase {
  std::string name;
  float keep_ratio = 0.0f;
  int32_t budget_tokens = 0;
  int32_t n = 0;
  int32_t sink_default = 0, recent_default = 0;
  std::optional<int32_t> sink, recent;
  int32_t want_keep = 0, want_sink = 0, want_recent = 0;
};

TEST(ResolveBudgetTest, Table) {
  const std::vector<ResolveCase> cases = {
      {"nothing set keeps all", 0.0f, 0, 100, 4, 0, {}, {}, 100, 4, 0},
      {"ratio", 0.25f, 0, 100, 4, 0, {}, {}, 25, 4, 0},
      {"ratio 0.3 (float 0.30000001)", 0.3f, 0, 10, 0, 0, {}, {}, 3, 0, 0},
      {"ratio rounds half away", 0.25f, 0, 10, 0, 0, {}, {}, 3, 0, 0},  // 2.5 -> 3
      {"ratio rounds down", 0.125f, 0, 10, 0, 0, {}, {}, 1, 0, 0},       // 1.25 -> 1
      {"ratio 1", 1.0f, 0, 77, 0, 0, {}, {}, 77, 0, 0},
      {"tiny ratio gives 0", 0.001f, 0, 100, 0, 0, {}, {}, 0, 0, 0},
      {"budget", 0.0f, 40, 100, 4, 0, {}, {}, 40, 4, 0},
      {"budget above n", 0.0f, 500, 100, 4, 0, {}, {}, 100, 4, 0},
      {"empty prompt", 0.5f, 0, 0, 4, 4, {}, {}, 0, 0, 0},
      {"explicit sink/recent win", 0.0f, 40, 100, 4, 8, 2, 3, 40, 2, 3},
      {"sink/recent clipped to n", 0.0f, 0, 5, 16, 16, {}, {}, 5, 5, 5},
      {"quarter of budget", 0.0f, 64, 200, kDefaultQuarterOfBudget, kDefaultQuarterOfBudget, {}, {}, 64, 16, 16},
      {"quarter of 10 = 2", 0.0f, 10, 200, kDefaultQuarterOfBudget, kDefaultQuarterOfBudget, {}, {}, 10, 2, 2},
      {"quarter, explicit recent", 0.0f, 64, 200, kDefaultQuarterOfBudget, kDefaultQuarterOfBudget, {}, 5, 64, 16, 5},
      {"fast kvzip window 2%", 0.5f, 0, 1000, 4, kDefaultFastKvzipWindow, {}, {}, 500, 4, 20},
      {"fast kvzip window shrunk to budget", 0.0f, 10, 1000, 4, kDefaultFastKvzipWindow, {}, {}, 10, 4, 10},
      {"fast kvzip window 4096", 0.25f, 0, 20000, 4, kDefaultFastKvzipWindow, {}, {}, 5000, 4, 4096},
      {"fast kvzip explicit recent", 0.25f, 0, 20000, 4, kDefaultFastKvzipWindow, {}, 128, 5000, 4, 128},
  };
  for (const ResolveCase& c : cases) {
    SCOPED_TRACE(c.name);
    EvictionSpec spec;
    spec.policy = "fast_kvzip";
    spec.keep_ratio = c.keep_ratio;
    spec.budget_tokens = c.budget_tokens;
    spec.sink_tokens = c.sink;
    spec.recent_tokens = c.recent;
    auto r = ResolveBudget(spec, c.n, c.sink_default, c.recent_default);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->prompt_tokens, c.n);
    EXPECT_EQ(r->keep_per_head, c.want_keep);
    EXPECT_EQ(r->sink_tokens, c.want_sink);
    EXPECT_EQ(r->recent_tokens, c.want_recent);
    ASSERT_EQ(r->protected_mask.size(), static_cast<size_t>(c.n));
    for (int32_t p = 0; p < c.n; ++p) {
      EXPECT_EQ(r->protected_mask[p], (p < c.want_sink || p >= c.n - c.want_recent) ? 1 : 0) << p;
    }
  }
}

TEST(ResolveBudgetTest, ProtectedRangesAreClippedAndMerged) {
  EvictionSpec spec;
  spec.policy = "snapkv";
  spec.budget_tokens = 6;
  spec.sink_tokens = 2;
  spec.recent_tokens = 1;
  spec.protected_ranges = {{4, 6}, {5, 7}, {8, 200}, {300, 400}};
  auto r = ResolveBudget(spec, 10, 0, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->protected_mask, (std::vector<uint8_t>{1, 1, 0, 0, 1, 1, 1, 0, 1, 1}));
  EXPECT_EQ(r->keep_per_head, 6);
}

TEST(ResolveBudgetTest, NegativePromptIsInvalid) {
  EvictionSpec spec;
  EXPECT_STATUS(ResolveBudget(spec, -1, 0, 0), StatusCode::kInvalidArgument, "prompt_tokens");
}

}  // namespace
}  // namespace kvgate::gates
