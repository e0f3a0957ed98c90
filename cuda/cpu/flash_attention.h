// File: tiled ("flash-style") attention for the CPU backend. Computes AttentionArgs
// exactly as cuda/ops.h states it (AttentionRef is the oracle): causal GQA over a
// head-major contiguous cache, with a sliding window, per-kv-head or per-query-head key
// masks, and queries that start past row 0 (chunked prefill, decode through Forward).
//
// Work is split into items of (kv head, query tile). An item packs the queries of its
// tile for every query head of the kv head's group into one [rows, head_dim] matrix, then
// walks the visible key range in blocks: S = scale * Q K^T (one SGEMM), masking, an
// online softmax (running max and sum per row, float32), O += P V (one SGEMM). Items run
// on the backend's thread pool, heaviest first; each item is computed by one thread in a
// fixed order, so the result does not depend on the number of threads or on scheduling.
#pragma once

#include "cuda/cpu/parallel_for.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Query rows (tokens x query heads of one group) per tile. Keys per block follow from
// head_dim so that every SGEMM (rows x keys x head_dim) stays at or under OpenBLAS's
// single-thread threshold, m*n*k <= 65536 * GEMM_MULTITHREAD_THRESHOLD(4): a larger call
// made from a pool thread hands work to OpenBLAS's own threads and, measured on 2 cores,
// runs 50x slower (128x64x64: 0.3 GFLOP/s against 20 for 64x64x64).
constexpr int kFlashAttentionQueryRows = 64;
constexpr int64_t kOpenBlasSingleThreadMnk = 65536 * 4;
// Keys per block for a head_dim: kOpenBlasSingleThreadMnk / (64 * head_dim), clamped to
// [8, 256] and a multiple of 8 (64 for head_dim 64, 128 for 32, 32 for 128).
int FlashAttentionKeyBlock(int head_dim);

// Preconditions (asserted): num_q_heads % num_kv_heads == 0, head_dim > 0,
// q_start_row + num_tokens <= capacity_tokens. Every query sees at least its own row, so
// no softmax is empty. Evicted rows (key_mask 0, not a query's own row) may hold any bits,
// NaN included: they are never read into a sum with a nonzero weight.
void FlashAttention(const AttentionArgs& args, ThreadPool& pool);

// exp(x) for float32 in the form the softmax uses: exact 0 for x = -inf (and x < -87.3),
// relative error at most kFastExpRelError elsewhere for x <= 0. Exposed for its test.
float FastExp(float x);
constexpr float kFastExpRelError = 4.0e-7f;  // ~3.4 ulp; measured max 2 ulp, see test

}  // namespace kvgate::ops
