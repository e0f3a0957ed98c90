// File: a small valid KvHandoff for the handoff and chunk-stream targets' seed corpora
// (2 layers x 2 kv heads, head_dim 4, masks and scores, one empty head), so that the
// committed seeds reach past the header checks.
#pragma once

#include <cstdint>
#include <string>

#include "kv/kv_handoff.h"

namespace kvgate::fuzz {

inline kv::KvHandoff SeedHandoff(bool masks_and_scores) {
  kv::KvHandoff h;
  h.transfer_id = "seed-transfer";
  h.request_id = "seed-request";
  h.num_layers = 2;
  h.num_kv_heads = 2;
  h.head_dim = 4;
  h.next_pos = 6;
  h.has_query_masks = masks_and_scores;
  h.has_scores = masks_and_scores;
  h.first_token = 7;
  h.sampler_state = "sampler";
  const int32_t lengths[] = {3, 0, 6, 2};
  for (int i = 0; i < 4; ++i) {
    kv::HeadRows rows;
    for (int r = 0; r < lengths[i]; ++r) {
      for (int d = 0; d < h.head_dim; ++d) {
        rows.k.push_back(static_cast<float>(i * 100 + r * 10 + d));
        rows.v.push_back(-static_cast<float>(i * 100 + r * 10 + d));
      }
      rows.positions.push_back(lengths[i] == 6 ? r : 2 * r + 1);
      if (masks_and_scores) {
        rows.query_mask.push_back(static_cast<uint8_t>(r % 2));
        rows.scores.push_back(0.5f * r);
      }
    }
    h.heads.push_back(std::move(rows));
  }
  return h;
}

}  // namespace kvgate::fuzz
