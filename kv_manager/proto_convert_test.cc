#include "kv_manager/proto_convert.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace kvgate::kv {
namespace {

using ::testing::ElementsAre;
using kvgate::v1::CompressionSpec;

void ExpectEqual(const engine::GenerateOptions& a, const engine::GenerateOptions& b) {
  EXPECT_EQ(a.max_tokens, b.max_tokens);
  EXPECT_EQ(a.sampling.temperature, b.sampling.temperature);
  EXPECT_EQ(a.sampling.top_k, b.sampling.top_k);
  EXPECT_EQ(a.sampling.top_p, b.sampling.top_p);
  EXPECT_EQ(a.sampling.min_p, b.sampling.min_p);
  EXPECT_EQ(a.sampling.seed, b.sampling.seed);
  EXPECT_EQ(a.stop, b.stop);
  EXPECT_EQ(a.stop_token_ids, b.stop_token_ids);
  EXPECT_EQ(a.ignore_eos, b.ignore_eos);
}

void ExpectEqual(const gates::EvictionSpec& a, const gates::EvictionSpec& b) {
  EXPECT_EQ(a.policy, b.policy);
  EXPECT_EQ(a.keep_ratio, b.keep_ratio);
  EXPECT_EQ(a.budget_tokens, b.budget_tokens);
  EXPECT_EQ(a.sink_tokens, b.sink_tokens);
  EXPECT_EQ(a.recent_tokens, b.recent_tokens);
  EXPECT_EQ(a.head_budget, b.head_budget);
  ASSERT_EQ(a.protected_ranges.size(), b.protected_ranges.size());
  for (size_t i = 0; i < a.protected_ranges.size(); ++i) {
    EXPECT_EQ(a.protected_ranges[i].begin, b.protected_ranges[i].begin) << i;
    EXPECT_EQ(a.protected_ranges[i].end, b.protected_ranges[i].end) << i;
  }
}

std::vector<engine::GenerateOptions> SomeOptions() {
  std::vector<engine::GenerateOptions> out(3);
  // out[0]: the defaults.
  out[1].max_tokens = 200;
  out[1].sampling = {.temperature = 0.7f, .top_k = 40, .top_p = 0.9f, .min_p = 0.05f,
                     .seed = 0xfedcba9876543210ull};
  out[1].stop = {"The end", "\n\n", "\xc3\xa9"};
  out[1].stop_token_ids = {2, 7};
  out[1].ignore_eos = true;
  out[2].max_tokens = 1;
  out[2].sampling.top_k = -1;
  out[2].sampling.seed = 1;
  return out;
}

std::vector<gates::EvictionSpec> SomeSpecs() {
  std::vector<gates::EvictionSpec> out(4);
  // out[0]: the defaults (policy full, nothing set).
  out[1].policy = "snapkv";
  out[1].keep_ratio = 0.25f;
  out[1].head_budget = gates::HeadBudget::kAdaptive;
  out[2].policy = "streaming_llm";
  out[2].budget_tokens = 64;
  out[2].sink_tokens = 4;
  out[2].recent_tokens = 0;  // set to zero differs from unset
  out[2].head_budget = gates::HeadBudget::kUniform;
  out[2].protected_ranges = {{0, 10}, {20, 25}};
  out[3].policy = "";  // "the server default" survives the trip
  return out;
}

TEST(ProtoConvertTest, GenerateOptionsRoundTrip) {
  for (const engine::GenerateOptions& options : SomeOptions()) {
    const kvgate::v1::SamplingParams params = ToProto(options);
    EXPECT_TRUE(params.has_seed());
    ExpectEqual(FromProto(params), options);
  }
}

TEST(ProtoConvertTest, SamplingParamsRoundTrip) {
  for (const engine::GenerateOptions& options : SomeOptions()) {
    const kvgate::v1::SamplingParams params = ToProto(options);
    EXPECT_EQ(ToProto(FromProto(params)).SerializeAsString(), params.SerializeAsString())
        << params.ShortDebugString();
  }
}

TEST(ProtoConvertTest, SamplingFieldsLandWhereTheyBelong) {
  const engine::GenerateOptions options = SomeOptions()[1];
  const kvgate::v1::SamplingParams p = ToProto(options);
  EXPECT_EQ(p.max_tokens(), 200);
  EXPECT_EQ(p.temperature(), 0.7f);
  EXPECT_EQ(p.top_k(), 40);
  EXPECT_EQ(p.top_p(), 0.9f);
  EXPECT_EQ(p.min_p(), 0.05f);
  EXPECT_EQ(p.seed(), 0xfedcba9876543210ull);
  EXPECT_THAT(p.stop(), ElementsAre("The end", "\n\n", "\xc3\xa9"));
  EXPECT_THAT(p.stop_token_ids(), ElementsAre(2, 7));
  EXPECT_TRUE(p.ignore_eos());
}

TEST(ProtoConvertTest, UnsetSamplingValues) {
  const engine::GenerateOptions options = FromProto(kvgate::v1::SamplingParams());
  EXPECT_EQ(options.max_tokens, 0);  // the server default is the validator's business
  EXPECT_EQ(options.sampling.top_p, 1.0f);  // the contract: 0 means 1
  EXPECT_EQ(options.sampling.seed, 0u);
  EXPECT_EQ(options.sampling.temperature, 0.0f);
}

TEST(ProtoConvertTest, EvictionSpecRoundTripsThroughCompressionSpec) {
  for (const gates::EvictionSpec& spec : SomeSpecs()) {
    const CompressionSpec proto = ToProto(spec);
    ExpectEqual(FromProto(proto), spec);
    EXPECT_EQ(ToProto(FromProto(proto)).SerializeAsString(), proto.SerializeAsString());
  }
}

TEST(ProtoConvertTest, EvictionSpecRoundTripsThroughEvictionPlan) {
  for (const gates::EvictionSpec& spec : SomeSpecs()) {
    const kvgate::v1::EvictionPlan plan = ToPlanProto(spec);
    ExpectEqual(FromProto(plan), spec);
    EXPECT_EQ(ToPlanProto(FromProto(plan)).SerializeAsString(), plan.SerializeAsString());
  }
}

TEST(ProtoConvertTest, CompressionFieldsLandWhereTheyBelong) {
  const CompressionSpec c = ToProto(SomeSpecs()[2]);
  EXPECT_EQ(c.policy(), "streaming_llm");
  EXPECT_EQ(c.keep_ratio(), 0.0f);
  EXPECT_EQ(c.budget_tokens(), 64);
  ASSERT_TRUE(c.has_sink_tokens());
  EXPECT_EQ(c.sink_tokens(), 4);
  ASSERT_TRUE(c.has_recent_tokens());
  EXPECT_EQ(c.recent_tokens(), 0);
  EXPECT_EQ(c.head_budget(), CompressionSpec::UNIFORM);
  ASSERT_EQ(c.protected_ranges_size(), 2);
  EXPECT_EQ(c.protected_ranges(1).begin(), 20);
  EXPECT_EQ(c.protected_ranges(1).end(), 25);
  const CompressionSpec unset = ToProto(gates::EvictionSpec{});
  EXPECT_FALSE(unset.has_sink_tokens());
  EXPECT_FALSE(unset.has_recent_tokens());
}

TEST(ProtoConvertTest, HeadBudgetEnum) {
  for (gates::HeadBudget h :
       {gates::HeadBudget::kPolicyDefault, gates::HeadBudget::kUniform, gates::HeadBudget::kAdaptive}) {
    EXPECT_EQ(FromProto(ToProto(h)), h);
  }
  EXPECT_EQ(FromProto(static_cast<CompressionSpec::HeadBudget>(42)), gates::HeadBudget::kPolicyDefault);
}

}  // namespace
}  // namespace kvgate::kv
