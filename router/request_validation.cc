#include "router/request_validation.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/tokenizer_util.h"
#include "kv_manager/proto_convert.h"

namespace kvgate::router {
namespace {

using kvgate::v1::CompressionSpec;
using kvgate::v1::GenerateRequest;
using kvgate::v1::SamplingParams;

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

// A 64-bit seed nobody asked for: one generator per thread, seeded from the OS.
uint64_t RandomSeed() {
  thread_local std::mt19937_64 generator([] {
    std::random_device device;
    return (static_cast<uint64_t>(device()) << 32) ^ device();
  }());
  return generator();
}

absl::Status CheckRequestId(const std::string& id) {
  if (id.size() > kMaxRequestIdBytes) {
    return Invalid(absl::StrCat("request_id must be at most ", kMaxRequestIdBytes, " bytes, got ", id.size()));
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(id[i]);
    if (c < 0x20 || c > 0x7e) {
      return Invalid(absl::StrCat("request_id must be printable ASCII, got byte 0x", absl::Hex(c, absl::kZeroPad2),
                                  " at offset ", i));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckUtf8(const std::string& field, std::string_view text) {
  if (const size_t bad = engine::tok::FindInvalidUtf8(text); bad != std::string_view::npos) {
    return Invalid(absl::StrCat(field, " is not valid UTF-8 (first bad byte at offset ", bad, ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckTokenId(const std::string& field, int32_t id, int32_t vocab_size) {
  if (id < 0 || id >= vocab_size) {
    return Invalid(absl::StrCat(field, " = ", id, " is outside the vocabulary [0, ", vocab_size, ")"));
  }
  return absl::OkStatus();
}

// The prompt as token ids; `field` receives the name of the prompt's field.
absl::StatusOr<std::vector<int32_t>> PromptIds(const GenerateRequest& request, const engine::Tokenizer& tokenizer,
                                               const engine::ModelConfig& config, std::string* field) {
  switch (request.prompt_case()) {
    case GenerateRequest::kText: {
      *field = "text";
      const std::string& text = request.text();
      if (text.empty()) return Invalid("text: the prompt is empty");
      KVGATE_RETURN_IF_ERROR(CheckUtf8("text", text));
      absl::StatusOr<std::vector<int32_t>> ids = tokenizer.Encode(text, /*add_special_tokens=*/true);
      if (!ids.ok()) return absl::Status(ids.status().code(), absl::StrCat("text: ", ids.status().message()));
      if (ids->empty()) return Invalid("text: the prompt has no tokens");
      for (size_t i = 0; i < ids->size(); ++i) {
        // The tokenizer and the model may disagree on the vocabulary size.
        if ((*ids)[i] < 0 || (*ids)[i] >= config.vocab_size) {
          return Invalid(absl::StrCat("text: token ", i, " of the prompt (id ", (*ids)[i],
                                      ") is outside the model's vocabulary [0, ", config.vocab_size, ")"));
        }
      }
      return ids;
    }
    case GenerateRequest::kTokens: {
      *field = "tokens.ids";
      const auto& ids = request.tokens().ids();
      if (ids.empty()) return Invalid("tokens.ids: the prompt is empty");
      for (int i = 0; i < ids.size(); ++i) {
        KVGATE_RETURN_IF_ERROR(CheckTokenId(absl::StrCat("tokens.ids[", i, "]"), ids[i], config.vocab_size));
      }
      return std::vector<int32_t>(ids.begin(), ids.end());
    }
    case GenerateRequest::PROMPT_NOT_SET:
      break;
  }
  return Invalid("prompt: set text or tokens");
}

absl::Status CheckSampling(const SamplingParams& s, int32_t vocab_size) {
  if (!std::isfinite(s.temperature()) || s.temperature() < 0.0f) {
    return Invalid(absl::StrCat("sampling.temperature must be finite and >= 0, got ", s.temperature()));
  }
  // 0 means unset (1); NaN fails every comparison.
  if (s.top_p() != 0.0f && !(s.top_p() > 0.0f && s.top_p() <= 1.0f)) {
    return Invalid(absl::StrCat("sampling.top_p must be in (0, 1], got ", s.top_p()));
  }
  if (s.top_k() < -1) {
    return Invalid(absl::StrCat("sampling.top_k must be -1, 0 (disabled) or positive, got ", s.top_k()));
  }
  if (!(s.min_p() >= 0.0f && s.min_p() <= 1.0f)) {
    return Invalid(absl::StrCat("sampling.min_p must be in [0, 1], got ", s.min_p()));
  }
  if (s.stop_size() > engine::kMaxStopStrings) {
    return Invalid(absl::StrCat("sampling.stop: at most ", engine::kMaxStopStrings, " stop strings, got ", s.stop_size()));
  }
  for (int i = 0; i < s.stop_size(); ++i) {
    const std::string& stop = s.stop(i);
    const std::string field = absl::StrCat("sampling.stop[", i, "]");
    if (stop.empty() || stop.size() > static_cast<size_t>(engine::kMaxStopStringBytes)) {
      return Invalid(absl::StrCat(field, " must have 1 to ", engine::kMaxStopStringBytes, " bytes, got ", stop.size()));
    }
    KVGATE_RETURN_IF_ERROR(CheckUtf8(field, stop));
  }
  for (int i = 0; i < s.stop_token_ids_size(); ++i) {
    KVGATE_RETURN_IF_ERROR(
        CheckTokenId(absl::StrCat("sampling.stop_token_ids[", i, "]"), s.stop_token_ids(i), vocab_size));
  }
  return absl::OkStatus();
}

// max_tokens against the limits and the room the prompt leaves in the context.
absl::StatusOr<int32_t> ResolveMaxTokens(int32_t requested, int64_t prompt_tokens, const std::string& prompt_field,
                                         const engine::ModelConfig& config, const ValidationLimits& limits) {
  const int64_t context = config.max_context_tokens;
  if (prompt_tokens >= context) {
    return Invalid(absl::StrCat(prompt_field, ": the prompt has ", prompt_tokens, " tokens; the model context is ",
                                context, " tokens, which leaves no room to generate"));
  }
  if (limits.max_prompt_tokens > 0 && prompt_tokens > limits.max_prompt_tokens) {
    return Invalid(absl::StrCat(prompt_field, ": the prompt has ", prompt_tokens, " tokens; this server accepts at most ",
                                limits.max_prompt_tokens, " (--max-prompt-tokens)"));
  }
  const int64_t room = context - prompt_tokens;
  if (requested < 0) {
    return Invalid(absl::StrCat("sampling.max_tokens must be >= 0 (0 = the default ", limits.default_max_tokens,
                                "), got ", requested));
  }
  if (requested == 0) {
    return static_cast<int32_t>(std::min<int64_t>(limits.default_max_tokens, room));
  }
  if (requested > limits.max_tokens) {
    return Invalid(absl::StrCat("sampling.max_tokens must be at most ", limits.max_tokens, " on this server, got ",
                                requested));
  }
  if (requested > room) {
    return Invalid(absl::StrCat("sampling.max_tokens: the prompt (", prompt_tokens, " tokens) plus max_tokens (",
                                requested, ") exceeds the model context of ", context, " tokens (at most ", room,
                                " can be generated)"));
  }
  return requested;
}

absl::Status CheckCompression(const CompressionSpec& c, int64_t prompt_tokens, const ValidationLimits& limits,
                              std::string* policy) {
  const std::vector<std::string> accepted = AcceptedPolicies(limits);
  *policy = c.policy().empty() ? limits.default_policy : c.policy();
  if (std::find(accepted.begin(), accepted.end(), *policy) == accepted.end()) {
    const std::vector<std::string>& known = gates::PolicyNames();
    const bool is_known = std::find(known.begin(), known.end(), *policy) != known.end();
    return Invalid(absl::StrCat("compression.policy: ", is_known ? "policy '" : "unknown policy '", *policy, "'",
                                is_known ? " is not enabled on this server" : "", " (valid: ",
                                absl::StrJoin(accepted, ", "), ")"));
  }
  // 0 means unset; NaN fails every comparison.
  if (c.keep_ratio() != 0.0f && !(c.keep_ratio() > 0.0f && c.keep_ratio() <= 1.0f)) {
    return Invalid(absl::StrCat("compression.keep_ratio must be in (0, 1] (0 = unset), got ", c.keep_ratio()));
  }
  if (c.budget_tokens() < 0) {
    return Invalid(absl::StrCat("compression.budget_tokens must be >= 0 (0 = unset), got ", c.budget_tokens()));
  }
  if (c.keep_ratio() != 0.0f && c.budget_tokens() != 0) {
    return Invalid(absl::StrCat("compression.keep_ratio and compression.budget_tokens: set at most one, got ",
                                c.keep_ratio(), " and ", c.budget_tokens()));
  }
  if (c.has_sink_tokens() && c.sink_tokens() < 0) {
    return Invalid(absl::StrCat("compression.sink_tokens must be >= 0, got ", c.sink_tokens()));
  }
  if (c.has_recent_tokens() && c.recent_tokens() < 0) {
    return Invalid(absl::StrCat("compression.recent_tokens must be >= 0, got ", c.recent_tokens()));
  }
  if (!CompressionSpec::HeadBudget_IsValid(c.head_budget())) {
    return Invalid(absl::StrCat("compression.head_budget: unknown value ", static_cast<int>(c.head_budget()),
                                " (valid: HEAD_BUDGET_UNSPECIFIED, UNIFORM, ADAPTIVE)"));
  }
  if (c.head_budget() == CompressionSpec::ADAPTIVE && !gates::PolicySupportsAdaptiveHeads(*policy)) {
    return Invalid(absl::StrCat("compression.head_budget: ADAPTIVE is not supported by policy '", *policy,
                                "' (supported: ", gates::AdaptiveHeadPolicies(), ")"));
  }
  for (int i = 0; i < c.protected_ranges_size(); ++i) {
    const kvgate::v1::TokenRange& r = c.protected_ranges(i);
    if (r.begin() < 0 || r.end() <= r.begin() || r.end() > prompt_tokens) {
      return Invalid(absl::StrCat("compression.protected_ranges[", i, "]: [", r.begin(), ", ", r.end(),
                                  ") must satisfy 0 <= begin < end <= prompt tokens (", prompt_tokens, ")"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<std::string> AcceptedPolicies(const ValidationLimits& limits) {
  return limits.policies.empty() ? gates::PolicyNames() : limits.policies;
}

absl::StatusOr<ValidatedRequest> ValidateGenerateRequest(const GenerateRequest& request,
                                                         const engine::Tokenizer& tokenizer,
                                                         const engine::ModelConfig& config,
                                                         const ValidationLimits& limits) {
  ValidatedRequest out;
  KVGATE_RETURN_IF_ERROR(CheckRequestId(request.request_id()));
  out.request_id = request.request_id();

  std::string prompt_field;
  KVGATE_ASSIGN_OR_RETURN(out.prompt, PromptIds(request, tokenizer, config, &prompt_field));
  out.prompt_from_text = request.has_text();
  const int64_t prompt_tokens = static_cast<int64_t>(out.prompt.size());

  const SamplingParams& sampling = request.sampling();
  KVGATE_RETURN_IF_ERROR(CheckSampling(sampling, config.vocab_size));
  out.options = kv::FromProto(sampling);
  KVGATE_ASSIGN_OR_RETURN(out.options.max_tokens,
                          ResolveMaxTokens(sampling.max_tokens(), prompt_tokens, prompt_field, config, limits));
  out.seed_given = sampling.has_seed();
  if (!out.seed_given) out.options.sampling.seed = RandomSeed();

  std::string policy;
  KVGATE_RETURN_IF_ERROR(CheckCompression(request.compression(), prompt_tokens, limits, &policy));
  out.eviction = kv::FromProto(request.compression());
  out.eviction.policy = policy;
  out.skip_text = request.skip_text();

  // The engine's and the gates' own checks must agree with the ones above; a failure here
  // is a gap in this file, still reported as the client's INVALID_ARGUMENT.
  KVGATE_RETURN_IF_ERROR(engine::ValidateSamplingOptions(out.options.sampling));
  KVGATE_RETURN_IF_ERROR(gates::ValidateEvictionSpec(out.eviction));
  return out;
}

}  // namespace kvgate::router
