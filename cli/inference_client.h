// File: a blocking client of kvgate.v1.Inference that returns whole completions, for
// callers that score a finished answer rather than stream it (`kvgate eval --server`).
// One client serves many concurrent calls from many threads, as a gRPC stub does; its .cc
// holds the gRPC headers.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kvgate/v1/inference.pb.h"

namespace grpc {
class ChannelCredentials;
}

namespace kvgate::cli {

// Plaintext when tls_ca_file is empty; else TLS trusting that CA (PEM), and mTLS when the
// client certificate and key are given too. A non-empty token goes out as
// "authorization: Bearer TOKEN" on every call.
struct ClientSecurity {
  std::string tls_ca_file, tls_cert_file, tls_key_file;
  std::string token;
};

// The channel credentials `security` asks for (its token travels per call, not here).
// NOT_FOUND naming the flag (--tls-ca, --tls-cert, --tls-key) for an unreadable file.
// Shared by every client command: generate --server, bench, eval --server.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFor(const ClientSecurity& security);

struct RemoteCompletion {
  std::string text;  // every chunk's text, in order (the stop string is not in it)
  std::vector<int32_t> token_ids;
  kvgate::v1::GenerateComplete complete;
};

class InferenceClient {
 public:
  // NOT_FOUND for an unreadable certificate file. The channel connects lazily: a server
  // that is not there fails the first call (UNAVAILABLE).
  static absl::StatusOr<std::unique_ptr<InferenceClient>> Connect(const std::string& server,
                                                                  const ClientSecurity& security);
  virtual ~InferenceClient() = default;

  // One Generate call read to its end. A non-OK gRPC status comes back as the absl::Status
  // of the same code; a stream that ends without GenerateComplete is INTERNAL.
  // timeout_ms: deadline of the whole call; 0 means none.
  virtual absl::StatusOr<RemoteCompletion> Complete(const kvgate::v1::GenerateRequest& request,
                                                    int64_t timeout_ms) = 0;
};

}  // namespace kvgate::cli
