// File: the output of every policy: which prompt rows each (layer, kv head) keeps.
// Ids and positions only; the KV pool turns a plan into page moves.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kvgate::gates {

struct HeadKeep {
  // Ascending original positions of the kept rows.
  std::vector<int32_t> positions;
  // Empty: every query head of the group sees every kept row. Else one byte per kept
  // row: bit g set = visible to query head g of the group (sage_kv keeps a separate
  // top-k per query head; rows are stored once per kv head as the union).
  std::vector<uint8_t> query_mask;
  // Per kept row, the policy's score, for policies that keep evicting during decode
  // (fast_kvzip); empty otherwise.
  std::vector<float> scores;
};

struct KeepPlan {
  int32_t num_layers = 0;
  int32_t num_kv_heads = 0;
  int32_t prompt_tokens = 0;
  std::vector<HeadKeep> heads;  // [layer * num_kv_heads + kv_head]

  HeadKeep& at(int32_t layer, int32_t kv_head) { return heads[layer * num_kv_heads + kv_head]; }
  const HeadKeep& at(int32_t layer, int32_t kv_head) const { return heads[layer * num_kv_heads + kv_head]; }
  int64_t KeptEntries() const {
    int64_t total = 0;
    for (const HeadKeep& h : heads) total += static_cast<int64_t>(h.positions.size());
    return total;
  }
  // Every row of every head: what `full` returns.
  static KeepPlan KeepAll(int32_t num_layers, int32_t num_kv_heads, int32_t prompt_tokens) {
    KeepPlan plan{num_layers, num_kv_heads, prompt_tokens, {}};
    plan.heads.resize(static_cast<size_t>(num_layers) * num_kv_heads);
    for (HeadKeep& h : plan.heads) {
      h.positions.resize(prompt_tokens);
      for (int32_t i = 0; i < prompt_tokens; ++i) h.positions[i] = i;
    }
    return plan;
  }
};

}  // namespace kvgate::gates
