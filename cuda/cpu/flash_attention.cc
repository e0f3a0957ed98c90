// Tiled attention on SGEMM calls; see flash_attention.h for the algorithm and contract.
#include "cuda/cpu/flash_attention.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kvgate::ops {
namespace {

// Below this many multiply-adds a call runs on the caller's thread: waking the pool
// costs more than it saves (decode through Forward over a short cache, say).
constexpr int64_t kMinParallelMacs = int64_t{1} << 18;

// Cephes expf: n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), e^r by a degree-6
// polynomial on [-ln2/2, ln2/2], times 2^n built in the exponent bits. Branch-free so the
// row loops below vectorize.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kExpMinArg = -87.0f;        // below: 0 (the result would be subnormal)

inline float ExpInline(float x) {
  const float xc = x < kExpMinArg ? kExpMinArg : x;  // also maps -inf to a finite value
  const float n = (xc * kLog2e + kRoundMagic) - kRoundMagic;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < kExpMinArg ? 0.0f : p * two_n;
}

// The per-element loops of the softmax, built for the widest vector unit present
// (resolved once at load time). Each returns what its row needs; none allocates.
// Not under ThreadSanitizer: a clone's ifunc resolver runs while the dynamic loader
// relocates, before the TSan runtime is up, and the instrumented resolver segfaults
// (every TSan binary died before main; scripts/tsan-service-tests.sh).
#if defined(__SANITIZE_THREAD__)
#define KVGATE_VECTOR_CLONES
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVGATE_VECTOR_CLONES
#endif
#endif
#ifndef KVGATE_VECTOR_CLONES
#define KVGATE_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

// Rows are walked in chunks of kLanes with kLanes partial results, a shape the vectorizer
// maps onto one AVX-512 register (two AVX2, four SSE); the partials combine in a fixed
// tree at the end. Clones may still differ in the last bit (FMA contraction in ExpInline);
// the parity test's error bound covers any of them.
constexpr int kLanes = 16;

// max(s[0..n)), -inf for an all-masked row.
KVGATE_VECTOR_CLONES float RowMax(const float* s, int n) {
  float m[kLanes];
  for (float& x : m) x = -INFINITY;
  int c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) m[j] = s[c + j] > m[j] ? s[c + j] : m[j];
  }
  for (; c < n; ++c) m[0] = s[c] > m[0] ? s[c] : m[0];
  float out = m[0];
  for (int j = 1; j < kLanes; ++j) out = m[j] > out ? m[j] : out;
  return out;
}

// s[c] <- exp(s[c] - max) in place; returns the sum (kLanes partial sums, fixed order).
KVGATE_VECTOR_CLONES float ExpShiftAndSum(float* s, int n, float max) {
  float acc[kLanes];
  for (float& x : acc) x = 0.0f;
  int c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float e = ExpInline(s[c + j] - max);
      s[c + j] = e;
      acc[j] += e;
    }
  }
  for (; c < n; ++c) {
    s[c] = ExpInline(s[c] - max);
    acc[0] += s[c];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return acc[0];
}

KVGATE_VECTOR_CLONES void ScaleRow(float* x, int n, float factor) {
  for (int i = 0; i < n; ++i) x[i] *= factor;
}

// Scratch of one worker, reused across its items.
struct Scratch {
  std::vector<float> q;        // [rows, head_dim] packed queries of the tile
  std::vector<float> s;        // [rows, key_block] scores, then weights
  std::vector<float> o;        // [rows, head_dim] unnormalised output
  std::vector<float> v;        // [key_block, head_dim] V with dead rows zeroed
  std::vector<float> row_max;  // [rows]
  std::vector<float> row_sum;  // [rows]
  std::vector<uint8_t> live;   // [key_block]
};

struct Plan {
  const AttentionArgs* a;
  int32_t group;            // query heads per kv head
  int32_t tile_tokens;      // tokens per query tile
  int32_t num_tiles;
  int32_t key_block;        // keys per block
};

// The first and last cache rows query token t sees (before the key mask).
inline int32_t LastRow(const AttentionArgs& a, int32_t t) { return a.q_start_row + t; }
inline int32_t FirstRow(const AttentionArgs& a, int32_t t) {
  return a.sliding_window > 0 ? std::max(0, LastRow(a, t) - a.sliding_window + 1) : 0;
}

