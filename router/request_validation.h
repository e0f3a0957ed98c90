// File: the router's check of a public kvgate.v1.GenerateRequest, and its translation
// into the domain values the rest of the pipeline uses (prompt token ids,
// engine::GenerateOptions, gates::EvictionSpec).
//
// Every rejection is INVALID_ARGUMENT and its message starts with the proto field path
// it is about ("sampling.top_p must be in (0, 1], got 1.5", "tokens.ids[3]: ...",
// "compression.policy: ..."), so a client can fix the request without reading server
// logs. Nothing here touches gRPC; router_service.cc turns the Status into a
// grpc::Status with ToGrpcStatus.
//
// Thread-safe: the function is pure apart from drawing a random seed.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/generator.h"
#include "engine/model_config.h"
#include "engine/tokenizer.h"
#include "gates/eviction_spec.h"
#include "kvgate/v1/inference.pb.h"

namespace kvgate::router {

// Longest request_id, in bytes (the contract's limit).
inline constexpr size_t kMaxRequestIdBytes = 256;

// Server-side limits and defaults (from the server's flags).
struct ValidationLimits {
  // Most tokens one request may generate, in tokens. The model context caps it too.
  int32_t max_tokens = 4096;
  // What SamplingParams.max_tokens = 0 means, in tokens (the contract says 16). When the
  // prompt leaves less room than this in the context, the default shrinks to that room.
  int32_t default_max_tokens = 16;
  // Longest prompt accepted, in tokens; 0 = only the model context limits it (the
  // prefill workers' --max-prompt-tokens).
  int32_t max_prompt_tokens = 0;
  // What an empty CompressionSpec.policy means.
  std::string default_policy = "full";
  // Policies this server accepts (e.g. without gate weights, fast_kvzip and
  // attention_gate cannot run). Empty means every name in gates::PolicyNames().
  std::vector<std::string> policies;
};

// A request that passed every check, with every server default filled in.
struct ValidatedRequest {
  std::string request_id;           // as given (may be empty: the service assigns one)
  std::vector<int32_t> prompt;      // token ids, each in [0, vocab_size), non-empty
  bool prompt_from_text = false;    // true when the prompt came as `text`
  engine::GenerateOptions options;  // max_tokens >= 1, top_p in (0, 1], seed chosen
  bool seed_given = false;          // false: options.sampling.seed was drawn at random
  gates::EvictionSpec eviction;     // policy never empty; passes ValidateEvictionSpec
  bool skip_text = false;
};

// The names ValidationLimits accepts as policies (limits.policies, or every policy).
std::vector<std::string> AcceptedPolicies(const ValidationLimits& limits);

// Checks `request` against the model and the limits, tokenizes a text prompt (with
// special tokens, as `kvgate tokenize` does) and fills in defaults. INVALID_ARGUMENT
// naming the field for anything a client got wrong; other codes only for a tokenizer
// failure that is not the request's fault.
//
// Preconditions: `tokenizer` and `config` describe the served model;
// limits.default_policy is one of AcceptedPolicies(limits); limits.max_tokens >= 1.
absl::StatusOr<ValidatedRequest> ValidateGenerateRequest(const kvgate::v1::GenerateRequest& request,
                                                         const engine::Tokenizer& tokenizer,
                                                         const engine::ModelConfig& config,
                                                         const ValidationLimits& limits);

}  // namespace kvgate::router
