#include "router/request_validation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <set>

#include "router/bad_requests.h"
#include "tests/testing/paths.h"

namespace kvgate::router {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using kvgate::v1::CompressionSpec;
using kvgate::v1::GenerateRequest;

// Our bundled kvgate-tiny: context 4096 tokens, vocabulary 4096, BOS 1.
struct TinyModel {
  engine::ModelConfig config;
  std::unique_ptr<engine::Tokenizer> tokenizer;
  kvgate::v1::ModelInfo info;
};

// Without the checkpoint nothing here can run: stop at once, saying why.
void CheckOk(const absl::Status& status) {
  if (status.ok()) return;
  std::cerr << "cannot load " << kvgate::testing::KvgateTinyDir() << ": " << status << "\n";
  std::abort();
}

const TinyModel& Model() {
  static const TinyModel* const model = [] {
    auto* m = new TinyModel;
    const std::string dir = kvgate::testing::KvgateTinyDir();
    auto config = engine::LoadModelConfig(dir);
    CheckOk(config.status());
    m->config = *config;
    auto tokenizer = engine::Tokenizer::FromFile((std::filesystem::path(dir) / "tokenizer.json").string());
    CheckOk(tokenizer.status());
    m->tokenizer = std::move(*tokenizer);
    m->info.set_vocab_size(m->config.vocab_size);
    m->info.set_max_context_tokens(m->config.max_context_tokens);
    return m;
  }();
  return *model;
}

absl::StatusOr<ValidatedRequest> Validate(const GenerateRequest& request, const ValidationLimits& limits = {}) {
  return ValidateGenerateRequest(request, *Model().tokenizer, Model().config, limits);
}

GenerateRequest TokenPrompt(std::vector<int32_t> ids) {
  GenerateRequest r;
  for (int32_t id : ids) r.mutable_tokens()->add_ids(id);
  return r;
}

TEST(TinyModelTest, HasTheShapeTheTableAssumes) {
  EXPECT_EQ(Model().config.max_context_tokens, 4096);
  EXPECT_EQ(Model().config.vocab_size, 4096);
}

// --- the table of bad requests -----------------------------------------------------------

class BadRequestTest : public ::testing::TestWithParam<BadRequestCase> {};

TEST_P(BadRequestTest, IsRejectedNamingTheField) {
  const BadRequestCase& c = GetParam();
  const GenerateRequest request = c.build(Model().info);
  const absl::StatusOr<ValidatedRequest> result = Validate(request);
  ASSERT_FALSE(result.ok()) << "accepted: " << request.ShortDebugString();
  EXPECT_EQ(result.status().code(), c.code) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr(c.field));
}

// What an integration test may assume: a case marked survives_wire parses back equal
// after serialization; the others fail protobuf's own UTF-8 check while parsing.
TEST_P(BadRequestTest, SurvivesTheWireAsMarked) {
  const BadRequestCase& c = GetParam();
  const GenerateRequest request = c.build(Model().info);
  GenerateRequest parsed;
  const bool ok = parsed.ParseFromString(request.SerializeAsString());
  EXPECT_EQ(ok, c.survives_wire);
  if (ok) {
    EXPECT_EQ(parsed.SerializeAsString(), request.SerializeAsString());
  }
}

INSTANTIATE_TEST_SUITE_P(Table, BadRequestTest, ::testing::ValuesIn(BadGenerateRequests()),
                         [](const ::testing::TestParamInfo<BadRequestCase>& info) { return info.param.name; });

TEST(BadRequestTableTest, IsLargeAndNamesAreUnique) {
  const std::vector<BadRequestCase> cases = BadGenerateRequests();
  EXPECT_GE(cases.size(), 35u);
  std::set<std::string> names;
  for (const BadRequestCase& c : cases) EXPECT_TRUE(names.insert(c.name).second) << c.name;
}

// --- messages worth reading in full ------------------------------------------------------

TEST(ValidateGenerateRequestTest, UnknownPolicyListsTheValidNames) {
  GenerateRequest r = TokenPrompt({1, 2, 3});
  r.mutable_compression()->set_policy("h2o");
  const auto result = Validate(r);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().message(),
            "compression.policy: unknown policy 'h2o' (valid: full, streaming_llm, snapkv, sage_kv, kvzip, "
            "fast_kvzip, attention_gate)");
}

