#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace kvgate::engine {

absl::Status ValidateSamplingOptions(const SamplingOptions& o) {
  if (!std::isfinite(o.temperature) || o.temperature < 0.0f) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.temperature must be finite and >= 0, got ", o.temperature));
  }
  if (!std::isfinite(o.top_p) || o.top_p <= 0.0f || o.top_p > 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.top_p must be in (0, 1], got ", o.top_p));
  }
  if (o.top_k < -1) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.top_k must be -1, 0 (disabled) or positive, got ", o.top_k));
  }
  if (!std::isfinite(o.min_p) || o.min_p < 0.0f || o.min_p > 1.0f) {
    return absl::InvalidArgumentError(absl::StrCat("sampling.min_p must be in [0, 1], got ", o.min_p));
  }
  return absl::OkStatus();
}

std::string Sampler::SaveState() const {
  std::ostringstream out;
  out << rng_;
  return out.str();
}

absl::Status Sampler::RestoreState(std::string_view state) {
  std::istringstream in{std::string(state)};
  std::mt19937_64 restored;
  in >> restored;
  if (in.fail()) return absl::InvalidArgumentError("sampler state is not a std::mt19937_64 state");
  rng_ = restored;
  return absl::OkStatus();
}

int32_t ArgMax(absl::Span<const float> logits) {
  int32_t best = 0;
  for (int32_t i = 1; i < static_cast<int32_t>(logits.size()); ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

int32_t Sampler::Sample(absl::Span<const float> logits) {
  if (options_.temperature == 0.0f) return ArgMax(logits);
  const int32_t vocab = static_cast<int32_t>(logits.size());
  candidates_.resize(vocab);
  for (int32_t i = 0; i < vocab; ++i) candidates_[i] = {logits[i] / options_.temperature, i};
  // Descending by logit, ties by lower id, so filtering is deterministic.
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  int32_t kept = vocab;
  if (options_.top_k > 0 && options_.top_k < vocab) {
    std::partial_sort(candidates_.begin(), candidates_.begin() + options_.top_k, candidates_.end(), by_logit);
    kept = options_.top_k;
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  const float max_logit = candidates_[0].first;
  std::vector<double> probs(kept);
  double total = 0.0;
  for (int32_t i = 0; i < kept; ++i) {
    probs[i] = std::exp(static_cast<double>(candidates_[i].first - max_logit));
    total += probs[i];
  }
  for (double& p : probs) p /= total;
  if (options_.top_p < 1.0f) {
    double cumulative = 0.0;
    int32_t cut = kept;
    for (int32_t i = 0; i < kept; ++i) {
      cumulative += probs[i];
      if (cumulative >= options_.top_p) {
        cut = i + 1;
        break;
      }
    }
    kept = cut;
  }
  if (options_.min_p > 0.0f) {
    const double threshold = options_.min_p * probs[0];
    int32_t cut = 1;
    while (cut < kept && probs[cut] >= threshold) ++cut;
    kept = cut;
  }
  double mass = 0.0;
  for (int32_t i = 0; i < kept; ++i) mass += probs[i];
  std::uniform_real_distribution<double> uniform(0.0, mass);
  double draw = uniform(rng_);
  for (int32_t i = 0; i < kept; ++i) {
    draw -= probs[i];
    if (draw <= 0.0) return candidates_[i].second;
  }
  return candidates_[kept - 1].second;
}

}  // namespace kvgate::engine
