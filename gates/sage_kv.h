// File: SAGE-KV (arXiv 2503.08879, eviction-methods.md sections 3 and 9.2): after prefill,
// the LAST prompt token's post-RoPE query picks a separate top-k of the middle keys for
// every QUERY head; sink, recent window and the last token are shared by the group.
//
// Semantics (B = ResolvedBudget::keep_per_head, G = group size):
// - n <= B: keep everything (KeepPlan::KeepAll, no masks).
// - Defaults (when the request sets neither): sink = B/4, recent = B/4 (policy defaults
//   kDefaultQuarterOfBudget). The recent window is the last `recent` positions and
//   includes the last token; the last token is kept even with recent = 0. So the paper's
//   recent R plus its last token P_N is our recent window (R + 1 = recent).
// - Shared rows P = protected_mask (sink, recent, ranges) plus the last token; visible to
//   all G query heads (query_mask = all G bits).
// - Middle keys = every position not in P; with no ranges that is [sink, n - max(recent, 1)).
// - k = floor(max(B - |P|, 0) / G) per query head: each query head g keeps its own top-k
//   middle keys by q_g . k_j (score descending, ties to the lower position). With the
//   defaults and 4 | B, |P| = B/2 so k = B/(2G), the paper's value.
// - Stored per kv head: P union (selected rows of all G query heads), ascending; each
//   row's query_mask bit g = visible to query head g of the group.
// - Memory: rows stored per kv head = |P| + |union_g sel_g| <= |P| + G*k <= B whenever
//   |P| <= B (if |P| > B, exactly P is kept). The budget counts G*k middle entries per kv
//   head as the paper does; storing the union once costs at most that (less when query
//   heads agree), and query_mask tells the decode kernel which query head sees which row.
// - G must be <= 8 (query_mask is one byte per row).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "gates/eviction_spec.h"
#include "gates/keep_plan.h"
#include "gates/policy.h"

namespace kvgate::gates {

// Per query head scores: scores[(layer * num_q_heads + q_head) * n + position].
struct QueryHeadScores {
  int32_t num_layers = 0;
  int32_t num_q_heads = 0;
  int32_t prompt_tokens = 0;
  std::vector<float> scores;
  float at(int32_t layer, int32_t q_head, int32_t position) const {
    return scores[(static_cast<size_t>(layer) * num_q_heads + q_head) * prompt_tokens + position];
  }
};

// q . k_j / sqrt(head_dim) of the last prompt token's query (the last row of
// capture.last_queries) with every key j of the kv head of its group; double
// accumulation. Softmax would not change any per-head order, so logits are the scores.
absl::StatusOr<QueryHeadScores> SageKvScores(const PrefillCapture& capture);

// The selection above. `scores` has group_size * num_kv_heads query heads.
absl::StatusOr<KeepPlan> SageKvSelect(const QueryHeadScores& scores, int32_t group_size,
                                      const ResolvedBudget& budget);

std::unique_ptr<Policy> MakeSageKvPolicy(const ModelShape& shape);

}  // namespace kvgate::gates
