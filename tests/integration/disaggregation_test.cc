// Disaggregation changes nothing: greedy output through router -> prefill -> KV transfer
// -> decode equals the offline engine (engine::Generator with kv::CreatePolicyPlanner, as
// `kvgate generate --model` runs it) token for token, for every eviction policy, with
// prompts long enough that eviction matters, over both KV transports and with the roles
// in one process (`kvgate serve`) or in four.
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "gates/eviction_spec.h"
#include "tests/integration/harness.h"

namespace kvgate::integration {
namespace {

struct Layout {
  std::string name;
  bool split;
  std::string transport;
  friend void PrintTo(const Layout& layout, std::ostream* os) { *os << layout.name; }
};

class DisaggregationTest : public ::testing::TestWithParam<Layout> {};

TEST_P(DisaggregationTest, GreedyTokensEqualTheOfflineEngineForEveryPolicy) {
  const Layout& layout = GetParam();
  DeploymentOptions options;
  options.split = layout.split;
  options.transport = layout.transport;
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  OfflineReference& reference = Reference();

  // Two token-id prompts (about 120 and 260 tokens) and one text prompt (the router
  // tokenizes it, BOS included, as the offline path's Tokenizer::Encode does).
  std::vector<Case> prompts(3);
  prompts[0].prompt = StoryPrompt(reference.tokenizer(), 120, 0);
  prompts[1].prompt = StoryPrompt(reference.tokenizer(), 260, 2);
  prompts[2].text =
      "Once upon a time, there was a little boy named Tim. Tim had a red kite. He liked to fly it in the park "
      "when the wind was strong. One day the wind blew the kite up into a tall tree. Tim was sad. His friend "
      "Sam came and helped him. They pulled the string together and the kite came down. Tim said thank you, "
      "and they flew the kite together until the sun went down.";
  prompts[2].prompt = *reference.tokenizer().Encode(prompts[2].text);
  prompts[2].ignore_eos = false;  // a natural stop is compared too

  std::map<size_t, std::vector<int32_t>> full_tokens;  // prompt index -> tokens of `full`
  std::map<size_t, int> differs_from_full;
  for (const std::string& policy : gates::PolicyNames()) {
    for (size_t p = 0; p < prompts.size(); ++p) {
      Case c = prompts[p];
      c.policy = policy;
      c.keep_ratio = policy == "full" ? 0.0f : 0.3f;
      c.max_tokens = 40;
      c.request_id = absl::StrCat(layout.name, "-", policy, "-", p);
      SCOPED_TRACE(c.Name());
      absl::StatusOr<engine::GenerateResult> want = reference.Run(c);
      ASSERT_TRUE(want.ok()) << want.status();
      StreamResult got = Generate(d.stub(), c.Request());
      ASSERT_TRUE(got.status.ok()) << ToString(got.status) << "\n" << d.Logs();
      ASSERT_TRUE(got.complete.has_value());
      EXPECT_EQ(got.messages_after_complete, 0);
      EXPECT_EQ(got.tokens, want->token_ids) << "the served tokens differ from the offline engine's";
      EXPECT_EQ(got.text, want->text);
      const v1::GenerateComplete& done = *got.complete;
      EXPECT_EQ(done.request_id(), c.request_id);
      EXPECT_EQ(done.usage().prompt_tokens(), static_cast<int32_t>(c.prompt.size()));
      EXPECT_EQ(done.usage().completion_tokens(), static_cast<int32_t>(got.tokens.size()));
      EXPECT_EQ(done.finish_reason(), want->finish_reason == engine::FinishReason::kStop ? v1::GenerateComplete::STOP
                                                                                         : v1::GenerateComplete::LENGTH);
      EXPECT_EQ(done.kv().policy(), policy);
      EXPECT_EQ(done.kv().kv_entries_full(), want->kv.kv_entries_full);
      EXPECT_EQ(done.kv().kv_entries_kept(), want->kv.kv_entries_kept);
      EXPECT_GT(done.kv().bytes_transferred(), 0);
      if (policy == "full") {
        EXPECT_EQ(done.kv().kv_entries_kept(), done.kv().kv_entries_full());
        full_tokens[p] = got.tokens;
      } else {
        EXPECT_LT(done.kv().kv_entries_kept(), done.kv().kv_entries_full()) << "nothing was evicted";
        EXPECT_LT(done.kv().bytes_transferred(), done.kv().bytes_full());
        if (got.tokens != full_tokens[p]) ++differs_from_full[p];
      }
    }
  }
  // Eviction at 0.3 must change some outputs, or equality above proves little about it.
  for (size_t p = 0; p < 2; ++p) {
    EXPECT_GT(differs_from_full[p], 0) << "no policy changed the output of prompt " << p << " at keep ratio 0.3";
  }
  // Everything went back.
  absl::StatusOr<v1::ServerInfo> info = WaitServerInfo(d.stub(), Idle, absl::Seconds(2));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_TRUE(Idle(*info)) << Describe(*info);
}

INSTANTIATE_TEST_SUITE_P(Layouts, DisaggregationTest,
                         ::testing::Values(Layout{"serve_inproc", false, "inproc"}, Layout{"serve_tcp", false, "tcp"},
                                           Layout{"split_tcp", true, "tcp"}),
                         [](const ::testing::TestParamInfo<Layout>& info) { return info.param.name; });

}  // namespace
}  // namespace kvgate::integration
