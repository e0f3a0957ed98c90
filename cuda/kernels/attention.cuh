// File: causal grouped-query attention on the GPU over a head-major contiguous KV cache
// (see AttentionArgs in cuda/ops.h for the visible-row rule, key_mask included).
//
// One block per (query token, query head). The block's warps split the visible rows;
// each warp keeps an online softmax (running max, running sum and a float accumulator of
// 8 dims per lane) and the block merges its warps at the end. When that grid would leave
// most SMs idle (decode: one token, a few heads), the visible rows are also split across
// blocks ("flash decoding"): each block writes an unnormalised partial (max, sum,
// accumulator) to a workspace and a second kernel merges the splits. Rows that
// key_mask hides are skipped without loading their K/V. The per-block loop and the
// merge live in attention_core.cuh, shared with head_paged_decode_attention.cu.
//
// Measured on an H100 (fp32): decode over 4096 rows, 32 q / 8 kv heads, head_dim 128:
// ~50 us; over 32768 rows: ~450 us. Prefill is bound by the per-row warp reductions and
// re-reads K/V once per query: 2048 tokens x 32 heads x 128 dims ~11 ms, 512 x 14 x 64
// ~0.3 ms; a K/V-tiled (shared memory) prefill kernel is the next step if that matters.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kAttentionBlockSize = 256;         // 8 warps; a multiple of 32
constexpr int kAttentionCombineBlockSize = 128;  // threads of the split-merge kernel
constexpr int kAttentionMaxHeadDim = 256;        // 8 dims per lane
constexpr int kAttentionRowsPerStep = 4;         // K/V rows a warp loads per step
constexpr int kAttentionMinRowsPerSplit = 128;   // fewer rows per block is not worth a split
constexpr int kAttentionMaxSplits = 64;

// How LaunchAttention spreads the work; from PlanAttention.
struct AttentionPlan {
  int32_t num_splits = 1;        // blocks per (token, q head)
  int32_t rows_per_split = 0;    // visible rows per block (the last split may see fewer)
  int64_t workspace_floats = 0;  // scratch needed; 0 when num_splits == 1
};

// Splits the visible rows when num_tokens * num_q_heads blocks would not fill the num_sms
// SMs, aiming at about 4 blocks per SM of at least kAttentionMinRowsPerSplit rows each;
// num_sms <= 0 never splits. Pure host arithmetic; LaunchAttention validates args.
AttentionPlan PlanAttention(const AttentionArgs& args, int num_sms);

// All pointers in args are device memory; `workspace` holds plan.workspace_floats floats
// of device memory (null when 0), used by this launch only, in stream order. Returns
// INVALID_ARGUMENT for head_dim outside [1, 256], num_q_heads not a multiple of
// num_kv_heads, negative sizes or window, query rows outside the cache, or a plan that
// does not fit the args; 0 tokens is a no-op.
absl::Status LaunchAttention(const AttentionArgs& args, const AttentionPlan& plan, float* workspace,
                             cudaStream_t stream);

// The default grid: one block per (token, q head), no workspace.
absl::Status LaunchAttention(const AttentionArgs& args, cudaStream_t stream);

}  // namespace kvgate::ops
