// File: the seam between generation and KV compression. After prefill the generator
// hands its contiguous cache to a KvPlanner, which applies an eviction policy, moves the
// kept rows into a head-paged pool and returns the batch that decode runs over. The
// engine defines the interface; kv/ implements it (engine must not depend on it).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/model.h"
#include "engine/paged_kv.h"
#include "engine/prefill_capture.h"

namespace kvgate::engine {

struct KvAccounting {
  std::string policy = "full";
  int64_t kv_entries_full = 0;  // layers * kv_heads * prompt tokens
  int64_t kv_entries_kept = 0;  // after eviction
  double keep_fraction = 1.0;
  int64_t bytes_full = 0;       // entries * bytes per entry (K + V)
  int64_t bytes_kept = 0;
  int32_t pages_used = 0;       // pages the request holds after eviction
};

class KvPlanner {
 public:
  virtual ~KvPlanner() = default;
  // Sets what the prefill of `prompt` must record, and any in-forward eviction, for the
  // policy (options->capture is set by the caller).
  virtual absl::Status ConfigurePrefill(absl::Span<const int32_t> prompt, ForwardOptions* options) = 0;
  // Runs the prompt's prefill into the empty `cache` and returns the last token's logits.
  // The default is ConfigurePrefill + one Model::Forward; policies that evict between
  // prefill chunks (Fast KVzip) run their own loop.
  virtual absl::StatusOr<std::vector<float>> Prefill(Model& model, absl::Span<const int32_t> prompt, KvCache* cache,
                                                     PrefillCapture* capture) {
    ForwardOptions forward;
    forward.capture = capture;
    absl::Status status = ConfigurePrefill(prompt, &forward);
    if (!status.ok()) return status;
    return model.Forward(prompt, cache, forward);
  }
  // Compresses the prefilled `cache` of `prompt` and returns the batch of this one
  // sequence to decode over; fills `accounting`.
  virtual absl::StatusOr<std::unique_ptr<PagedKvBatch>> Commit(absl::Span<const int32_t> prompt,
                                                               const KvCache& cache,
                                                               const PrefillCapture& capture,
                                                               KvAccounting* accounting) = 0;
};

}  // namespace kvgate::engine
