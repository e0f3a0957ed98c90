// File: the forwards a policy may run during one request's prefill, when one forward of
// the prompt is not its whole story (Fast KVzip's chunked prefill that evicts between
// chunks; KVzip's reconstruction forwards). The KV layer implements it over the engine's
// model and the request's cache; gates/ never sees either.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "cuda/backend.h"
#include "gates/prefill_capture.h"

namespace kvgate::gates {

class PrefillRunner {
 public:
  virtual ~PrefillRunner() = default;
  // Rows the request's cache can hold (the width of a key mask row).
  virtual int32_t cache_capacity_tokens() const = 0;
  // The backend the forwards run on: ops a policy runs on what a forward left in backend
  // memory (CaptureRequest::layer_inputs_on_backend) go here.
  virtual ops::Backend& backend() const = 0;
  // Runs `tokens` on the request's cache after the rows it holds, recording `record` into
  // *capture, and returns the last token's logits. `key_masks` is empty or, per layer,
  // [num_kv_heads, cache_capacity_tokens()] with 0 = the cached row is invisible to every
  // later query (engine::ForwardOptions::key_masks).
  virtual absl::StatusOr<std::vector<float>> Forward(absl::Span<const int32_t> tokens,
                                                     const std::vector<std::vector<uint8_t>>& key_masks,
                                                     const CaptureRequest& record, PrefillCapture* capture) = 0;
  // A forward of `tokens` after the rows the request's cache holds, on a scratch copy of
  // that cache which is dropped afterwards (the request's cache stays as it was), recording
  // `record` into *capture: what the prompt's cache would see if `tokens` followed it.
  virtual absl::Status ScratchForwardAfterCache(absl::Span<const int32_t> tokens, const CaptureRequest& record,
                                                PrefillCapture* capture) = 0;
  // The model's tokenizer; FAILED_PRECONDITION when the runner has none.
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text) = 0;
};

}  // namespace kvgate::gates
