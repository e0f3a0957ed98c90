// File: next-token selection from logits: greedy, temperature, top-k, top-p, min-p,
// with a per-request seeded generator (the same seed gives the same tokens).
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace kvgate::engine {

struct SamplingOptions {
  float temperature = 0.0f;  // 0 = greedy
  int32_t top_k = 0;         // 0 or -1 = disabled
  float top_p = 1.0f;        // (0, 1]
  float min_p = 0.0f;        // [0, 1]
  uint64_t seed = 0;
};

// INVALID_ARGUMENT naming the field when an option is out of range (NaN included).
absl::Status ValidateSamplingOptions(const SamplingOptions& options);

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {}

  // Picks a token. Greedy ties go to the lowest id (as torch.argmax). Filters apply in
  // the order temperature, top-k, top-p, min-p (Hugging Face's warper order).
  int32_t Sample(absl::Span<const float> logits);
  // Temperature 0: Sample is ArgMax and draws nothing from the generator, so a caller
  // may take the argmax elsewhere (Model::DecodeStepGreedy) without changing the stream.
  bool greedy() const { return options_.temperature == 0.0f; }

  // The generator's state, so that a sequence sampled on one worker continues on
  // another exactly as it would have in one process (opaque text of std::mt19937_64).
  std::string SaveState() const;
  // INVALID_ARGUMENT for a state SaveState did not write.
  absl::Status RestoreState(std::string_view state);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

int32_t ArgMax(absl::Span<const float> logits);

}  // namespace kvgate::engine
