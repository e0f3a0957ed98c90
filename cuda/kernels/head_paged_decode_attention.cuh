// File: HeadPagedDecodeAttention on the GPU: decode attention of one new token per
// sequence over a head-paged KV cache (see HeadPagedKvView and
// HeadPagedDecodeAttentionArgs in cuda/ops.h), flash-decoding style.
//
// One block of kAttentionBlockSize threads per (sequence, query head) runs the online
// softmax of attention_core.cuh (shared with attention.cu) over the rows of its seq
// head, finding row r through the page table, page_ids[page_indptr[i] + r / page_tokens]
// slot r % page_tokens, and skipping without loading K/V every row whose query_masks bit
// is clear. When that grid would leave most SMs idle (small batches), the rows are also
// split over num_splits blocks. The lengths live on the device, so the host plan fixes
// only the split count; block z of seq head i takes rows [z * share, (z + 1) * share) with
// share = max(ceil(lengths[i] / num_splits), kHeadPagedDecodeMinRowsPerSplit), so short
// heads leave their later splits empty (they exit at once), and a merge kernel combines
// the partials. A head with no visible row gets zeros (see cuda/ops.h). A second,
// grouped kernel (below) serves the common shapes with one block per (sequence, kv head).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/kernels/attention.cuh"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kHeadPagedDecodeMaxHeadDim = kAttentionMaxHeadDim;  // 256
constexpr int kHeadPagedDecodeMinRowsPerSplit = 128;  // fewer rows per block is not worth it
constexpr int kHeadPagedDecodeMaxSplits = kAttentionMaxSplits;    // 64

// How LaunchHeadPagedDecodeAttention spreads the work; from PlanHeadPagedDecodeAttention.
struct HeadPagedDecodePlan {
  int32_t num_splits = 1;        // blocks per (sequence, q head)
  int64_t workspace_floats = 0;  // scratch needed; 0 when num_splits == 1
};

// Splits the rows when num_seqs * num_q_heads blocks would not fill the num_sms SMs,
// aiming at about 4 blocks per SM; num_sms <= 0 never splits. Pure host arithmetic.
HeadPagedDecodePlan PlanHeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                                 int num_sms);

// All pointers in args are device memory; `workspace` holds plan.workspace_floats floats
// of device memory (null when 0), used by this launch only, in stream order. Returns
// INVALID_ARGUMENT for negative sizes, head_dim outside [1, 256], num_q_heads not a
// multiple of num_kv_heads, page_tokens < 1, query masks with more than 8 q heads per kv
// head, or a plan that does not fit the args; 0 sequences or q heads is a no-op. The
// page table itself (ids, lengths) is trusted, as the preconditions in cuda/ops.h say.
absl::Status LaunchHeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                            const HeadPagedDecodePlan& plan, float* workspace,
                                            cudaStream_t stream);

// The split count of `blocks` blocks (one per seq head) run in waves of blocks_per_wave
// (SMs x blocks one SM holds): the s whose blocks * s blocks, each with 1/s of the rows,
// finish in the fewest unsplit-block times, ceil(blocks * s / blocks_per_wave) / s, among
// s in [1, max_splits] with at most about two waves of blocks; ties go to fewer splits.
// Pure host arithmetic.
int32_t ChooseDecodeSplits(int64_t blocks, int64_t blocks_per_wave, int32_t max_splits);

// The grouped kernel: one block per (sequence, kv head) serves all query heads of its GQA
// group (grouped_decode_core.cuh), so each K/V row is read once, not once per query
// head, in 16-byte vectors; the rows are split across blocks by ChooseDecodeSplits, with
// the waves the kernel's occupancy gives (batch 64 at 8k on an H100: 15.42 -> 12.38 ms a
// step, bench/results/gpu-engine-batched.md 2026-12-06 23:42). KVGATE_DECODE_WAVE_SPLITS=0
// keeps the older rule (split only when the grid would not put about 4 blocks on every
// SM), for A/B runs. It takes head_dim 64 or 128, at most
// kHeadPagedGroupedMaxGroup query heads per kv head, and 16-byte aligned q, pages and out
// (HeadPagedGroupedSupported); the backend sends everything else to the kernel above.
constexpr int kHeadPagedGroupedMaxGroup = 8;
bool HeadPagedGroupedSupported(const HeadPagedDecodeAttentionArgs& args);
HeadPagedDecodePlan PlanHeadPagedGroupedDecodeAttention(const HeadPagedDecodeAttentionArgs& args, int num_sms);
// INVALID_ARGUMENT when !HeadPagedGroupedSupported(args) or the plan does not fit.
absl::Status LaunchHeadPagedGroupedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                                   const HeadPagedDecodePlan& plan, float* workspace,
                                                   cudaStream_t stream);

// The default grid: one block per (sequence, q head), no workspace.
absl::Status LaunchHeadPagedDecodeAttention(const HeadPagedDecodeAttentionArgs& args,
                                            cudaStream_t stream);

}  // namespace kvgate::ops