TEST(ValidateGenerateRequestTest, PolicyNotEnabledOnThisServer) {
  ValidationLimits limits;
  limits.policies = {"full", "snapkv"};
  GenerateRequest r = TokenPrompt({1, 2, 3});
  r.mutable_compression()->set_policy("fast_kvzip");
  const auto result = Validate(r, limits);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(),
            "compression.policy: policy 'fast_kvzip' is not enabled on this server (valid: full, snapkv)");
}

TEST(ValidateGenerateRequestTest, PromptOverTheServersLimitNamesTheFlag) {
  ValidationLimits limits;
  limits.max_prompt_tokens = 8;
  EXPECT_TRUE(Validate(TokenPrompt(std::vector<int32_t>(8, 1)), limits).ok());
  const auto result = Validate(TokenPrompt(std::vector<int32_t>(9, 1)), limits);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(),
            "tokens.ids: the prompt has 9 tokens; this server accepts at most 8 (--max-prompt-tokens)");
}

TEST(ValidateGenerateRequestTest, MessagesQuoteTheBadValue) {
  GenerateRequest r = TokenPrompt({1, 2});
  r.mutable_sampling()->set_top_p(1.5f);
  EXPECT_EQ(Validate(r).status().message(), "sampling.top_p must be in (0, 1], got 1.5");

  r = TokenPrompt({1, 4096});
  EXPECT_EQ(Validate(r).status().message(), "tokens.ids[1] = 4096 is outside the vocabulary [0, 4096)");

  r = TokenPrompt(std::vector<int32_t>(4084, 1));
  r.mutable_sampling()->set_max_tokens(20);
  EXPECT_EQ(Validate(r).status().message(),
            "sampling.max_tokens: the prompt (4084 tokens) plus max_tokens (20) exceeds the model context of 4096 "
            "tokens (at most 12 can be generated)");

  r.Clear();
  r.set_text("ok \xff");
  EXPECT_EQ(Validate(r).status().message(), "text is not valid UTF-8 (first bad byte at offset 3)");

  r = TokenPrompt({1});
  r.set_request_id("a\tb");
  EXPECT_EQ(Validate(r).status().message(), "request_id must be printable ASCII, got byte 0x09 at offset 1");
}

TEST(ValidateGenerateRequestTest, MaxTokensAboveTheServerLimit) {
  ValidationLimits limits;
  limits.max_tokens = 8;
  GenerateRequest r = TokenPrompt({1, 2, 3});
  r.mutable_sampling()->set_max_tokens(9);
  const auto result = Validate(r, limits);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(), "sampling.max_tokens must be at most 8 on this server, got 9");
  r.mutable_sampling()->set_max_tokens(8);
  EXPECT_TRUE(Validate(r, limits).ok());
}

// --- good requests -----------------------------------------------------------------------

TEST(ValidateGenerateRequestTest, TextPromptIsTokenizedWithSpecialTokens) {
  GenerateRequest r;
  r.set_text("Once upon a time");
  r.set_request_id("req-1");
  const auto result = Validate(r);
  ASSERT_TRUE(result.ok()) << result.status();
  const auto expected = Model().tokenizer->Encode("Once upon a time", /*add_special_tokens=*/true);
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(result->prompt, *expected);
  EXPECT_EQ(result->prompt.front(), Model().config.bos_token_id);  // BOS, as `kvgate tokenize`
  EXPECT_TRUE(result->prompt_from_text);
  EXPECT_EQ(result->request_id, "req-1");
}

TEST(ValidateGenerateRequestTest, UnsetFieldsTakeTheDefaults) {
  const auto result = Validate(TokenPrompt({1, 5, 9}));
  ASSERT_TRUE(result.ok()) << result.status();
  const ValidatedRequest& v = *result;
  EXPECT_THAT(v.prompt, ElementsAre(1, 5, 9));  // ids are used as given: no BOS added
  EXPECT_FALSE(v.prompt_from_text);
  EXPECT_EQ(v.request_id, "");
  EXPECT_EQ(v.options.max_tokens, 16);
  EXPECT_EQ(v.options.sampling.temperature, 0.0f);
  EXPECT_EQ(v.options.sampling.top_p, 1.0f);
  EXPECT_EQ(v.options.sampling.top_k, 0);
  EXPECT_EQ(v.options.sampling.min_p, 0.0f);
  EXPECT_FALSE(v.seed_given);
  EXPECT_TRUE(v.options.stop.empty());
  EXPECT_TRUE(v.options.stop_token_ids.empty());
  EXPECT_FALSE(v.options.ignore_eos);
  EXPECT_EQ(v.eviction.policy, "full");
  EXPECT_EQ(v.eviction.keep_ratio, 0.0f);
  EXPECT_EQ(v.eviction.budget_tokens, 0);
  EXPECT_FALSE(v.eviction.sink_tokens.has_value());
  EXPECT_FALSE(v.eviction.recent_tokens.has_value());
  EXPECT_EQ(v.eviction.head_budget, gates::HeadBudget::kPolicyDefault);
  EXPECT_FALSE(v.skip_text);
}

