// File: test-only helpers shared by the kv/ tests: keep plans from position
// lists, random keep plans, and position-coded row values that are exact in float32.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "engine/model_config.h"
#include "gates/keep_plan.h"

namespace kvgate::kv::testing {

// A Llama config small enough for pool tests: vocab 16, hidden 8, MLP 16, 64 tokens of
// context, with the given layers and heads.
inline engine::ModelConfig SmallLlamaConfig(int32_t num_layers, int32_t num_q_heads, int32_t num_kv_heads,
                                            int32_t head_dim) {
  engine::ModelConfig c;
  c.architecture_name = "LlamaForCausalLM";
  c.vocab_size = 16;
  c.hidden_size = 8;
  c.intermediate_size = 16;
  c.num_layers = num_layers;
  c.num_heads = num_q_heads;
  c.num_kv_heads = num_kv_heads;
  c.head_dim = head_dim;
  c.max_context_tokens = 64;
  return c;
}

// layer * 1e6 + kv_head * 1e4 + position * 10 + dim: exact in float32 while the value is
// below 2^24 (layers < 16, kv heads < 100, positions < 1000, dims < 10).
inline float CodedValue(int32_t layer, int32_t kv_head, int32_t position, int32_t dim) {
  return static_cast<float>(layer * 1000000 + kv_head * 10000 + position * 10 + dim);
}
// The V twin of CodedValue: negated, so K and V rows can never be confused.
inline float CodedV(int32_t layer, int32_t kv_head, int32_t position, int32_t dim) {
  return -CodedValue(layer, kv_head, position, dim) - 0.5f;
}

// The coded K and V of one decode step of a batch, [positions.size(), num_kv_heads, dim]
// of `layer`: sequence s's token at positions[s].
struct CodedStepRows {
  std::vector<float> k, v;
};
inline CodedStepRows CodedRowsAt(int32_t layer, const std::vector<int32_t>& positions, int32_t num_kv_heads,
                                 int32_t dim) {
  CodedStepRows rows;
  for (int32_t position : positions) {
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      for (int32_t d = 0; d < dim; ++d) {
        rows.k.push_back(CodedValue(layer, h, position, d));
        rows.v.push_back(CodedV(layer, h, position, d));
      }
    }
  }
  return rows;
}

// A plan from explicit positions per head, [layer * num_kv_heads + kv_head].
inline gates::KeepPlan PlanOf(int32_t num_layers, int32_t num_kv_heads, int32_t prompt_tokens,
                              std::vector<std::vector<int32_t>> positions) {
  gates::KeepPlan plan{num_layers, num_kv_heads, prompt_tokens, {}};
  plan.heads.resize(positions.size());
  for (size_t i = 0; i < positions.size(); ++i) plan.heads[i].positions = std::move(positions[i]);
  return plan;
}

// A random ascending subset of `from` of exactly `count` elements.
inline std::vector<int32_t> RandomSubset(const std::vector<int32_t>& from, size_t count, std::mt19937& rng) {
  std::vector<size_t> idx(from.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::shuffle(idx.begin(), idx.end(), rng);
  idx.resize(std::min(count, idx.size()));
  std::sort(idx.begin(), idx.end());
  std::vector<int32_t> out;
  for (size_t i : idx) out.push_back(from[i]);
  return out;
}

// Keeps round(ratio * |current|) rows per head, chosen at random per head.
inline gates::KeepPlan RandomKeep(int32_t num_layers, int32_t num_kv_heads, int32_t prompt_tokens,
                                  const std::vector<std::vector<int32_t>>& current, double ratio,
                                  std::mt19937& rng) {
  std::vector<std::vector<int32_t>> kept;
  for (const std::vector<int32_t>& head : current) {
    const size_t count = static_cast<size_t>(ratio * static_cast<double>(head.size()) + 0.5);
    kept.push_back(RandomSubset(head, count, rng));
  }
  return PlanOf(num_layers, num_kv_heads, prompt_tokens, std::move(kept));
}

}  // namespace kvgate::kv::testing
