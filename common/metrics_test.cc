#include "common/metrics.h"

#include <gtest/gtest.h>

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

TEST(MetricsTest, ServesOnAFreePort) {
  Metrics metrics;
  ASSERT_TRUE(metrics.Serve("127.0.0.1:0").ok());
  EXPECT_GT(metrics.bound_port(), 0);
}

}  // namespace
}  // namespace kvgate