TEST(ValidateGenerateRequestTest, UnsetSeedsAreDrawnAtRandom) {
  std::set<uint64_t> seeds;
  for (int i = 0; i < 8; ++i) {
    const auto result = Validate(TokenPrompt({1}));
    ASSERT_TRUE(result.ok());
    EXPECT_FALSE(result->seed_given);
    seeds.insert(result->options.sampling.seed);
  }
  EXPECT_GT(seeds.size(), 1u);
}

TEST(ValidateGenerateRequestTest, EveryFieldMaps) {
  GenerateRequest r = TokenPrompt({1, 2, 3, 4, 5, 6, 7, 8});
  r.set_request_id(std::string(256, 'r'));  // the longest allowed
  r.set_skip_text(true);
  auto* s = r.mutable_sampling();
  s->set_max_tokens(32);
  s->set_temperature(0.7f);
  s->set_top_p(0.9f);
  s->set_top_k(40);
  s->set_min_p(0.05f);
  s->set_seed(0);  // set, even if zero
  s->add_stop("The end");
  s->add_stop("\xc3\xa9t\xc3\xa9");  // UTF-8
  s->add_stop_token_ids(2);
  s->add_stop_token_ids(2047);
  s->set_ignore_eos(true);
  auto* c = r.mutable_compression();
  c->set_policy("snapkv");
  c->set_budget_tokens(4);
  c->set_sink_tokens(1);
  c->set_recent_tokens(2);
  c->set_head_budget(CompressionSpec::ADAPTIVE);
  auto* range = c->add_protected_ranges();
  range->set_begin(0);
  range->set_end(8);  // the whole prompt

  const auto result = Validate(r);
  ASSERT_TRUE(result.ok()) << result.status();
  const ValidatedRequest& v = *result;
  EXPECT_EQ(v.request_id, std::string(256, 'r'));
  EXPECT_TRUE(v.skip_text);
  EXPECT_EQ(v.options.max_tokens, 32);
  EXPECT_EQ(v.options.sampling.temperature, 0.7f);
  EXPECT_EQ(v.options.sampling.top_p, 0.9f);
  EXPECT_EQ(v.options.sampling.top_k, 40);
  EXPECT_EQ(v.options.sampling.min_p, 0.05f);
  EXPECT_TRUE(v.seed_given);
  EXPECT_EQ(v.options.sampling.seed, 0u);
  EXPECT_THAT(v.options.stop, ElementsAre("The end", "\xc3\xa9t\xc3\xa9"));
  EXPECT_THAT(v.options.stop_token_ids, ElementsAre(2, 2047));
  EXPECT_TRUE(v.options.ignore_eos);
  EXPECT_EQ(v.eviction.policy, "snapkv");
  EXPECT_EQ(v.eviction.budget_tokens, 4);
  EXPECT_EQ(v.eviction.sink_tokens, 1);
  EXPECT_EQ(v.eviction.recent_tokens, 2);
  EXPECT_EQ(v.eviction.head_budget, gates::HeadBudget::kAdaptive);
  ASSERT_EQ(v.eviction.protected_ranges.size(), 1u);
  EXPECT_EQ(v.eviction.protected_ranges[0].begin, 0);
  EXPECT_EQ(v.eviction.protected_ranges[0].end, 8);
}

// Values at the edge of their range, and the "0 means unset" ones, are accepted.
TEST(ValidateGenerateRequestTest, EdgeValuesAreAccepted) {
  struct Case {
    std::string name;
    std::function<void(GenerateRequest*)> edit;
  };
  const std::vector<Case> cases = {
      {"top_p 0 (unset)", [](GenerateRequest* r) { r->mutable_sampling()->set_top_p(0.0f); }},
      {"top_p 1", [](GenerateRequest* r) { r->mutable_sampling()->set_top_p(1.0f); }},
      {"top_k -1", [](GenerateRequest* r) { r->mutable_sampling()->set_top_k(-1); }},
      {"min_p 1", [](GenerateRequest* r) { r->mutable_sampling()->set_min_p(1.0f); }},
      {"temperature 100", [](GenerateRequest* r) { r->mutable_sampling()->set_temperature(100.0f); }},
      {"keep_ratio 0 (unset)", [](GenerateRequest* r) { r->mutable_compression()->set_keep_ratio(0.0f); }},
      {"keep_ratio 1", [](GenerateRequest* r) { r->mutable_compression()->set_keep_ratio(1.0f); }},
      {"sink and recent 0", [](GenerateRequest* r) {
         r->mutable_compression()->set_sink_tokens(0);
         r->mutable_compression()->set_recent_tokens(0);
       }},
      {"sink beyond the prompt", [](GenerateRequest* r) { r->mutable_compression()->set_sink_tokens(1000); }},
      {"16 stop strings of 256 bytes", [](GenerateRequest* r) {
         for (int i = 0; i < 16; ++i) r->mutable_sampling()->add_stop(std::string(256, 'a' + i));
       }},
      {"request_id of printable ASCII", [](GenerateRequest* r) { r->set_request_id(" !~azAZ09-_:/"); }},
      {"max_tokens fills the context", [](GenerateRequest* r) { r->mutable_sampling()->set_max_tokens(4096 - 4); }},
      {"every policy by name", [](GenerateRequest* r) { r->mutable_compression()->set_policy("attention_gate"); }},
  };
  for (const Case& c : cases) {
    GenerateRequest r = TokenPrompt({1, 5, 9, 12});
    c.edit(&r);
    const auto result = Validate(r);
    EXPECT_TRUE(result.ok()) << c.name << ": " << result.status();
  }
  for (const std::string& policy : gates::PolicyNames()) {
    GenerateRequest r = TokenPrompt({1, 5});
    r.mutable_compression()->set_policy(policy);
    const auto result = Validate(r);
    ASSERT_TRUE(result.ok()) << policy << ": " << result.status();
    EXPECT_EQ(result->eviction.policy, policy);
  }
}

TEST(ValidateGenerateRequestTest, TopPZeroMeansOne) {
  GenerateRequest r = TokenPrompt({1});
  r.mutable_sampling()->set_top_p(0.0f);
  const auto result = Validate(r);
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->options.sampling.top_p, 1.0f);
}

TEST(ValidateGenerateRequestTest, EmptyPolicyTakesTheServerDefault) {
  ValidationLimits limits;
  limits.default_policy = "streaming_llm";
  GenerateRequest r = TokenPrompt({1, 2});
  r.mutable_compression()->set_keep_ratio(0.5f);
  const auto result = Validate(r, limits);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->eviction.policy, "streaming_llm");
  EXPECT_EQ(result->eviction.keep_ratio, 0.5f);
}

TEST(ValidateGenerateRequestTest, DefaultMaxTokensShrinksToTheRoomLeft) {
  // 4092 prompt tokens leave 4 in the 4096-token context; the default 16 becomes 4.
  const auto result = Validate(TokenPrompt(std::vector<int32_t>(4092, 1)));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->options.max_tokens, 4);
  // 4095 leave one.
  const auto last = Validate(TokenPrompt(std::vector<int32_t>(4095, 1)));
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_EQ(last->options.max_tokens, 1);
}

TEST(ValidateGenerateRequestTest, TheResultPassesTheEngineChecks) {
  GenerateRequest r;
  r.set_text("Lily saw a big red ball.");
  r.mutable_sampling()->set_temperature(0.8f);
  r.mutable_sampling()->set_top_p(0.0f);
  const auto result = Validate(r);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(engine::ValidateSamplingOptions(result->options.sampling).ok());
  EXPECT_TRUE(gates::ValidateEvictionSpec(result->eviction).ok());
  EXPECT_THAT(result->prompt, ElementsAreArray(*Model().tokenizer->Encode("Lily saw a big red ball.")));
}

}  // namespace
}  // namespace kvgate::router
