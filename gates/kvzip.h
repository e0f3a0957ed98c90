// File: KVzip scoring (arXiv 2505.23416; eviction-methods.md section 4): the importance of a
// KV pair is the most attention it receives while the model reconstructs its context
// chunk. The engine runs the reconstruction forwards (PolicyInputs::kvzip_chunks, format in
// gates/policy.h); this file turns their queries and keys into scores and a KeepPlan.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "gates/eviction_spec.h"
#include "gates/policy.h"
#include "gates/selectors.h"

namespace kvgate::gates {

inline constexpr int32_t kKvzipChunkTokens = 2000;  // KVzip repo (kvpress uses 2048)
inline constexpr int32_t kKvzipDefaultSink = 4;     // kvpress n_sink

// `rows` key rows of head_dim floats per kv head; head h's row r is at
// data + h * head_stride + r * head_dim. Lets a view point into a [H_kv, n, d] cache.
struct KeyRows {
  const float* data = nullptr;
  int64_t head_stride = 0;  // floats between consecutive kv heads
  int32_t rows = 0;
};

// One layer of one reconstruction forward.
struct KvzipLayerInput {
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t num_queries = 0;        // q_len
  const float* queries = nullptr; // [num_queries, num_q_heads, head_dim], post-RoPE
  KeyRows sink_keys;              // the prompt's first keys (system prompt / sinks)
  KeyRows chunk_keys;             // the chunk's keys [begin, end) in the prompt cache
  KeyRows own_keys;               // the reconstruction tokens' keys; rows == num_queries
};

// Pure KVzip score of one layer and chunk (KVzip attention/score.py::_get_score, section
// 4.1): for reconstruction query i of query head q (group of kv head h), logits
// q_i . k / sqrt(head_dim) over the key subset [sink | chunk | own keys 0..i] (own keys
// causal), softmax over that subset only (other chunks are not in the denominator), and
//   score[h, j] = max over the G query heads of group h and over all i of prob_i(chunk key j).
// Returns [num_kv_heads, chunk_keys.rows], values in [0, 1]. Double accumulation.
std::vector<float> KvzipScores(const KvzipLayerInput& input);

// Context chunks [begin, end) that cover [context_begin, n) in steps of chunk_tokens
// (KVzip self_task / kvpress _chunk_fn: the last chunk may be shorter).
std::vector<TokenRange> KvzipChunkRanges(int32_t context_begin, int32_t prompt_tokens,
                                         int32_t chunk_tokens = kKvzipChunkTokens);

// Merges the chunks into a grid over the whole prompt: a position scored by one or more
// chunks gets the max of their scores; a position no chunk covers (the system prompt, or
// anything the engine chose not to score) gets 1.0, the largest possible score, so such
// rows rank first (protect them explicitly to keep them regardless of the budget).
// INVALID_ARGUMENT for chunks that do not fit the capture.
absl::StatusOr<ScoreGrid> KvzipScoreGrid(const PrefillCapture& capture,
                                         const std::vector<KvzipChunk>& chunks);

// Policy: global threshold over all layers and kv heads (KVzip "pair", default), per-head
// top-k with head_budget kUniform ("pair-uniform"), AdaKV with kAdaptive.
std::unique_ptr<Policy> MakeKvzipPolicy(const ModelShape& shape, int32_t chunk_tokens,
                                        float adakv_safeguard);

}  // namespace kvgate::gates
