// File: SnapKV as in kvpress snapkv_press.py (eviction-methods.md section 6): the last w
// prompt queries vote for keys; per-head top-k, or AdaKV budgets with head_budget =
// kAdaptive. The observation window itself is always kept.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "gates/policy.h"
#include "gates/selectors.h"

namespace kvgate::gates {

inline constexpr int32_t kSnapKvWindow = 64;
inline constexpr int32_t kSnapKvKernel = 5;

// Scores of every (layer, kv head, position) from capture.keys and the last `window`
// captured queries (post-RoPE; capture.num_last_queries >= min(window, n)). With w =
// min(window, n), m = n - w, for key j < m:
//   a_q(j)   = (1/w) * sum_{i < w} softmax_j(q_{n-w+i} . k_j / sqrt(head_dim)), the softmax over
//              ALL keys j' <= n-w+i (causal), per query head q;
//   pooled(j)= (1/kernel) * sum_{t = j - kernel/2 .. j + kernel/2, 0 <= t < m} a_q(t), i.e.
//              avg_pool1d(kernel, stride 1, padding kernel/2, count_include_pad=True):
//              zero padding, always divided by `kernel` (PyTorch's default, as in kvpress);
//   score(j) = mean over the G query heads of the kv head's group of pooled(j).
// Window keys j >= m score +infinity (kvpress pads them with the max; here they are also
// protected by the policy). kernel must be odd and >= 1. Double accumulation.
// When the capture holds window_probs of exactly `window` queries (the backend scored the
// window: CaptureRequest::window_probs), they are used and keys / last_queries are not
// needed; otherwise the scores are computed here from keys and last_queries.
absl::StatusOr<ScoreGrid> SnapKvScores(const PrefillCapture& capture, int32_t window = kSnapKvWindow,
                                       int32_t kernel = kSnapKvKernel);

std::unique_ptr<Policy> MakeSnapKvPolicy(const ModelShape& shape, int32_t window, int32_t kernel,
                                         float adakv_safeguard);

}  // namespace kvgate::gates
