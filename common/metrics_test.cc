#include "common/metrics.h"

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

namespace kvgate {
namespace {

TEST(MetricsTest, RenderedTextCarriesEveryObservation) {
  Metrics metrics;
  metrics.ObserveTimeToFirstToken(0.02);
  metrics.ObserveTransfer(0.001, 1000, 3000);
  metrics.CountRequest("OK");
  metrics.CountRequest("CANCELLED");
  metrics.SetPages("decode", 7, 93);
  const std::string text = metrics.Render();
  EXPECT_NE(text.find("kvgate_time_to_first_token_seconds_count 1"), std::string::npos) << text;
  EXPECT_NE(text.find("kvgate_transfer_bytes_total 1000"), std::string::npos) << text;
  EXPECT_NE(text.find("kvgate_requests_total{status=\"CANCELLED\"} 1"), std::string::npos) << text;
  EXPECT_NE(text.find("kvgate_kv_pages_free{role=\"decode\"} 93"), std::string::npos) << text;
}

// A plain-socket HTTP GET; returns the whole response ("" when the connection fails).
std::string HttpGet(int port, const std::string& path) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0) {
    close(fd);
    return "";
  }
  const std::string request = "GET " + path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
  (void)send(fd, request.data(), request.size(), MSG_NOSIGNAL);
  std::string response;
  char buffer[4096];
  ssize_t n;
  while ((n = recv(fd, buffer, sizeof(buffer), 0)) > 0) response.append(buffer, static_cast<size_t>(n));
  close(fd);
  return response;
}

TEST(MetricsTest, ServesTheExpositionOnAFreePort) {
  Metrics metrics;
  metrics.CountRequest("OK");
  ASSERT_TRUE(metrics.Serve("127.0.0.1:0").ok());
  ASSERT_GT(metrics.bound_port(), 0);
  const std::string response = HttpGet(metrics.bound_port(), "/metrics");
  EXPECT_NE(response.find("200 OK"), std::string::npos) << response;
  EXPECT_NE(response.find("kvgate_requests_total{status=\"OK\"} 1"), std::string::npos) << response;
}

// Many restarts on "any port": each binds.
TEST(MetricsTest, RestartsOnAnyPortEveryTime) {
  for (int i = 0; i < 50; ++i) {
    Metrics metrics;
    ASSERT_TRUE(metrics.Serve("127.0.0.1:0").ok()) << "restart " << i;
    ASSERT_GT(metrics.bound_port(), 0);
  }
}

// A connection that never sends its request holds /metrics for at most the 2 s timeout.
TEST(MetricsTest, AnIdleConnectionDoesNotBlockScrapes) {
  Metrics metrics;
  ASSERT_TRUE(metrics.Serve("127.0.0.1:0").ok());
  const int idle = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(static_cast<uint16_t>(metrics.bound_port()));
  inet_pton(AF_INET, "127.0.0.1", &address.sin_addr);
  ASSERT_EQ(connect(idle, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  EXPECT_NE(HttpGet(metrics.bound_port(), "/metrics").find("200 OK"), std::string::npos);
  close(idle);
}

TEST(MetricsTest, ABusyPortIsUnavailable) {
  Metrics first;
  ASSERT_TRUE(first.Serve("127.0.0.1:0").ok());
  Metrics second;
  const absl::Status status = second.Serve("127.0.0.1:" + std::to_string(first.bound_port()));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable) << status;
  EXPECT_NE(status.message().find("cannot listen on"), std::string::npos) << status;
}

TEST(MetricsTest, MalformedAddressesAreInvalidArguments) {
  Metrics metrics;
  EXPECT_EQ(metrics.Serve("no-port").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(metrics.Serve("127.0.0.1:70000").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(metrics.Serve("localhost:0").code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate
