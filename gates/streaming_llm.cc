#include "gates/streaming_llm.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::gates {

std::vector<int32_t> StreamingLlmPositions(const ResolvedBudget& budget) {
  const int32_t n = budget.prompt_tokens;
  const std::vector<uint8_t>& mask = budget.protected_mask;
  int64_t protected_rows = std::count_if(mask.begin(), mask.end(), [](uint8_t b) { return b != 0; });
  int64_t extra = std::max<int64_t>(0, std::clamp(budget.keep_per_head, 0, n) - protected_rows);
  std::vector<uint8_t> keep(mask.begin(), mask.end());
  for (int32_t p = n - 1; p >= 0 && extra > 0; --p) {
    if (!keep[p]) {
      keep[p] = 1;
      --extra;
    }
  }
  std::vector<int32_t> out;
  for (int32_t p = 0; p < n; ++p) {
    if (keep[p]) out.push_back(p);
  }
  return out;
}

KeepPlan StreamingLlmPlan(int32_t num_layers, int32_t num_kv_heads, const ResolvedBudget& budget) {
  KeepPlan plan;
  plan.num_layers = num_layers;
  plan.num_kv_heads = num_kv_heads;
  plan.prompt_tokens = budget.prompt_tokens;
  const std::vector<int32_t> positions = StreamingLlmPositions(budget);
  plan.heads.assign(static_cast<size_t>(num_layers) * num_kv_heads, HeadKeep{positions, {}, {}});
  return plan;
}

namespace {

constexpr char kName[] = "streaming_llm";

// The decode-time ring: every head keeps its rows at positions < sink_tokens plus the most
// recent others, at most `capacity` rows in all.
class StreamingRingEvictor final : public DecodeEvictor {
 public:
  StreamingRingEvictor(int32_t sink_tokens, int32_t capacity) : sink_tokens_(sink_tokens), capacity_(capacity) {}
  std::string_view policy() const override { return kName; }
  absl::StatusOr<RowsToDrop> AfterStep(const DecodeRows& rows) override {
    return internal::DropRingOverflow(rows, sink_tokens_,
                                      [this](int32_t before_ring) { return std::max(0, capacity_ - before_ring); });
  }
  std::string SaveState() const override { return internal::PackState(kName, {sink_tokens_, capacity_}); }

 private:
  int32_t sink_tokens_;
  int32_t capacity_;
};

class StreamingLlmRequest final : public PolicyRequest {
 public:
  using PolicyRequest::PolicyRequest;
  absl::StatusOr<std::unique_ptr<DecodeEvictor>> TakeDecodeEvictor() override {
    if (budget_.keep_per_head >= budget_.prompt_tokens) return nullptr;  // keeping all stays keeping all
    return std::make_unique<StreamingRingEvictor>(budget_.sink_tokens, budget_.keep_per_head);
  }
};

class StreamingLlmPolicy final : public Policy {
 public:
  explicit StreamingLlmPolicy(const ModelShape& shape) : shape_(shape) {}
  std::string_view name() const override { return "streaming_llm"; }
  CaptureRequest needs() const override { return {}; }
  int32_t default_sink() const override { return kStreamingLlmDefaultSink; }
  int32_t default_recent() const override { return 0; }
  absl::StatusOr<KeepPlan> Plan(const PrefillCapture& capture, const PolicyInputs& inputs,
                                const ResolvedBudget& budget, HeadBudget head_budget) const override {
    if (head_budget == HeadBudget::kAdaptive) {
      return absl::InvalidArgumentError("streaming_llm: head_budget ADAPTIVE is not supported");
    }
    if (static_cast<int32_t>(budget.protected_mask.size()) != budget.prompt_tokens) {
      return absl::InvalidArgumentError("streaming_llm: budget.protected_mask must hold prompt_tokens bytes");
    }
    return StreamingLlmPlan(shape_.num_layers, shape_.num_kv_heads, budget);
  }
  std::unique_ptr<PolicyRequest> StartRequest(const ResolvedBudget& budget) const override {
    return std::make_unique<StreamingLlmRequest>(*this, budget);
  }
  absl::StatusOr<std::unique_ptr<DecodeEvictor>> RestoreDecodeEvictor(std::string_view state) const override {
    KVGATE_ASSIGN_OR_RETURN(internal::PackedState packed, internal::UnpackState(state, kName, 2));
    const int32_t sink_tokens = packed.values[0], capacity = packed.values[1];
    if (sink_tokens < 0 || capacity < 0 || !packed.tail.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("streaming_llm decode ring with sink_tokens ", sink_tokens,
                                                     ", capacity ", capacity, " and ", packed.tail.size(),
                                                     " trailing bytes"));
    }
    return std::make_unique<StreamingRingEvictor>(sink_tokens, capacity);
  }

 private:
  ModelShape shape_;
};

}  // namespace

std::unique_ptr<Policy> MakeStreamingLlmPolicy(const ModelShape& shape) {
  return std::make_unique<StreamingLlmPolicy>(shape);
}

}  // namespace kvgate::gates
