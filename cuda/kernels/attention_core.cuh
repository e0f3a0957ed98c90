// File: the device-side core shared by the attention kernels (attention.cu over a
// contiguous cache, head_paged_decode_attention.cu over head-paged KV): one block's
// online softmax over a range of rows, and the merge of split partials. The kernels
// differ only in where row j lives and whether the query may see it, which they pass
// as a `Rows` functor (FlashInfer's variants as compile-time hooks instead of copied
// kernels). Device code: include from .cu files only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/attention.cuh"

namespace kvgate::ops::attention_core {

constexpr int kWarps = kAttentionBlockSize / 32;
constexpr int kDimsPerLane = kAttentionMaxHeadDim / 32;
constexpr int kRows = kAttentionRowsPerStep;

// The visible rows [lo, hi] of query token t of a contiguous-cache attention, before
// key_mask (AttentionArgs' rule).
struct VisibleRows {
  int32_t lo, hi;
};
__host__ __device__ inline VisibleRows Visible(const AttentionArgs& args, int32_t t) {
  const int32_t hi = args.q_start_row + t;
  const int32_t window_lo = hi - args.sliding_window + 1;
  const int32_t lo = args.sliding_window > 0 && window_lo > 0 ? window_lo : 0;
  return {lo, hi};
}

// Floats of one split partial: (max, sum, accumulator[head_dim]).
__host__ __device__ inline int64_t PartialFloats(int head_dim) { return head_dim + 2; }

// One block (kAttentionBlockSize threads) attends query `q` ([head_dim], device) over
// rows [first, last] (empty when first > last). `rows.Locate(j, &offset)` returns
// whether row j is visible and sets the offset in elements of its K/V row within k/v
// (float, or bf16 as uint16_t, widened to float as read: KvElement); it
// must give the same answer on every lane. Lane `lane` owns dims lane + 32 * i; warp w
// walks rows first + kRows * w, stepping kRows * kWarps, with a running max, sum and
// accumulator, and the block merges its warps at the end. With partial == null it writes
// the normalised output to out[head_dim] (zeros when no row was visible); otherwise
// (max, sum, accumulator) to partial[PartialFloats(head_dim)]: max -inf, sum 0,
// accumulator 0 when no row was visible.
__device__ __forceinline__ float KvElement(const float* row, int d) { return row[d]; }
__device__ __forceinline__ float KvElement(const uint16_t* row, int d) {
  return __uint_as_float(static_cast<uint32_t>(row[d]) << 16);
}

template <typename Rows, typename T>
__device__ __forceinline__ void AttendRows(const Rows& rows, const float* __restrict__ q,
                                           const T* __restrict__ k,
                                           const T* __restrict__ v, int head_dim, float scale,
                                           int32_t first, int32_t last, float* out,
                                           float* partial) {
  __shared__ float warp_max[kWarps];
  __shared__ float warp_sum[kWarps];
  __shared__ float warp_acc[kWarps][kAttentionMaxHeadDim];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  float q_reg[kDimsPerLane];
  float acc[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    q_reg[i] = d < head_dim ? q[d] : 0.0f;
    acc[i] = 0.0f;
  }
  float running_max = -INFINITY;
  float running_sum = 0.0f;

  for (int32_t j0 = first + kRows * warp; j0 <= last; j0 += kRows * kWarps) {
    float score[kRows];
    int64_t offset[kRows];
    bool live[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      score[r] = 0.0f;
      offset[r] = 0;
      live[r] = j0 + r <= last && rows.Locate(j0 + r, &offset[r]);
      if (live[r]) {
        const T* k_row = k + offset[r];
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < head_dim) score[r] += q_reg[i] * KvElement(k_row, d);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      for (int o = 16; o > 0; o /= 2) score[r] += __shfl_xor_sync(0xffffffffu, score[r], o);
      score[r] = live[r] ? score[r] * scale : -INFINITY;
    }
    float step_max = running_max;
#pragma unroll
    for (int r = 0; r < kRows; ++r) step_max = fmaxf(step_max, score[r]);
    // Nothing visible so far nor in this step (masked rows): the state stays empty.
    if (step_max == -INFINITY) continue;
    const float correction = expf(running_max - step_max);  // 0 while running_max is -inf
    float p[kRows];
    running_sum *= correction;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      p[r] = live[r] ? expf(score[r] - step_max) : 0.0f;
      running_sum += p[r];
    }
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) acc[i] *= correction;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (live[r]) {
        const T* v_row = v + offset[r];
#pragma unroll
        for (int i = 0; i < kDimsPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < head_dim) acc[i] += p[r] * KvElement(v_row, d);
        }
      }
    }
    running_max = step_max;
  }

  // Merge the warps: scale each by exp(its max - block max); a warp that saw no row has
  // max -inf and weight 0.
  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_sum[warp] = running_sum;
  }
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < head_dim) warp_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float block_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w]);
  float weight[kWarps];
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    weight[w] = warp_max[w] == -INFINITY ? 0.0f : expf(warp_max[w] - block_max);
    total += warp_sum[w] * weight[w];
  }
  if (partial == nullptr) {
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
      float o = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) o += warp_acc[w][d] * weight[w];
      out[d] = total > 0.0f ? o / total : 0.0f;
    }
    return;
  }
  if (threadIdx.x == 0) {
    partial[0] = block_max;
    partial[1] = total;
  }
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += warp_acc[w][d] * weight[w];
    partial[2 + d] = o;
  }
}

// Block b = blockIdx.x * gridDim.y + blockIdx.y merges the num_splits partials at
// partials + b * num_splits * PartialFloats(head_dim) into out[b * head_dim + :], as
// AttendRows merges its warps. Splits that saw no row (max -inf) get weight 0 and their
// accumulator is not read; if no split saw a row the output is zeros.
static __global__ void AttentionMergeKernel(const float* __restrict__ partials,
                                            float* __restrict__ out, int num_splits,
                                            int head_dim) {
  __shared__ float split_weight[kAttentionMaxSplits];
  __shared__ float split_sum[kAttentionMaxSplits];
  const int64_t block = static_cast<int64_t>(blockIdx.x) * gridDim.y + blockIdx.y;
  const int64_t stride = PartialFloats(head_dim);
  const float* first = partials + block * num_splits * stride;
  // The splits' (max, sum) are loaded by one thread each, not walked by every thread:
  // a serial walk waits on one global load per split (9 us at 32 splits on an H200).
  for (int s = threadIdx.x; s < num_splits; s += blockDim.x) {
    split_weight[s] = first[s * stride];  // the split's max, for now
    split_sum[s] = first[s * stride + 1];
  }
  __syncthreads();
  float max_all = -INFINITY;
  for (int s = 0; s < num_splits; ++s) max_all = fmaxf(max_all, split_weight[s]);
  __syncthreads();
  for (int s = threadIdx.x; s < num_splits; s += blockDim.x) {
    const float m = split_weight[s];
    split_weight[s] = m == -INFINITY ? 0.0f : expf(m - max_all);
  }
  __syncthreads();
  float total = 0.0f;
  for (int s = 0; s < num_splits; ++s) {
    if (split_weight[s] != 0.0f) total += split_sum[s] * split_weight[s];
  }
  float* o = out + block * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int s = 0; s < num_splits; ++s) {
      if (split_weight[s] != 0.0f) acc += first[s * stride + 2 + d] * split_weight[s];
    }
    o[d] = total > 0.0f ? acc / total : 0.0f;
  }
}

}  // namespace kvgate::ops::attention_core
