// 64 concurrent streams with mixed policies, prompt lengths and lengths of output against
// one `kvgate serve`: no token lost or duplicated (every stream equals its own offline
// reference), every stream completes, and afterwards every page, lease and transfer is
// back.
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "gates/eviction_spec.h"
#include "tests/integration/harness.h"

namespace kvgate::integration {
namespace {

constexpr int kStreams = 64;

TEST(ConcurrencyTest, SixtyFourMixedStreamsLoseNothingAndReleaseEverything) {
  DeploymentOptions options;
  // Room for all 64 at once: each holds at most ~340 tokens, 22 pages of 16 rows per
  // (layer, kv head), 704 pages on kvgate-tiny (8 layers x 4 kv heads); 80 of them fit.
  // A short lease: the last prefills wait in the queue for several lease TTLs while the
  // router renews them (the decode side must keep waiting for their transfers). The lease
  // and the workers' heartbeat timeout are patience, scaled with the build's slowness: a
  // renewal or heartbeat starved past them under a sanitizer aborts streams that are fine.
  const auto ms = [](absl::Duration d) { return absl::StrCat(absl::ToInt64Milliseconds(ScaledPatience(d))); };
  options.extra_args = {"--kv-pages", "56320", "--lease-ttl-ms", ms(absl::Seconds(1)), "--worker-timeout-ms",
                        ms(absl::Seconds(2))};
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  absl::StatusOr<v1::ServerInfo> initial = GetServerInfo(d.stub());
  ASSERT_TRUE(initial.ok()) << initial.status();
  ASSERT_TRUE(Idle(*initial)) << Describe(*initial);

  OfflineReference& reference = Reference();
  const std::vector<std::string>& policies = gates::PolicyNames();
  std::vector<Case> cases(kStreams);
  std::vector<engine::GenerateResult> want(kStreams);
  for (int i = 0; i < kStreams; ++i) {
    Case& c = cases[i];
    c.policy = policies[i % policies.size()];
    c.keep_ratio = c.policy == "full" ? 0.0f : (i % 2 == 0 ? 0.3f : 0.5f);
    c.prompt = StoryPrompt(reference.tokenizer(), 24 + (i * 37) % 260, i % 5);
    c.max_tokens = 8 + (i * 13) % 40;
    c.ignore_eos = i % 3 != 0;
    c.request_id = absl::StrCat("stream-", i);
    absl::StatusOr<engine::GenerateResult> r = reference.Run(c);
    ASSERT_TRUE(r.ok()) << c.Name() << ": " << r.status();
    want[i] = *std::move(r);
  }

  // Watch the server while the streams run: they must really overlap.
  std::atomic<bool> done{false};
  std::atomic<int32_t> max_in_flight{0};
  std::thread watcher([&] {
    auto stub = v1::Inference::NewStub(Connect(d.address()));
    while (!done.load()) {
      absl::StatusOr<v1::ServerInfo> info = GetServerInfo(*stub);
      if (info.ok()) max_in_flight.store(std::max(max_in_flight.load(), info->requests_in_flight()));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  });
  std::vector<StreamResult> got(kStreams);
  std::atomic<int> ready{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kStreams; ++i) {
    clients.emplace_back([&, i] {
      // Half the streams share the deployment's channel (HTTP/2 streams of one
      // connection), half open their own connection.
      std::shared_ptr<grpc::Channel> channel = i % 2 == 0 ? d.channel() : Connect(d.address());
      // Connected before the streams start: the test's channels give up on a handshake
      // after 100 ms, which a CPU saturated by 64 streams can miss.
      (void)channel->WaitForConnected(absl::ToChronoTime(absl::Now() + absl::Seconds(20)));
      auto stub = v1::Inference::NewStub(channel);
      ready.fetch_add(1);
      while (ready.load() < kStreams) std::this_thread::yield();
      got[i] = Generate(*stub, cases[i].Request(), Within(absl::Seconds(90)));
    });
  }
  for (std::thread& t : clients) t.join();
  done.store(true);
  watcher.join();

  int completed = 0;
  for (int i = 0; i < kStreams; ++i) {
    SCOPED_TRACE(absl::StrCat(cases[i].request_id, " ", cases[i].Name()));
    const StreamResult& r = got[i];
    EXPECT_TRUE(r.status.ok()) << ToString(r.status);
    if (!r.status.ok()) continue;
    EXPECT_TRUE(r.complete.has_value()) << "the stream ended OK without a complete message";
    if (!r.complete.has_value()) continue;
    ++completed;
    EXPECT_EQ(r.messages_after_complete, 0);
    EXPECT_EQ(r.complete->request_id(), cases[i].request_id);
    EXPECT_EQ(r.complete->usage().completion_tokens(), static_cast<int32_t>(r.tokens.size()))
        << "the complete message counts other tokens than the chunks carried";
    EXPECT_EQ(r.tokens, want[i].token_ids) << "lost, duplicated or different tokens";
  }
  EXPECT_EQ(completed, kStreams);
  EXPECT_GT(max_in_flight.load(), 8) << "the streams did not overlap; the test proves little";

  // Every page, lease and transfer back within 2 s (heartbeats every 250 ms).
  std::vector<std::string> ids;
  for (const Case& c : cases) ids.push_back(c.request_id);
  absl::StatusOr<v1::ServerInfo> after = WaitServerInfo(
      d.stub(), [&](const v1::ServerInfo& info) { return Idle(info) && info.kv_pages_free() == initial->kv_pages_free(); },
      absl::Seconds(2), "", ids);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->kv_pages_free(), initial->kv_pages_free()) << Describe(*after);
  EXPECT_EQ(after->leases_active(), 0) << Describe(*after);
  EXPECT_EQ(after->transfers_active(), 0) << Describe(*after);
  EXPECT_EQ(after->requests_in_flight(), 0) << Describe(*after);
  EXPECT_EQ(after->requests_total(), initial->requests_total() + kStreams);
  // DONE, or already forgotten (the manager remembers a finished request for 10 s).
  for (const Case& c : cases) {
    const v1::RequestState::Phase phase = PhaseOf(*after, c.request_id);
    EXPECT_TRUE(phase == v1::RequestState::DONE || phase == v1::RequestState::PHASE_UNSPECIFIED)
        << c.request_id << " is " << v1::RequestState::Phase_Name(phase);
  }
}

}  // namespace
}  // namespace kvgate::integration
