// Processes that die, in the four-process deployment: a decode worker killed mid-stream
// fails the stream UNAVAILABLE within 2 s and releases the lease, and the prefill side
// holds no pages; a KV manager that dies turns the router NOT_SERVING and new calls
// UNAVAILABLE, and once it is back on the same port the workers re-register and service
// resumes.
#include <gtest/gtest.h>

#include "kvgate/v1/kv_manager.grpc.pb.h"
#include "tests/integration/harness.h"

namespace kvgate::integration {
namespace {

Case LongCase(const std::string& request_id) {
  Case c;
  c.policy = "streaming_llm";
  c.keep_ratio = 0.5f;
  c.prompt = StoryPrompt(Reference().tokenizer(), 40, 3);
  c.max_tokens = 470;
  c.ignore_eos = true;
  c.request_id = request_id;
  return c;
}

Case ShortCase(const std::string& request_id) {
  Case c;
  c.prompt = StoryPrompt(Reference().tokenizer(), 30, 4);
  c.max_tokens = 6;
  c.request_id = request_id;
  return c;
}

absl::StatusOr<v1::ServerInfo> ManagerServerInfo(v1::KvManager::Stub& manager) {
  grpc::ClientContext ctx;
  ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  ctx.AddMetadata("kvgate-internal-token", InternalToken());  // the manager is internal
  v1::ServerInfo info;
  grpc::Status s = manager.GetServerInfo(&ctx, v1::GetServerInfoRequest(), &info);
  if (!s.ok()) return absl::UnavailableError(ToString(s));
  return info;
}

TEST(WorkerFailureTest, KilledDecodeWorkerFailsTheStreamAndReleasesTheLease) {
  DeploymentOptions options;
  options.split = true;
  options.metrics = true;
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;

  const Case c = LongCase("decode-killed");
  absl::Time killed_at = absl::InfiniteFuture();
  CallOptions call;
  call.timeout = absl::Seconds(30);
  call.on_chunk = [&](grpc::ClientContext*, const StreamResult& so_far) {
    if (so_far.chunks == 3) {
      killed_at = absl::Now();
      d.decode()->Kill();
    }
  };
  StreamResult r = Generate(d.stub(), c.Request(), call);
  const absl::Time failed_at = absl::Now();
  ASSERT_NE(killed_at, absl::InfiniteFuture()) << "the stream ended before its third chunk: " << ToString(r.status);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(r.status);
  EXPECT_FALSE(r.complete.has_value());
  EXPECT_LE(failed_at - killed_at, absl::Seconds(2)) << "the client learned of the dead decode worker after "
                                                     << absl::FormatDuration(failed_at - killed_at);

  // The KV manager released the lease (asked directly, not through the router).
  auto manager = v1::KvManager::NewStub(Connect(d.Address(*d.manager())));
  absl::StatusOr<v1::ServerInfo> info;
  PollUntil(
      [&] {
        info = ManagerServerInfo(*manager);
        if (!info.ok()) return false;
        const v1::RequestState::Phase phase = PhaseOf(*info, c.request_id);
        return info->leases_active() == 0 && info->transfers_active() == 0 && info->requests_in_flight() == 0 &&
               (phase == v1::RequestState::FAILED || phase == v1::RequestState::ABORTED);
      },
      std::max(absl::ZeroDuration(), killed_at + absl::Seconds(2) - absl::Now()));
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->leases_active(), 0) << Describe(*info);
  EXPECT_EQ(info->transfers_active(), 0) << Describe(*info);
  EXPECT_EQ(info->requests_in_flight(), 0) << Describe(*info);
  const v1::RequestState::Phase phase = PhaseOf(*info, c.request_id);
  EXPECT_TRUE(phase == v1::RequestState::FAILED || phase == v1::RequestState::ABORTED)
      << v1::RequestState::Phase_Name(phase) << "; " << Describe(*info);

  // The prefill worker holds no pages (its gauge, refreshed every heartbeat).
  ASSERT_TRUE(d.prefill()->metrics_port().has_value()) << d.prefill()->Output();
  const std::optional<double> prefill_pages = AwaitPrefillPagesFree(d, absl::Seconds(2));
  const bool drained = prefill_pages.has_value() && *prefill_pages == 0;
  EXPECT_TRUE(drained) << "prefill pages used: " << (prefill_pages ? std::to_string(*prefill_pages) : "absent");
  EXPECT_FALSE(d.prefill()->Exited()) << d.Logs();
  EXPECT_FALSE(d.router().Exited()) << d.Logs();

  // Requests cannot be served without a decode worker: the router says so (once the
  // manager drops the worker, after --worker-timeout-ms 2 s).
  absl::StatusOr<int> health;
  const bool not_serving = PollUntil(
      [&] {
        health = HealthStatus(d.channel(), absl::Milliseconds(500), "kvgate.v1.Inference");
        return health.ok() && *health == kNotServing;
      },
      absl::Seconds(6));
  EXPECT_TRUE(not_serving) << "router health with its only decode worker dead: "
                           << (health.ok() ? std::to_string(*health) : health.status().ToString());
}

TEST(ManagerFailureTest, RouterTurnsNotServingAndRecoversWhenTheManagerReturns) {
  DeploymentOptions options;
  options.split = true;
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  StreamResult before = Generate(d.stub(), ShortCase("before-manager-death").Request());
  ASSERT_TRUE(before.status.ok()) << ToString(before.status);

  d.manager()->Kill();
  const absl::Time killed_at = absl::Now();
  absl::StatusOr<int> health;
  const bool not_serving = PollUntil(
      [&] {
        health = HealthStatus(d.channel(), absl::Milliseconds(500));
        return health.ok() && *health == kNotServing;
      },
      absl::Seconds(3));
  ASSERT_TRUE(not_serving) << "router health after the manager died: "
                           << (health.ok() ? std::to_string(*health) : health.status().ToString());
  RecordProperty("not_serving_after_ms", std::to_string(absl::ToInt64Milliseconds(absl::Now() - killed_at)));
  StreamResult refused = Generate(d.stub(), ShortCase("while-manager-dead").Request(), Within(absl::Seconds(10)));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE) << ToString(refused.status);

  ASSERT_TRUE(d.RestartManager().ok()) << d.Logs();
  const absl::Time restarted_at = absl::Now();
  StreamResult after;
  int attempt = 0;
  const bool resumed = PollUntil(
      [&] {
        after = Generate(d.stub(), ShortCase(absl::StrCat("after-restart-", attempt++)).Request(),
                         Within(absl::Seconds(5)));
        return after.status.ok();
      },
      absl::Seconds(10));
  const absl::Duration took = absl::Now() - restarted_at;
  ASSERT_TRUE(resumed) << "no request succeeded within 10 s of the manager's restart; last: " << ToString(after.status)
                       << "\n" << d.Logs();
  EXPECT_LE(took, absl::Seconds(5)) << "service resumed only after " << absl::FormatDuration(took);
  EXPECT_TRUE(after.complete.has_value());
  absl::StatusOr<int> serving = HealthStatus(d.channel(), absl::Seconds(1));
  EXPECT_TRUE(PollUntil(
      [&] {
        serving = HealthStatus(d.channel(), absl::Milliseconds(500));
        return serving.ok() && *serving == kServing;
      },
      absl::Seconds(2)));
}

}  // namespace
}  // namespace kvgate::integration
