// File: offline generation over one Model: validation of the request against the model,
// prefill, the decode loop, stop conditions and incremental detokenization.
// The services reuse the same pieces; the CLI's offline `generate` calls this directly.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/kv_planner.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"

namespace kvgate::engine {

inline constexpr int kMaxStopStrings = 16;
inline constexpr int kMaxStopStringBytes = 256;

struct GenerateOptions {
  int32_t max_tokens = 16;  // tokens, >= 1
  SamplingOptions sampling;
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
};

enum class FinishReason { kStop, kLength, kAborted };
std::string_view FinishReasonName(FinishReason reason);  // "stop", "length", "aborted"

struct GenerateResult {
  std::vector<int32_t> token_ids;  // generated only
  std::string text;                // generated text, stop string removed
  FinishReason finish_reason = FinishReason::kLength;
  std::string matched_stop;        // stop string or decimal stop id
  int32_t prompt_tokens = 0;
  KvAccounting kv;
  // Milliseconds.
  double prefill_ms = 0, time_to_first_token_ms = 0, decode_ms = 0, time_per_output_token_ms = 0;
};

// Called with each new token and the text it releases (possibly empty); return false to
// abort generation (finish reason ABORTED).
using TokenCallback = std::function<bool(int32_t token_id, std::string_view new_text)>;

class Generator {
 public:
  Generator(Model* model, const Tokenizer* tokenizer) : model_(model), tokenizer_(tokenizer) {}

  // INVALID_ARGUMENT naming the field for an empty prompt, ids outside the vocabulary,
  // a prompt that does not leave room for max_tokens in the context, bad sampling or
  // stop options.
  absl::Status Validate(absl::Span<const int32_t> prompt, const GenerateOptions& options) const;

  // Without a planner the whole prompt stays in a contiguous cache (the reference path,
  // no eviction); with one, the prompt's cache is compressed and decode runs over the
  // head-paged pool.
  absl::StatusOr<GenerateResult> Generate(absl::Span<const int32_t> prompt,
                                          const GenerateOptions& options,
                                          const TokenCallback& on_token = nullptr,
                                          KvPlanner* planner = nullptr);

 private:
  Model* model_;
  const Tokenizer* tokenizer_;
};

}  // namespace kvgate::engine
