// File: the eviction-policy interface and registry. A policy = scorer + selector +
// protections (architecture.md section 4); the engine drives it:
//
//   KVGATE_ASSIGN_OR_RETURN(auto policy, CreatePolicy(spec.policy, options, shape));
//   KVGATE_ASSIGN_OR_RETURN(ResolvedBudget budget, ResolveBudget(spec, n,
//       policy->default_sink(), policy->default_recent()));
//   std::unique_ptr<PolicyRequest> request = policy->StartRequest(budget);
//   ... prefill: request->RunPrefill(runner, prompt) when request->runs_prefill(), else
//       one forward recording policy->needs() (each layer's key mask from
//       request->PrefillKeyMask when masks_prefill_keys()) ...
//   KVGATE_ASSIGN_OR_RETURN(KeepPlan plan, request->Plan(runner, prompt, capture, inputs,
//       spec.head_budget));
//   KVGATE_ASSIGN_OR_RETURN(auto evictor, request->TakeDecodeEvictor());
//
// then compact the cache to `plan` and decode with `evictor` (gates/decode_evictor.h; null:
// nothing is evicted during decode). Every plan keeps each row at its ORIGINAL position.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "gates/decode_evictor.h"
#include "gates/eviction_spec.h"
#include "gates/keep_plan.h"
#include "gates/prefill_capture.h"
#include "gates/prefill_runner.h"

namespace kvgate::gates {

class FastKvzipGate;
class AttentionGate;
class Policy;
class PolicyRequest;

// One KVzip reconstruction forward (gates/kvzip.h, eviction-methods.md section 4.1). After
// the full prefill, the engine appends `num_queries` reconstruction tokens on top of the
// FULL prompt cache at positions n, n+1, ... (chunk 0: "\n\nRepeat the previous context
// exactly." + assistant prefix + the chunk's tokens; chunk i > 0: "\n\nRepeat the part of
// the previous context exactly, starting with " + the last 8 tokens of chunk i-1 +
// assistant prefix + the chunk's tokens), records per layer their post-RoPE queries and
// keys, and drops their K/V afterwards (they must never enter the real cache).
struct KvzipChunk {
  int32_t begin = 0;        // the chunk's prompt positions [begin, end): the keys it scores
  int32_t end = 0;
  int32_t sink_keys = 0;    // prompt keys [0, sink_keys) also enter the softmax; <= begin
                            // (KVzip: the system prompt; kvpress: min(4, begin))
  int32_t num_queries = 0;  // q_len, tokens of the reconstruction input
  // Per layer: [num_queries, num_q_heads, head_dim], post-RoPE.
  std::vector<std::vector<float>> queries;
  // Per layer: [num_kv_heads, num_queries, head_dim], post-RoPE keys of the same tokens.
  std::vector<std::vector<float>> own_keys;
};

// Policy inputs the engine computes in or after the forward. Empty = not supplied.
struct PolicyInputs {
  // fast_kvzip: per layer [num_kv_heads, n] gate scores (FastKvzipGate::Score), if the
  // caller computed them. When empty, Plan runs the gate on PrefillCapture::hidden_states.
  std::vector<std::vector<float>> gate_scores;
  // attention_gate: per layer [num_kv_heads, n], the key masks the prefill used
  // (PolicyRequest::PrefillKeyMask; 1 = row visible/kept). When empty, Plan recomputes it from PrefillCapture::hidden_states
  // (identical only if those hidden states came from the masked forward).
  std::vector<std::vector<uint8_t>> gate_flags;
  // kvzip: the reconstruction forwards, one per chunk, in any order.
  std::vector<KvzipChunk> kvzip_chunks;
};

struct PolicyOptions {
  // fast_kvzip / attention_gate: the gate weight file (gates/README.md formats).
  std::string gate_path;
  // Already-loaded gates (shared by many requests); take precedence over gate_path.
  std::shared_ptr<const FastKvzipGate> fast_kvzip_gate;
  std::shared_ptr<const AttentionGate> attention_gate;
  // Tests and benchmarks without trained weights: when no gate is given, create a random
  // one from this seed instead of failing.
  bool allow_random_gate = false;
  uint64_t random_gate_seed = 0;
  // snapkv (kvpress defaults).
  int32_t snapkv_window = 64;
  int32_t snapkv_kernel = 5;
  // AdaKV safeguard (head_budget = kAdaptive).
  float adakv_safeguard = 0.2f;
  // fast_kvzip: evict between prefill chunks as the authors' code does (true), or once
  // after a full prefill as kvpress's port does (false); chunk size in tokens (repo
  // prefill_chunk_size = kFastKvzipPrefillChunkTokens = 16000).
  bool fast_kvzip_chunked_prefill = true;
  int32_t fast_kvzip_chunk_tokens = 16000;
  // Local window W for contexts longer than one chunk (repo window_size = 4096); shorter
  // contexts use 2% of their length.
  int32_t fast_kvzip_window_tokens = 4096;
  // Decode: every this many generated tokens the gate scores them and, when the cache
  // exceeds the budget, one global threshold evicts; the newest this-many rows and the
  // first 4 are kept (FastKVzip math/: divide_length = window_size = 128).
  int32_t fast_kvzip_decode_interval = 128;
  // kvzip reconstruction chunk (KVzip repo: 2000; kvpress: 2048).
  int32_t kvzip_chunk_tokens = 2000;
};

// One request's part of a policy, from before its prefill to its decode-time eviction.
// Not thread-safe; one per request; must not outlive its Policy (the decode evictor it
// hands out may).
class PolicyRequest {
 public:
  PolicyRequest(const Policy& policy, ResolvedBudget budget) : policy_(policy), budget_(std::move(budget)) {}
  virtual ~PolicyRequest() = default;
  const ResolvedBudget& budget() const { return budget_; }

