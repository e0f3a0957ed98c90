#include "common/grpc_status.h"

#include <gtest/gtest.h>

#include <string>

namespace kvgate {
namespace {

TEST(GrpcStatusTest, RoundTripsAllSeventeenCodes) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status in(static_cast<absl::StatusCode>(code), code == 0 ? "" : "why");
    grpc::Status out = ToGrpcStatus(in);
    EXPECT_EQ(static_cast<int>(out.error_code()), code);
    EXPECT_EQ(FromGrpcStatus(out), in) << "code " << code;
  }
}

TEST(GrpcStatusTest, TruncatesVeryLongMessages) {
  std::string long_message(10 * kMaxGrpcMessageBytes, 'x');
  grpc::Status out = ToGrpcStatus(absl::InvalidArgumentError(long_message));
  EXPECT_EQ(out.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(out.error_message().size(), kMaxGrpcMessageBytes);
  EXPECT_NE(out.error_message().find("[truncated]"), std::string::npos);
}

}  // namespace
}  // namespace kvgate