void RunItem(const Plan& plan, int32_t kv_head, int32_t tile, Scratch& w) {
  const AttentionArgs& a = *plan.a;
  const int32_t group = plan.group, d = a.head_dim;
  const int32_t t0 = tile * plan.tile_tokens;
  const int32_t t1 = std::min(a.num_tokens, t0 + plan.tile_tokens);
  const int32_t rows = (t1 - t0) * group;
  const int32_t kb_first = FirstRow(a, t0), kb_last = LastRow(a, t1 - 1);

  // Pack Q: row m = (t - t0) * group + j holds query head kv_head * group + j of token t.
  for (int32_t t = t0; t < t1; ++t) {
    const float* src = a.q + (static_cast<int64_t>(t) * a.num_q_heads + kv_head * group) * d;
    std::memcpy(w.q.data() + static_cast<int64_t>(t - t0) * group * d, src,
                sizeof(float) * group * d);
  }
  std::fill_n(w.o.begin(), static_cast<int64_t>(rows) * d, 0.0f);
  std::fill_n(w.row_max.begin(), rows, -INFINITY);
  std::fill_n(w.row_sum.begin(), rows, 0.0f);

  const int64_t head_offset = static_cast<int64_t>(kv_head) * a.capacity_tokens * d;
  const float* k_head = a.k_cache + head_offset;
  const float* v_head = a.v_cache + head_offset;
  // Mask row of packed row m: per query head (kv_head * group + m % group) or per kv head.
  const auto mask_of = [&](int32_t m) -> const uint8_t* {
    if (a.key_mask == nullptr) return nullptr;
    const int32_t mask_row = a.key_mask_per_query_head ? kv_head * group + m % group : kv_head;
    return a.key_mask + static_cast<int64_t>(mask_row) * a.capacity_tokens;
  };
  const int32_t mask_rows_in_group = a.key_mask_per_query_head ? group : 1;
  const uint8_t* group_mask = a.key_mask == nullptr
                                  ? nullptr
                                  : a.key_mask + static_cast<int64_t>(a.key_mask_per_query_head ? kv_head * group : kv_head) *
                                                     a.capacity_tokens;
  const int32_t kb_size = plan.key_block;

  for (int32_t kb = kb_first; kb <= kb_last; kb += kb_size) {
    const int32_t nb = std::min(kb_size, kb_last - kb + 1);
    float* s = w.s.data();
    // S[rows, nb] = scale * Q K[kb:kb+nb]^T, leading dimension kb_size.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, nb, d, a.scale, w.q.data(), d,
                k_head + static_cast<int64_t>(kb) * d, d, 0.0f, s, kb_size);

    // Visibility: rows [FirstRow, LastRow] of each query, minus evicted rows that are not
    // the query's own. Masking only where some row of the block can be invisible.
    const bool causal_edge = kb + nb - 1 > LastRow(a, t0);
    const bool window_edge = a.sliding_window > 0 && kb < FirstRow(a, t1 - 1);
    if (causal_edge || window_edge || a.key_mask != nullptr) {
      for (int32_t m = 0; m < rows; ++m) {
        const int32_t t = t0 + m / group;
        const int32_t last = LastRow(a, t), first = FirstRow(a, t);
        float* srow = s + static_cast<int64_t>(m) * kb_size;
        const int32_t c_lo = std::clamp(first - kb, 0, nb), c_hi = std::clamp(last - kb + 1, 0, nb);
        for (int32_t c = 0; c < c_lo; ++c) srow[c] = -INFINITY;
        for (int32_t c = c_hi; c < nb; ++c) srow[c] = -INFINITY;
        if (const uint8_t* mask = mask_of(m); mask != nullptr) {
          for (int32_t c = c_lo; c < c_hi; ++c) {
            if (mask[kb + c] == 0 && kb + c != last) srow[c] = -INFINITY;
          }
        }
      }
    }

    // V rows no query of this tile sees (evicted, not a query's own row) may hold NaN;
    // 0 * NaN would poison the P V product, so such a block goes through a copy with
    // those rows zeroed. Rows from LastRow(t0) on are the tile's own rows: always live.
    const float* v_block = v_head + static_cast<int64_t>(kb) * d;
    if (group_mask != nullptr) {
      bool any_dead = false;
      for (int32_t c = 0; c < nb; ++c) {
        const int32_t r = kb + c;
        bool live = r >= LastRow(a, t0);
        for (int32_t j = 0; j < mask_rows_in_group && !live; ++j) {
          live = group_mask[static_cast<int64_t>(j) * a.capacity_tokens + r] != 0;
        }
        w.live[c] = live;
        any_dead |= !live;
      }
      if (any_dead) {
        for (int32_t c = 0; c < nb; ++c) {
          float* dst = w.v.data() + static_cast<int64_t>(c) * d;
          if (w.live[c]) {
            std::memcpy(dst, v_block + static_cast<int64_t>(c) * d, sizeof(float) * d);
          } else {
            std::fill_n(dst, d, 0.0f);
          }
        }
        v_block = w.v.data();
      }
    }

    // Online softmax: rescale what was summed under the old maximum.
    for (int32_t m = 0; m < rows; ++m) {
      float* srow = s + static_cast<int64_t>(m) * kb_size;
      const float block_max = RowMax(srow, nb);
      const float new_max = std::max(w.row_max[m], block_max);
      if (new_max == -INFINITY) {  // nothing visible yet (a window edge): weights 0
        std::fill_n(srow, nb, 0.0f);
        continue;
      }
      const float block_sum = ExpShiftAndSum(srow, nb, new_max);
      if (new_max != w.row_max[m]) {
        const float correction = FastExp(w.row_max[m] - new_max);  // 0 on the first block
        w.row_sum[m] *= correction;
        ScaleRow(w.o.data() + static_cast<int64_t>(m) * d, d, correction);
        w.row_max[m] = new_max;
      }
      w.row_sum[m] += block_sum;
    }
    // O[rows, d] += P[rows, nb] V[kb:kb+nb].
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, d, nb, 1.0f, s, kb_size, v_block,
                d, 1.0f, w.o.data(), d);
  }

  // Normalise and scatter back to [token, query head, head_dim].
  for (int32_t m = 0; m < rows; ++m) {
    const int32_t t = t0 + m / group, h = kv_head * group + m % group;
    const float inv = 1.0f / w.row_sum[m];
    const float* src = w.o.data() + static_cast<int64_t>(m) * d;
    float* dst = a.out + (static_cast<int64_t>(t) * a.num_q_heads + h) * d;
    for (int32_t i = 0; i < d; ++i) dst[i] = src[i] * inv;
  }
}

}  // namespace

