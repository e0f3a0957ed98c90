// File: StreamingLLM (kvpress streaming_llm_press.py): no scores; every (layer, kv head)
// keeps the attention-sink tokens and the most recent ones. The decode-time ring buffer
// (drop the oldest recent row per new token) is the decode worker's job.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "gates/eviction_spec.h"
#include "gates/keep_plan.h"
#include "gates/policy.h"

namespace kvgate::gates {

inline constexpr int32_t kStreamingLlmDefaultSink = 4;

// The positions every head keeps: the protected rows of `budget` (sink, recent, ranges),
// then the most recent others until keep_per_head rows are kept. Without protected ranges
// and with recent_tokens <= keep - sink this is exactly
// [0, sink) U [n - (keep - sink), n). If the protected rows alone exceed keep_per_head,
// exactly the protected rows. Ascending.
std::vector<int32_t> StreamingLlmPositions(const ResolvedBudget& budget);

// Same positions for every (layer, kv head).
KeepPlan StreamingLlmPlan(int32_t num_layers, int32_t num_kv_heads, const ResolvedBudget& budget);

std::unique_ptr<Policy> MakeStreamingLlmPolicy(const ModelShape& shape);

}  // namespace kvgate::gates
