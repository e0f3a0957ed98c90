// File: the one conversion between absl::Status (inside) and grpc::Status (the edge).
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace kvgate {

// Longest message sent to a client, in bytes; longer ones are cut with a marker
// (as XLA/TSL's grpc_util.h does) so a runaway error cannot bloat trailers.
inline constexpr size_t kMaxGrpcMessageBytes = 3 * 1024;

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace kvgate