float FastExp(float x) { return ExpInline(x); }

int FlashAttentionKeyBlock(int head_dim) {
  const int64_t keys = kOpenBlasSingleThreadMnk / (int64_t{kFlashAttentionQueryRows} * std::max(1, head_dim));
  return static_cast<int>(std::clamp<int64_t>(keys, 8, 256) / 8 * 8);
}

void FlashAttention(const AttentionArgs& a, ThreadPool& pool) {
  if (a.num_tokens <= 0 || a.num_q_heads <= 0) return;
  assert(a.num_kv_heads > 0 && a.num_q_heads % a.num_kv_heads == 0);
  assert(a.head_dim > 0 && a.q_start_row >= 0);
  assert(a.q_start_row + a.num_tokens <= a.capacity_tokens);
  Plan plan;
  plan.a = &a;
  plan.group = a.num_q_heads / a.num_kv_heads;
  plan.tile_tokens = std::max(1, kFlashAttentionQueryRows / plan.group);
  plan.num_tiles = (a.num_tokens + plan.tile_tokens - 1) / plan.tile_tokens;
  plan.key_block = FlashAttentionKeyBlock(a.head_dim);
  const int32_t key_block = plan.key_block;
  const int64_t num_items = static_cast<int64_t>(plan.num_tiles) * a.num_kv_heads;
  const int32_t max_rows = plan.tile_tokens * plan.group;

  // Items from the last tile (the most keys under a causal mask) to the first, kv heads
  // interleaved, handed out one at a time: the longest items start first.
  std::atomic<int64_t> next{0};
  const auto worker = [&](int64_t, int64_t) {
    Scratch w;
    w.q.resize(static_cast<size_t>(max_rows) * a.head_dim);
    w.s.resize(static_cast<size_t>(max_rows) * key_block);
    w.o.resize(static_cast<size_t>(max_rows) * a.head_dim);
    w.v.resize(static_cast<size_t>(key_block) * a.head_dim);
    w.row_max.resize(max_rows);
    w.row_sum.resize(max_rows);
    w.live.resize(key_block);
    for (int64_t item = next.fetch_add(1); item < num_items; item = next.fetch_add(1)) {
      const int32_t tile = plan.num_tiles - 1 - static_cast<int32_t>(item / a.num_kv_heads);
      RunItem(plan, static_cast<int32_t>(item % a.num_kv_heads), tile, w);
    }
  };
  // Multiply-adds: two GEMMs over every (query row, visible key) pair.
  const int64_t keys = std::min<int64_t>(a.q_start_row + a.num_tokens,
                                         a.sliding_window > 0 ? a.sliding_window : INT64_MAX);
  const int64_t macs = int64_t{2} * a.num_tokens * a.num_q_heads * keys * a.head_dim;
  if (macs < kMinParallelMacs || num_items == 1) {
    worker(0, 1);
    return;
  }
  pool.ParallelFor(pool.num_threads(), worker);
}

}  // namespace kvgate::ops
