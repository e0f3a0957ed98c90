#include "gates/policy.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "gates/attention_gate.h"
#include "gates/fast_kvzip.h"
#include "gates/gate_weights.h"
#include "gates/kvzip.h"
#include "gates/sage_kv.h"
#include "gates/snapkv.h"
#include "gates/streaming_llm.h"

namespace kvgate::gates {

absl::Status ValidateModelShape(const ModelShape& s) {
  if (s.num_layers < 1 || s.num_q_heads < 1 || s.num_kv_heads < 1 || s.head_dim < 1 || s.hidden_size < 1 ||
      s.num_q_heads % s.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model shape: layers ", s.num_layers, ", q heads ", s.num_q_heads, ", kv heads ", s.num_kv_heads,
        ", head_dim ", s.head_dim, ", hidden ", s.hidden_size,
        " (all must be positive and q heads a multiple of kv heads)"));
  }
  return absl::OkStatus();
}

absl::Status CheckBudgetAndCapture(const PrefillCapture& capture, const ResolvedBudget& budget,
                                   const ModelShape& shape) {
  if (budget.prompt_tokens < 0 || static_cast<int32_t>(budget.protected_mask.size()) != budget.prompt_tokens) {
    return absl::InvalidArgumentError("budget: protected_mask must hold prompt_tokens bytes");
  }
  if (capture.prompt_tokens != budget.prompt_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("capture has ", capture.prompt_tokens,
                                                   " prompt tokens, the budget ", budget.prompt_tokens));
  }
  const ModelShape& c = capture.shape;
  if (c.num_layers != shape.num_layers || c.num_q_heads != shape.num_q_heads ||
      c.num_kv_heads != shape.num_kv_heads || c.head_dim != shape.head_dim || c.hidden_size != shape.hidden_size) {
    return absl::InvalidArgumentError("capture.shape differs from the policy's model shape");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> PolicyRequest::PrefillKeyMask(int32_t layer, absl::Span<const float> x) {
  return absl::FailedPreconditionError("this policy does not mask the prefill's keys");
}

absl::StatusOr<std::vector<float>> PolicyRequest::RunPrefill(PrefillRunner& runner, absl::Span<const int32_t> prompt) {
  return absl::FailedPreconditionError(absl::StrCat("policy ", std::string(policy_.name()),
                                                    " does not run its own prefill"));
}

absl::StatusOr<KeepPlan> PolicyRequest::Plan(PrefillRunner& runner, absl::Span<const int32_t> prompt,
                                             const PrefillCapture& capture, const PolicyInputs& inputs,
                                             HeadBudget head_budget) {
  return policy_.Plan(capture, inputs, budget_, head_budget);
}

CaptureRequest PolicyRequest::capture_request() const { return policy_.needs(); }

std::unique_ptr<PolicyRequest> Policy::StartRequest(const ResolvedBudget& budget) const {
  return std::make_unique<PolicyRequest>(*this, budget);
}

absl::StatusOr<std::unique_ptr<DecodeEvictor>> Policy::RestoreDecodeEvictor(std::string_view state) const {
  return absl::InvalidArgumentError(absl::StrCat("policy ", std::string(name()), " evicts nothing during decode; got a state of ",
                                                 state.size(), " bytes"));
}

absl::StatusOr<PolicyOptions> LoadGates(const GateFiles& files, const ModelShape& shape) {
  KVGATE_RETURN_IF_ERROR(ValidateModelShape(shape));
  for (const auto& [policy, path] : files.paths) {
    const absl::StatusOr<PolicyTraits> traits = TraitsOfPolicy(policy);
    if (!traits.ok() || !traits->learned_gate) {
      return absl::InvalidArgumentError(absl::StrCat("a gate file for policy '", policy,
                                                     "', which has no learned gate (gated: fast_kvzip, attention_gate)"));
    }
  }
  PolicyOptions options;
  if (auto it = files.paths.find("fast_kvzip"); it != files.paths.end()) {
    KVGATE_ASSIGN_OR_RETURN(options.fast_kvzip_gate, FastKvzipGate::Load(it->second, shape));
  } else if (files.random_seed) {
    options.fast_kvzip_gate = FastKvzipGate::CreateRandom(shape, *files.random_seed);
  }
  if (auto it = files.paths.find("attention_gate"); it != files.paths.end()) {
    KVGATE_ASSIGN_OR_RETURN(options.attention_gate, AttentionGate::Load(it->second, shape));
  } else if (files.random_seed) {
    options.attention_gate = AttentionGate::CreateRandom(shape, *files.random_seed);
  }
  return options;
}

absl::StatusOr<std::unique_ptr<DecodeEvictor>> RestoreDecodeEvictor(const std::string& name, std::string_view state,
                                                                    const PolicyOptions& options,
                                                                    const ModelShape& shape) {
  if (name.empty()) {
    if (!state.empty()) return absl::InvalidArgumentError("a decode eviction state without its policy");
    return nullptr;
  }
  absl::StatusOr<std::unique_ptr<Policy>> policy = CreatePolicy(name, options, shape);
  if (!policy.ok()) {
    const bool known = std::find(PolicyNames().begin(), PolicyNames().end(), name) != PolicyNames().end();
    if (!known) return policy.status();
    return absl::FailedPreconditionError(absl::StrCat("this worker cannot continue the decode-time eviction of ",
                                                      name, ": ", policy.status().message()));
  }
  return (*policy)->RestoreDecodeEvictor(state);
}

namespace {

class FullPolicy final : public Policy {
 public:
  explicit FullPolicy(const ModelShape& shape) : shape_(shape) {}
  std::string_view name() const override { return "full"; }
  CaptureRequest needs() const override { return {}; }
  int32_t default_sink() const override { return 0; }
  int32_t default_recent() const override { return 0; }
  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                const ResolvedBudget& budget, HeadBudget head_budget) const override {
    return KeepPlan::KeepAll(shape_.num_layers, shape_.num_kv_heads, budget.prompt_tokens);
  }

 private:
  ModelShape shape_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Policy>> CreatePolicy(const std::string& name, const PolicyOptions& options,
                                                     const ModelShape& shape) {
  KVGATE_RETURN_IF_ERROR(ValidateModelShape(shape));
  if (name == "full") return std::unique_ptr<Policy>(new FullPolicy(shape));
  if (name == "streaming_llm") return MakeStreamingLlmPolicy(shape);
  if (name == "snapkv") {
    if (options.snapkv_window < 1 || options.snapkv_kernel < 1 || options.snapkv_kernel % 2 == 0) {
      return absl::InvalidArgumentError(absl::StrCat("snapkv: window ", options.snapkv_window, " and kernel ",
                                                     options.snapkv_kernel, " must be >= 1, kernel odd"));
    }
    return MakeSnapKvPolicy(shape, options.snapkv_window, options.snapkv_kernel, options.adakv_safeguard);
  }
  if (name == "sage_kv") {
    if (shape.group_size() > 8) {
      return absl::InvalidArgumentError(absl::StrCat("sage_kv: group size ", shape.group_size(),
                                                     " > 8 (KeepPlan query_mask has one byte per row)"));
    }
    return MakeSageKvPolicy(shape);
  }
  if (name == "kvzip") {
    if (options.kvzip_chunk_tokens < 1) {
      return absl::InvalidArgumentError("kvzip: kvzip_chunk_tokens must be >= 1");
    }
    return MakeKvzipPolicy(shape, options.kvzip_chunk_tokens, options.adakv_safeguard);
  }
  if (name == "fast_kvzip") {
    std::shared_ptr<const FastKvzipGate> gate = options.fast_kvzip_gate;
    if (gate == nullptr && !options.gate_path.empty()) {
      KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<FastKvzipGate> loaded, FastKvzipGate::Load(options.gate_path, shape));
      gate = std::move(loaded);
    }
    if (gate == nullptr && options.allow_random_gate) {
      gate = FastKvzipGate::CreateRandom(shape, options.random_gate_seed);
    }
    if (gate == nullptr) {
      return absl::InvalidArgumentError("fast_kvzip: needs gate weights (PolicyOptions::gate_path)");
    }
    const ModelShape& g = gate->shape();
    if (g.num_layers != shape.num_layers || g.num_kv_heads != shape.num_kv_heads ||
        g.group_size() != shape.group_size() || g.hidden_size != shape.hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, "the fast_kvzip gate was built for another model shape"));
    }
    if (options.fast_kvzip_decode_interval < 1) {
      return absl::InvalidArgumentError("fast_kvzip: fast_kvzip_decode_interval must be >= 1");
    }
    FastKvzipRequestOptions request_options;
    request_options.chunked_prefill = options.fast_kvzip_chunked_prefill;
    request_options.chunk_tokens = options.fast_kvzip_chunk_tokens;
    request_options.window_tokens = options.fast_kvzip_window_tokens;
    request_options.decode_interval = options.fast_kvzip_decode_interval;
    return MakeFastKvzipPolicy(shape, std::move(gate), options.adakv_safeguard, request_options);
  }
  if (name == "attention_gate") {
    std::shared_ptr<const AttentionGate> gate = options.attention_gate;
    if (gate == nullptr && !options.gate_path.empty()) {
      KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<AttentionGate> loaded, AttentionGate::Load(options.gate_path, shape));
      gate = std::move(loaded);
    }
    if (gate == nullptr && options.allow_random_gate) {
      gate = AttentionGate::CreateRandom(shape, options.random_gate_seed);
    }
    if (gate == nullptr) {
      return absl::InvalidArgumentError("attention_gate: needs gate weights (PolicyOptions::gate_path)");
    }
    const ModelShape& g = gate->shape();
    if (g.num_layers != shape.num_layers || g.num_kv_heads != shape.num_kv_heads || g.hidden_size != shape.hidden_size) {
      return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, "the attention gate was built for another model shape"));
    }
    return MakeAttentionGatePolicy(shape, std::move(gate));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown eviction policy '", name,
                                                 "' (known: ", absl::StrJoin(PolicyNames(), ", "), ")"));
}

}  // namespace kvgate::gates
