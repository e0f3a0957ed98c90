// Round trips of the CompressionSpec / EvictionPlan <-> gates::EvictionSpec mapping.
#include "kv_manager/plan_proto.h"

#include <gtest/gtest.h>

namespace kvgate::kv {
namespace {

TEST(PlanProtoTest, CompressionSpecMapsFieldByField) {
  v1::CompressionSpec proto;
  proto.set_policy("snapkv");
  proto.set_keep_ratio(0.25f);
  proto.set_sink_tokens(3);
  proto.set_head_budget(v1::CompressionSpec::ADAPTIVE);
  v1::TokenRange* r = proto.add_protected_ranges();
  r->set_begin(2);
  r->set_end(9);
  absl::StatusOr<gates::EvictionSpec> spec = EvictionSpecFromProto(proto);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->policy, "snapkv");
  EXPECT_EQ(spec->keep_ratio, 0.25f);
  EXPECT_EQ(spec->budget_tokens, 0);
  ASSERT_TRUE(spec->sink_tokens.has_value());
  EXPECT_EQ(*spec->sink_tokens, 3);
  EXPECT_FALSE(spec->recent_tokens.has_value());  // unset stays unset: the policy default
  EXPECT_EQ(spec->head_budget, gates::HeadBudget::kAdaptive);
  ASSERT_EQ(spec->protected_ranges.size(), 1u);
  EXPECT_EQ(spec->protected_ranges[0].begin, 2);
  EXPECT_EQ(spec->protected_ranges[0].end, 9);
}

TEST(PlanProtoTest, PlanRoundTrips) {
  gates::EvictionSpec spec;
  spec.policy = "sage_kv";
  spec.budget_tokens = 128;
  spec.recent_tokens = 0;  // explicit 0 differs from unset
  spec.head_budget = gates::HeadBudget::kUniform;
  spec.protected_ranges = {{0, 4}, {10, 20}};
  const v1::EvictionPlan plan = EvictionPlanToProto(spec);
  EXPECT_FALSE(plan.has_sink_tokens());
  EXPECT_TRUE(plan.has_recent_tokens());
  absl::StatusOr<gates::EvictionSpec> back = EvictionSpecFromPlan(plan);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->policy, spec.policy);
  EXPECT_EQ(back->keep_ratio, spec.keep_ratio);
  EXPECT_EQ(back->budget_tokens, spec.budget_tokens);
  EXPECT_EQ(back->sink_tokens, spec.sink_tokens);
  EXPECT_EQ(back->recent_tokens, spec.recent_tokens);
  EXPECT_EQ(back->head_budget, spec.head_budget);
  ASSERT_EQ(back->protected_ranges.size(), 2u);
  EXPECT_EQ(back->protected_ranges[1].begin, 10);
  EXPECT_EQ(back->protected_ranges[1].end, 20);
  for (gates::HeadBudget hb : {gates::HeadBudget::kPolicyDefault, gates::HeadBudget::kUniform,
                               gates::HeadBudget::kAdaptive}) {
    spec.head_budget = hb;
    EXPECT_EQ(EvictionSpecFromPlan(EvictionPlanToProto(spec))->head_budget, hb);
  }
}

TEST(PlanProtoTest, UnknownHeadBudgetNamesTheField) {
  v1::CompressionSpec proto;
  proto.set_head_budget(static_cast<v1::CompressionSpec::HeadBudget>(7));
  absl::StatusOr<gates::EvictionSpec> spec = EvictionSpecFromProto(proto);
  ASSERT_FALSE(spec.ok());
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(spec.status().message().find("head_budget"), std::string::npos) << spec.status();
}

}  // namespace
}  // namespace kvgate::kv
