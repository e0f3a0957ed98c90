// File: test-only helpers for the transport tests: small handoffs with exact,
// offset-coded rows (nccl-tests' verifiable data) and a field-by-field comparison.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "cuda/backend.h"
#include "kv/kv_handoff.h"

namespace kvgate::kv::testing {

// Every (layer, kv head) keeps a different number of rows around `rows` (0 for the
// first head); values are coded by (transfer seed, layer, head, row, dim).
inline KvHandoff CodedTransfer(const std::string& transfer_id, int32_t rows, bool masks = false,
                               bool scores = false, int32_t num_layers = 2, int32_t num_kv_heads = 3,
                               int32_t head_dim = 8) {
  KvHandoff h;
  h.transfer_id = transfer_id;
  h.request_id = "req-" + transfer_id;
  h.num_layers = num_layers;
  h.num_kv_heads = num_kv_heads;
  h.head_dim = head_dim;
  h.next_pos = 2 * rows + 10;
  h.has_query_masks = masks;
  h.has_scores = scores;
  h.first_token = 17;
  h.sampler_state = std::string("rng\0state", 9);
  h.eviction_policy = "streaming_llm";
  h.eviction_state = std::string("opaque\0state", 12);
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int32_t kv = 0; kv < num_kv_heads; ++kv) {
      HeadRows head;
      const int32_t n = (l == 0 && kv == 0) ? 0 : rows + (l * num_kv_heads + kv) % 5;
      for (int32_t r = 0; r < n; ++r) {
        head.positions.push_back(2 * r + l);
        for (int32_t d = 0; d < head_dim; ++d) {
          head.k.push_back(static_cast<float>(((l * 64 + kv) * 1024 + r) * 16 + d));
          head.v.push_back(-static_cast<float>(((l * 64 + kv) * 1024 + r) * 16 + d) - 0.5f);
        }
        if (masks) head.query_mask.push_back(static_cast<uint8_t>(1 + r % 3));
        if (scores) head.scores.push_back(0.125f * r);
      }
      h.heads.push_back(std::move(head));
    }
  }
  return h;
}

inline void ExpectSameHandoff(const KvHandoff& want, const KvHandoff& got) {
  EXPECT_EQ(got.transfer_id, want.transfer_id);
  EXPECT_EQ(got.request_id, want.request_id);
  EXPECT_EQ(got.num_layers, want.num_layers);
  EXPECT_EQ(got.num_kv_heads, want.num_kv_heads);
  EXPECT_EQ(got.head_dim, want.head_dim);
  EXPECT_EQ(got.next_pos, want.next_pos);
  EXPECT_EQ(got.has_query_masks, want.has_query_masks);
  EXPECT_EQ(got.has_scores, want.has_scores);
  EXPECT_EQ(got.first_token, want.first_token);
  EXPECT_EQ(got.sampler_state, want.sampler_state);
  EXPECT_EQ(got.eviction_policy, want.eviction_policy);
  EXPECT_EQ(got.eviction_state, want.eviction_state);
  ASSERT_EQ(got.heads.size(), want.heads.size());
  for (size_t i = 0; i < want.heads.size(); ++i) {
    EXPECT_EQ(got.heads[i].positions, want.heads[i].positions) << "head " << i;
    EXPECT_EQ(got.heads[i].k, want.heads[i].k) << "head " << i;
    EXPECT_EQ(got.heads[i].v, want.heads[i].v) << "head " << i;
    EXPECT_EQ(got.heads[i].query_mask, want.heads[i].query_mask) << "head " << i;
    EXPECT_EQ(got.heads[i].scores, want.heads[i].scores) << "head " << i;
  }
}

// `h` with its K and V rows moved into backend memory of `backend` (GatherRows order),
// as ExportSequence(..., RowsIn::kBackend) leaves them.
inline KvHandoff WithBackendRows(KvHandoff h, ops::Backend* backend) {
  auto rows = std::make_shared<BackendRows>();
  rows->backend = std::string(backend->Name());
  rows->head_dim = h.head_dim;
  for (const HeadRows& head : h.heads) rows->rows += static_cast<int64_t>(head.positions.size());
  const size_t bytes = std::max<size_t>(static_cast<size_t>(rows->rows) * h.head_dim * sizeof(float), 4);
  rows->k = *backend->Alloc(bytes);
  rows->v = *backend->Alloc(bytes);
  size_t at = 0;
  for (HeadRows& head : h.heads) {
    EXPECT_TRUE(backend->CopyToBackend(rows->k.as<float>() + at, head.k.data(), head.k.size() * sizeof(float)).ok());
    EXPECT_TRUE(backend->CopyToBackend(rows->v.as<float>() + at, head.v.data(), head.v.size() * sizeof(float)).ok());
    at += head.k.size();
    head.k.clear();
    head.v.clear();
  }
  h.backend_rows = std::move(rows);
  return h;
}

}  // namespace kvgate::kv::testing