  // What the request's prefill records: Policy::needs() unless the request knows better
  // (SnapKV asks for its budget's observation window, scored on the backend).
  virtual CaptureRequest capture_request() const;

  // Whether the prefill must, inside each layer's forward and before its attention, take
  // the layer's key mask from PrefillKeyMask, attend with it (AttentionArgs::key_mask) and
  // hand the masks to Plan in PolicyInputs::gate_flags.
  virtual bool masks_prefill_keys() const { return false; }
  // `x` is layer `layer`'s attention input ([n, hidden_size], post input-RMSNorm) over the
  // whole prompt; returns [num_kv_heads, n], 1 = visible. Layers come in order, once each.
  virtual absl::StatusOr<std::vector<uint8_t>> PrefillKeyMask(int32_t layer, absl::Span<const float> x);

  // Whether the policy runs the prompt's prefill itself (RunPrefill) instead of one
  // forward of the whole prompt recording Policy::needs().
  virtual bool runs_prefill() const { return false; }
  // Prefills `prompt` into the runner's empty cache and returns the last token's logits.
  virtual absl::StatusOr<std::vector<float>> RunPrefill(PrefillRunner& runner, absl::Span<const int32_t> prompt);

  // After the prefill: the rows to keep. The default is Policy::Plan; a policy may run
  // more forwards first (KVzip's reconstruction) or return what RunPrefill decided.
  virtual absl::StatusOr<KeepPlan> Plan(PrefillRunner& runner, absl::Span<const int32_t> prompt,
                                        const PrefillCapture& capture, const PolicyInputs& inputs,
                                        HeadBudget head_budget);

  // After the prefill: the sequence's decode-time eviction, or null when the policy evicts
  // nothing during decode (or the request keeps every row). Once per request.
  virtual absl::StatusOr<std::unique_ptr<DecodeEvictor>> TakeDecodeEvictor() { return nullptr; }

