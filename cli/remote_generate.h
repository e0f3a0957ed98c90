// File: `kvgate generate --server HOST:PORT`: the same generate command, answered by a
// kvgate server over gRPC (kvgate.v1.Inference/Generate) instead of the engine in this
// process. Text is printed as chunks arrive; --json prints one object at the end with the
// offline command's fields plus the server's (request_id, bytes_transferred, queue and
// transfer timings).
//
// The client checks only what a flag's type demands (numbers parse, ints fit int32,
// exactly one prompt); the server validates every value and answers INVALID_ARGUMENT
// naming the field, which is printed as "kvgate generate: error: CODE: message" (exit 1).
//
// This is a client: like the *_service.cc files it talks gRPC, so its .cc includes the
// gRPC headers; everything above BuildGenerateRequest is pure.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/flags.h"
#include "kvgate/v1/inference.pb.h"
#include "nlohmann/json.hpp"

namespace kvgate::cli {

// True when `args` (the arguments after `generate`) ask for a server: --server HOST:PORT
// or --server=HOST:PORT (a flag's value that merely spells "--server" does not count).
bool UsesServer(const std::vector<std::string>& args);

// The request the flags describe. Flags not given leave their proto field unset (the
// server's defaults apply; an absent --seed lets the server pick one). INVALID_ARGUMENT
// naming the flag for a malformed value or not exactly one of --prompt / --prompt-ids.
absl::StatusOr<kvgate::v1::GenerateRequest> BuildGenerateRequest(const Flags& flags);

struct RemoteGenerateCommand {
  std::string server;  // HOST:PORT
  kvgate::v1::GenerateRequest request;
  // Plaintext when tls_ca_file is empty; else TLS trusting that CA, and mTLS when the
  // client certificate and key (PEM files) are given too.
  std::string tls_ca_file, tls_cert_file, tls_key_file;
  std::string token;       // sent as "authorization: Bearer TOKEN"; empty: none
  int64_t timeout_ms = 0;  // deadline of the whole call, ms; 0: none
  bool json = false;
};

// Parses the generate flags for the remote path (usage errors are INVALID_ARGUMENT).
// Warnings (a --model that the server ignores) go to `warnings`.
absl::StatusOr<RemoteGenerateCommand> ParseRemoteGenerate(const std::vector<std::string>& args,
                                                          std::vector<std::string>* warnings);

// The --json object: text, token_ids, finish_reason ("stop", "length", "aborted"),
// matched_stop, request_id, usage, kv (bytes_kept = bytes_transferred), timings.
nlohmann::json CompletionJson(const std::string& text, const std::vector<int32_t>& token_ids,
                              const kvgate::v1::GenerateComplete& complete);

// Runs the call: streams text to `out` (or the JSON object at the end), a summary line to
// `err`. A non-OK gRPC status comes back as the absl::Status of the same code.
absl::Status RemoteGenerate(const RemoteGenerateCommand& command, std::ostream& out, std::ostream& err);

// The subcommand: exit 0 on success, 1 for a failed call, 2 for a usage error.
int RunRemoteGenerate(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);
int RunRemoteGenerate(const std::vector<std::string>& args);

}  // namespace kvgate::cli
