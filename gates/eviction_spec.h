// File: what a request asks of eviction (policy, budget, protections), validated, and
// resolved against a prompt into exact per-head token counts. Domain twin of
// kvgate.v1.CompressionSpec; the proto mapping lives with the services.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvgate::gates {

enum class HeadBudget { kPolicyDefault, kUniform, kAdaptive };

// Half-open range [begin, end) of prompt positions.
struct TokenRange {
  int32_t begin = 0;
  int32_t end = 0;
};

struct EvictionSpec {
  std::string policy = "full";
  float keep_ratio = 0.0f;    // fraction of prompt entries kept, (0, 1]; 0 = unset
  int32_t budget_tokens = 0;  // entries kept per kv head (average), tokens; 0 = unset
  std::optional<int32_t> sink_tokens;    // unset = the policy's default
  std::optional<int32_t> recent_tokens;  // unset = the policy's default
  HeadBudget head_budget = HeadBudget::kPolicyDefault;
  std::vector<TokenRange> protected_ranges;
};

// Names accepted in EvictionSpec::policy, in documentation order.
const std::vector<std::string>& PolicyNames();

// INVALID_ARGUMENT naming the field: unknown policy, keep_ratio outside (0, 1] (NaN
// included), negative budget_tokens, both keep_ratio and budget_tokens set, negative
// sink/recent tokens, an empty or reversed protected range.
// (Implementation also rejects: a protected range with a negative begin, and
// head_budget = kAdaptive for a policy without AdaKV support, see
// PolicySupportsAdaptiveHeads.)
absl::Status ValidateEvictionSpec(const EvictionSpec& spec);

// A spec resolved for one prompt of `prompt_tokens` tokens.
struct ResolvedBudget {
  int32_t prompt_tokens = 0;
  // Entries each kv head keeps on average, protections included, in [0, prompt_tokens].
  // keep_ratio r gives round(r * prompt_tokens); budget_tokens b gives min(b, n); neither
  // gives prompt_tokens (keep everything).
  int32_t keep_per_head = 0;
  int32_t sink_tokens = 0;
  int32_t recent_tokens = 0;
  // [prompt_tokens]: 1 where a position must be kept (sink, recent window, protected
  // ranges clipped to the prompt).
  std::vector<uint8_t> protected_mask;
};

// Default sink/recent tokens come from the policy (sink_default, recent_default).
absl::StatusOr<ResolvedBudget> ResolveBudget(const EvictionSpec& spec, int32_t prompt_tokens,
                                             int32_t sink_default, int32_t recent_default);

// --- Additions (gates implementation) -------------------------------------------------
//
// Defaults that depend on the prompt. A policy may return one of these from
// default_sink()/default_recent(); ResolveBudget turns it into a token count (it is never
// left negative in a ResolvedBudget). A request's explicit sink/recent always wins.
//
// keep_per_head / 4: SAGE-KV's sink = recent = B/4 (paper App. A.2).
inline constexpr int32_t kDefaultQuarterOfBudget = -1;
// min(FastKvzipPrefillWindow(prompt_tokens), keep_per_head): Fast KVzip's prefill-time
// local window, shrunk to the budget when the budget is smaller (repo: "if ratio*n < W:
// W = ratio*n").
inline constexpr int32_t kDefaultFastKvzipWindow = -2;

// Fast KVzip's prefill-time local window W (FastKVzip prefill/model/wrapper.py): int(0.02 *
// n) when n < 16000 tokens (shorter than one prefill chunk), else 4096. 0 for n <= 0.
int32_t FastKvzipPrefillWindow(int32_t prompt_tokens);

// Whether `policy` accepts head_budget = kAdaptive (AdaKV): snapkv, kvzip, fast_kvzip
// (scored policies), and full (where it is meaningless and ignored).
bool PolicySupportsAdaptiveHeads(const std::string& policy);
// The evicting policies that accept it, for messages ("snapkv, kvzip, fast_kvzip").
std::string AdaptiveHeadPolicies();

// What the KV manager and the router know of a policy without building it (no gate
// weights needed): its default protections (the same as its Policy::default_sink /
// default_recent, for ResolveBudget), whether it accepts head_budget ADAPTIVE, and
// whether it evicts at all (full keeps every row whatever the budget), and whether it
// runs a learned gate.
struct PolicyTraits {
  int32_t default_sink = 0;
  int32_t default_recent = 0;
  bool adaptive_heads = false;
  bool evicts = true;
  bool learned_gate = false;  // needs gate weights (gates::GateFiles) to run
};
// INVALID_ARGUMENT for a name not in PolicyNames().
absl::StatusOr<PolicyTraits> TraitsOfPolicy(const std::string& policy);

}  // namespace kvgate::gates