 protected:
  const Policy& policy_;
  ResolvedBudget budget_;
};

// A Policy is immutable after CreatePolicy: every method is const and safe to call from
// several threads at once, so one instance may serve many requests.
class Policy {
 public:
  virtual ~Policy() = default;
  virtual std::string_view name() const = 0;
  // What the prefill must record (PrefillCapture fields).
  virtual CaptureRequest needs() const = 0;
  // Defaults for ResolveBudget; may be kDefaultQuarterOfBudget / kDefaultFastKvzipWindow.
  virtual int32_t default_sink() const = 0;
  virtual int32_t default_recent() const = 0;
  // The gate the engine runs inside the forward; null for policies without one.
  virtual const FastKvzipGate* fast_kvzip_gate() const { return nullptr; }
  // Whether its requests need PrefillRunner::Encode (the model's tokenizer).
  virtual bool needs_tokenizer() const { return false; }
  // The request's part of the policy, for a prompt resolved to `budget`.
  virtual std::unique_ptr<PolicyRequest> StartRequest(const ResolvedBudget& budget) const;
  // A decode evictor of this policy from DecodeEvictor::SaveState bytes. INVALID_ARGUMENT
  // for bytes that do not parse or belong to another policy or model shape.
  virtual absl::StatusOr<std::unique_ptr<DecodeEvictor>> RestoreDecodeEvictor(std::string_view state) const;

  // Turns a capture into a KeepPlan over [0, budget.prompt_tokens). INVALID_ARGUMENT when
  // the capture does not match the model shape or lacks what needs() asked for.
  virtual absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                        const ResolvedBudget& budget,
                                        HeadBudget head_budget) const = 0;
  // Same with no PolicyInputs (enough for full, streaming_llm, snapkv, sage_kv, and for
  // fast_kvzip / attention_gate when hidden_states were captured).
  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const ResolvedBudget& budget,
                                HeadBudget head_budget) const {
    return Plan(capture, PolicyInputs{}, budget, head_budget);
  }
};

// The learned gates a worker loads once and every request shares.
struct GateFiles {
  // Gate weight file (gates/README.md formats) per policy name, for the policies with a
  // learned gate (fast_kvzip, attention_gate); such a policy without a file is refused
  // unless random_seed is set.
  std::map<std::string, std::string> paths;
  // Tests and demos without trained gates: seeded random gates for the gated policies
  // without a file, the same on every worker given the same seed.
  std::optional<uint64_t> random_seed;
};
// PolicyOptions with the gates of `files` loaded and checked against `shape`.
// INVALID_ARGUMENT naming a policy that has no gate; load errors pass through (NOT_FOUND
// for a missing file).
absl::StatusOr<PolicyOptions> LoadGates(const GateFiles& files, const ModelShape& shape);

// `name` from PolicyNames(). INVALID_ARGUMENT for an unknown name, a model shape the policy
// cannot serve, or a gate file that does not fit the model; NOT_FOUND for a missing gate
// file.
absl::StatusOr<std::unique_ptr<Policy>> CreatePolicy(const std::string& name,
                                                     const PolicyOptions& options,
                                                     const ModelShape& shape);

// The decode evictor of policy `name` continued from `state` (DecodeEvictor::SaveState) on
// a worker whose policies take `options` (its loaded gates) and serve a model of `shape`.
// An empty `name` is no eviction (null). FAILED_PRECONDITION when this worker cannot run
// the policy (a gate it has not loaded); INVALID_ARGUMENT for an unknown policy or bytes
// that do not parse.
absl::StatusOr<std::unique_ptr<DecodeEvictor>> RestoreDecodeEvictor(const std::string& name, std::string_view state,
                                                                    const PolicyOptions& options,
                                                                    const ModelShape& shape);

// --- Shared by the policy implementations ---

// INVALID_ARGUMENT unless `shape` is usable (positive sizes, heads divisible).
absl::Status ValidateModelShape(const ModelShape& shape);
// INVALID_ARGUMENT unless budget and capture describe the same prompt of a model of
// `shape`.
absl::Status CheckBudgetAndCapture(const PrefillCapture& capture, const ResolvedBudget& budget,
                                   const ModelShape& shape);

}  // namespace kvgate::gates
