// What operators and tools see of a server: grpc.health.v1 (SERVING once ready), server
// reflection (grpcurl lists kvgate.v1.Inference), and Prometheus metrics at /metrics.
#include <algorithm>

#include <gtest/gtest.h>

#include "absl/strings/str_join.h"
#include "tests/integration/harness.h"

namespace kvgate::integration {
namespace {

bool Contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

TEST(ServiceSurfaceTest, HealthTurnsServingAndReflectionListsTheServices) {
  DeploymentOptions options;
  options.wait_ready = false;  // this test polls health itself
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  absl::StatusOr<int> health;
  const bool serving = PollUntil(
      [&] {
        health = HealthStatus(d.channel(), absl::Milliseconds(500));
        return health.ok() && *health == kServing;
      },
      absl::Seconds(20));
  ASSERT_TRUE(serving) << "health: " << (health.ok() ? std::to_string(*health) : health.status().ToString()) << "\n"
                       << d.Logs();

  absl::StatusOr<std::vector<std::string>> services = ReflectionServices(d.channel());
  ASSERT_TRUE(services.ok()) << services.status();
  EXPECT_TRUE(Contains(*services, "kvgate.v1.Inference")) << absl::StrJoin(*services, ", ");
  EXPECT_TRUE(Contains(*services, "grpc.health.v1.Health")) << absl::StrJoin(*services, ", ");

  // Serving means serving: a request succeeds.
  Case c;
  c.prompt = StoryPrompt(Reference().tokenizer(), 30, 1);
  c.max_tokens = 5;
  StreamResult r = Generate(d.stub(), c.Request());
  EXPECT_TRUE(r.status.ok()) << ToString(r.status);
}

TEST(ServiceSurfaceTest, MetricsCountTheFirstRequest) {
  DeploymentOptions options;
  options.metrics = true;
  absl::StatusOr<std::unique_ptr<Deployment>> deployment = Deployment::Start(options);
  ASSERT_TRUE(deployment.ok()) << deployment.status();
  Deployment& d = **deployment;
  ASSERT_TRUE(d.router().metrics_port().has_value()) << d.router().Output();
  const int port = *d.router().metrics_port();

  Case c;
  c.policy = "snapkv";
  c.keep_ratio = 0.5f;
  c.prompt = StoryPrompt(Reference().tokenizer(), 80, 2);
  c.max_tokens = 10;
  StreamResult r = Generate(d.stub(), c.Request());
  ASSERT_TRUE(r.status.ok()) << ToString(r.status);

  absl::StatusOr<std::string> body;
  const bool counted = PollUntil(
      [&] {
        body = HttpGet(port, "/metrics");
        return body.ok() && MetricValue(*body, "kvgate_requests_total{status=\"OK\"}").value_or(0) >= 1;
      },
      absl::Seconds(2));
  ASSERT_TRUE(body.ok()) << body.status();
  EXPECT_TRUE(counted) << *body;
  EXPECT_GE(MetricValue(*body, "kvgate_time_to_first_token_seconds_count").value_or(0), 1) << *body;
  EXPECT_GT(MetricValue(*body, "kvgate_transfer_bytes_total").value_or(0), 0) << *body;
  EXPECT_GE(MetricValue(*body, "kvgate_requests_total{status=\"OK\"}").value_or(0), 1) << *body;
  EXPECT_GT(MetricValue(*body, "kvgate_transfer_bytes_full_total").value_or(0),
            MetricValue(*body, "kvgate_transfer_bytes_total").value_or(0))
      << "snapkv at 0.5 moved no fewer bytes than the full cache";
}

}  // namespace
}  // namespace kvgate::integration
