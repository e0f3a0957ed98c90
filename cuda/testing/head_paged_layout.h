// File: test-only builder of head-paged KV layouts (HeadPagedKvView in cuda/ops.h), shared
// by the CPU and CUDA backend tests: each seq head's pages are random ids scattered in a
// pool with spare pages, lengths are ragged, masks optional, and every pool slot that no
// kept row uses (spare pages, the tail of a partial last page) holds NaN, so a kernel
// that reads past a length or through a wrong page id produces NaN.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/bf16.h"
#include "cuda/ops.h"

namespace kvgate::ops::paged_testing {

struct HeadPagedLayout {
  int32_t page_tokens = 0, head_dim = 0, num_pages = 0;
  std::vector<float> k_pages, v_pages;  // [num_pages, page_tokens, head_dim]
  std::vector<int32_t> page_indptr;     // [num_seq_heads + 1]
  std::vector<int32_t> page_ids;        // [page_indptr.back()]
  std::vector<int32_t> lengths;         // [num_seq_heads]
  std::vector<uint8_t> query_masks;     // [num_pages, page_tokens], or empty = no masks
  std::vector<int32_t> first_slots;     // [num_seq_heads], or empty = every head from slot 0
  std::vector<int32_t> gap_rows;        // [num_seq_heads], or empty = no gaps
  std::vector<int32_t> gap_slots;       // [num_seq_heads], or empty = no gaps

  int32_t num_seq_heads() const { return static_cast<int32_t>(lengths.size()); }
  // Pool row (page * page_tokens + slot) of row r of seq head i.
  int64_t PoolRow(int32_t i, int32_t r) const {
    const int32_t gap = !gap_rows.empty() && r >= gap_rows[i] ? gap_slots[i] : 0;
    const int32_t slot = (first_slots.empty() ? 0 : first_slots[i]) + r + gap;
    return static_cast<int64_t>(page_ids[page_indptr[i] + slot / page_tokens]) * page_tokens +
           slot % page_tokens;
  }
  float* K(int32_t i, int32_t r) { return k_pages.data() + PoolRow(i, r) * head_dim; }
  float* V(int32_t i, int32_t r) { return v_pages.data() + PoolRow(i, r) * head_dim; }
  // A view over these host vectors.
  HeadPagedKvView HostView() const {
    HeadPagedKvView view{k_pages.data(), v_pages.data(), page_indptr.data(), page_ids.data(), lengths.data(),
                         query_masks.empty() ? nullptr : query_masks.data(), page_tokens, head_dim};
    view.first_slots = first_slots.empty() ? nullptr : first_slots.data();
    view.gap_rows = gap_rows.empty() ? nullptr : gap_rows.data();
    view.gap_slots = gap_slots.empty() ? nullptr : gap_slots.data();
    return view;
  }
};

// One seq head per entry of `lengths`. Kept rows get K, V uniform in [-1, 1]. With
// `with_masks`, every row gets random bits 0..group-1 (group <= 8), except that each
// head's last row (its new token) gets all of them, so every query head sees a row; a
// row that no query head may see holds NaN. With `with_slot_offsets`, each non-empty head
// starts at a random slot of its first page, and each head of two rows or more has a gap
// of 1 to 2 * page_tokens - 2 unused slots before a random row (a ring's layouts); the
// slots before the first and inside the gap hold NaN.
inline HeadPagedLayout MakeHeadPagedLayout(std::mt19937& rng, const std::vector<int32_t>& lengths,
                                           int32_t page_tokens, int32_t head_dim, int32_t group,
                                           bool with_masks, int32_t spare_pages, bool with_slot_offsets = false) {
  HeadPagedLayout layout;
  layout.page_tokens = page_tokens;
  layout.head_dim = head_dim;
  layout.lengths = lengths;
  if (with_slot_offsets) {
    std::uniform_int_distribution<int32_t> slot(0, page_tokens - 1);
    std::uniform_int_distribution<int32_t> gap(1, std::max(1, 2 * page_tokens - 2));
    for (int32_t length : lengths) {
      layout.first_slots.push_back(length > 0 ? slot(rng) : 0);
      const bool has_gap = length >= 2;
      layout.gap_rows.push_back(has_gap ? std::uniform_int_distribution<int32_t>(1, length - 1)(rng) : 0);
      layout.gap_slots.push_back(has_gap ? gap(rng) : 0);
    }
  }
  layout.page_indptr.push_back(0);
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int32_t slots =
        with_slot_offsets ? layout.first_slots[i] + layout.gap_slots[i] + lengths[i] : lengths[i];
    layout.page_indptr.push_back(layout.page_indptr.back() + (slots + page_tokens - 1) / page_tokens);
  }
  layout.num_pages = layout.page_indptr.back() + spare_pages;
  std::vector<int32_t> pool(layout.num_pages);
  std::iota(pool.begin(), pool.end(), 0);
  std::shuffle(pool.begin(), pool.end(), rng);
  layout.page_ids.assign(pool.begin(), pool.begin() + layout.page_indptr.back());

  const size_t pool_floats = static_cast<size_t>(layout.num_pages) * page_tokens * head_dim;
  layout.k_pages.assign(pool_floats, std::numeric_limits<float>::quiet_NaN());
  layout.v_pages.assign(pool_floats, std::numeric_limits<float>::quiet_NaN());
  std::uniform_real_distribution<float> value(-1.0f, 1.0f);
  std::uniform_int_distribution<int> bits(0, 255);
  const uint8_t all_bits = static_cast<uint8_t>((1u << group) - 1);
  if (with_masks) layout.query_masks.assign(static_cast<size_t>(layout.num_pages) * page_tokens, 0);
  for (int32_t i = 0; i < layout.num_seq_heads(); ++i) {
    for (int32_t r = 0; r < lengths[i]; ++r) {
      float* k = layout.K(i, r);
      float* v = layout.V(i, r);
      for (int32_t d = 0; d < head_dim; ++d) {
        k[d] = value(rng);
        v[d] = value(rng);
      }
      if (with_masks) {
        uint8_t& m = layout.query_masks[layout.PoolRow(i, r)];
        m = r == lengths[i] - 1 ? all_bits : static_cast<uint8_t>(bits(rng) & all_bits);
        if (m == 0) {
          std::fill_n(k, head_dim, std::numeric_limits<float>::quiet_NaN());
          std::fill_n(v, head_dim, std::numeric_limits<float>::quiet_NaN());
        }
      }
    }
  }
  return layout;
}

// The bf16 bits of every value (NaN stays NaN).
inline std::vector<Bf16> ToBf16Bits(const std::vector<float>& values) {
  std::vector<Bf16> out(values.size());
  for (size_t i = 0; i < values.size(); ++i) out[i] = F32ToBf16(values[i]);
  return out;
}

// The layout with every K/V value rounded to bf16 and kept as float32: what a bf16 view
// of ToBf16Bits(k_pages) / ToBf16Bits(v_pages) must compute, bit for bit.
inline HeadPagedLayout RoundedToBf16(HeadPagedLayout layout) {
  for (float& x : layout.k_pages) x = RoundToBf16(x);
  for (float& x : layout.v_pages) x = RoundToBf16(x);
  return layout;
}

}  // namespace kvgate::ops::paged_testing
