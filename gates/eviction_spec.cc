#include "gates/eviction_spec.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "gates/attention_gate.h"
#include "gates/fast_kvzip.h"
#include "gates/kvzip.h"
#include "gates/streaming_llm.h"

namespace kvgate::gates {

namespace {

struct RegisteredPolicy {
  const char* name;
  PolicyTraits traits;
};

// Every policy, in documentation order. Policy::default_sink/default_recent return the
// same values (policy_test checks each against its policy object).
const std::vector<RegisteredPolicy>& Registry() {
  static const std::vector<RegisteredPolicy>* const kRegistry = new std::vector<RegisteredPolicy>{
      // name, {default sink, default recent, adaptive heads, evicts, learned gate}
      {"full", {0, 0, true, false, false}},
      {"streaming_llm", {kStreamingLlmDefaultSink, 0, false, true, false}},
      {"snapkv", {0, 0, true, true, false}},
      {"sage_kv", {kDefaultQuarterOfBudget, kDefaultQuarterOfBudget, false, true, false}},
      {"kvzip", {kKvzipDefaultSink, 0, true, true, false}},
      {"fast_kvzip", {kFastKvzipDefaultSink, kDefaultFastKvzipWindow, true, true, true}},
      {"attention_gate", {kAttentionGateDefaultSink, 0, false, true, true}},
  };
  return *kRegistry;
}

const RegisteredPolicy* Find(const std::string& policy) {
  for (const RegisteredPolicy& p : Registry()) {
    if (policy == p.name) return &p;
  }
  return nullptr;
}

}  // namespace

const std::vector<std::string>& PolicyNames() {
  static const std::vector<std::string>* const kNames = [] {
    auto* names = new std::vector<std::string>;
    for (const RegisteredPolicy& p : Registry()) names->push_back(p.name);
    return names;
  }();
  return *kNames;
}

absl::StatusOr<PolicyTraits> TraitsOfPolicy(const std::string& policy) {
  const RegisteredPolicy* found = Find(policy);
  if (found == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown eviction policy '", policy,
                                                   "' (known: ", absl::StrJoin(PolicyNames(), ", "), ")"));
  }
  return found->traits;
}

bool PolicySupportsAdaptiveHeads(const std::string& policy) {
  const RegisteredPolicy* found = Find(policy);
  return found != nullptr && found->traits.adaptive_heads;
}

std::string AdaptiveHeadPolicies() {
  std::vector<std::string> names;
  for (const RegisteredPolicy& p : Registry()) {
    if (p.traits.adaptive_heads && p.traits.evicts) names.push_back(p.name);
  }
  return absl::StrJoin(names, ", ");
}

int32_t FastKvzipPrefillWindow(int32_t prompt_tokens) {
  constexpr int32_t kChunkTokens = 16000;  // prefill_chunk_size
  constexpr int32_t kWindowTokens = 4096;  // window_size
  constexpr double kWindowRatio = 0.02;    // window_ratio
  if (prompt_tokens <= 0) return 0;
  if (prompt_tokens < kChunkTokens) return static_cast<int32_t>(kWindowRatio * prompt_tokens);
  return kWindowTokens;
}

absl::Status ValidateEvictionSpec(const EvictionSpec& spec) {
  const std::vector<std::string>& names = PolicyNames();
  if (std::find(names.begin(), names.end(), spec.policy) == names.end()) {
    return absl::InvalidArgumentError(absl::StrCat("policy: unknown eviction policy '", spec.policy,
                                                   "' (known: ", absl::StrJoin(names, ", "), ")"));
  }
  // 0 = unset; anything else must lie in (0, 1]. NaN fails every comparison.
  if (spec.keep_ratio != 0.0f && !(spec.keep_ratio > 0.0f && spec.keep_ratio <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("keep_ratio: must be in (0, 1] (0 = unset), got ", spec.keep_ratio));
  }
  if (spec.budget_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("budget_tokens: must be >= 0 (0 = unset), got ", spec.budget_tokens));
  }
  if (spec.keep_ratio != 0.0f && spec.budget_tokens != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "keep_ratio and budget_tokens: set at most one (got keep_ratio ", spec.keep_ratio,
        " and budget_tokens ", spec.budget_tokens, ")"));
  }
  if (spec.sink_tokens.has_value() && *spec.sink_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sink_tokens: must be >= 0, got ", *spec.sink_tokens));
  }
  if (spec.recent_tokens.has_value() && *spec.recent_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("recent_tokens: must be >= 0, got ", *spec.recent_tokens));
  }
  for (size_t i = 0; i < spec.protected_ranges.size(); ++i) {
    const TokenRange& r = spec.protected_ranges[i];
    if (r.begin < 0 || r.end <= r.begin) {
      return absl::InvalidArgumentError(absl::StrCat(
          "protected_ranges[", i, "]: [", r.begin, ", ", r.end,
          ") must be a non-empty range with 0 <= begin < end"));
    }
  }
  if (spec.head_budget == HeadBudget::kAdaptive && !PolicySupportsAdaptiveHeads(spec.policy)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_budget: ADAPTIVE (AdaKV) is not supported by policy '", spec.policy,
        "' (supported: ", AdaptiveHeadPolicies(), ")"));
  }
  return absl::OkStatus();
}

namespace {

int32_t ResolveDefault(int32_t policy_default, int32_t prompt_tokens, int32_t keep_per_head) {
  switch (policy_default) {
    case kDefaultQuarterOfBudget:
      return keep_per_head / 4;
    case kDefaultFastKvzipWindow:
      return std::min(FastKvzipPrefillWindow(prompt_tokens), keep_per_head);
    default:
      return std::max(policy_default, 0);
  }
}

}  // namespace

absl::StatusOr<ResolvedBudget> ResolveBudget(const EvictionSpec& spec, int32_t prompt_tokens,
                                             int32_t sink_default, int32_t recent_default) {
  KVGATE_RETURN_IF_ERROR(ValidateEvictionSpec(spec));
  if (prompt_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_tokens: must be >= 0, got ", prompt_tokens));
  }
  const int32_t n = prompt_tokens;
  ResolvedBudget out;
  out.prompt_tokens = n;
  if (spec.keep_ratio > 0.0f) {
    const int64_t kept = std::llround(static_cast<double>(spec.keep_ratio) * n);
    out.keep_per_head = static_cast<int32_t>(std::clamp<int64_t>(kept, 0, n));
  } else if (spec.budget_tokens > 0) {
    out.keep_per_head = std::min(spec.budget_tokens, n);
  } else {
    out.keep_per_head = n;
  }
  const int32_t sink = spec.sink_tokens.has_value()
                           ? *spec.sink_tokens
                           : ResolveDefault(sink_default, n, out.keep_per_head);
  const int32_t recent = spec.recent_tokens.has_value()
                             ? *spec.recent_tokens
                             : ResolveDefault(recent_default, n, out.keep_per_head);
  out.sink_tokens = std::min(sink, n);
  out.recent_tokens = std::min(recent, n);

  out.protected_mask.assign(static_cast<size_t>(n), 0);
  for (int32_t i = 0; i < out.sink_tokens; ++i) out.protected_mask[i] = 1;
  for (int32_t i = n - out.recent_tokens; i < n; ++i) out.protected_mask[i] = 1;
  for (const TokenRange& r : spec.protected_ranges) {
    const int32_t begin = std::clamp(r.begin, 0, n), end = std::clamp(r.end, 0, n);
    for (int32_t i = begin; i < end; ++i) out.protected_mask[i] = 1;
  }
  return out;
}

}  // namespace kvgate::gates
