// File: AttentionBf16 on the GPU: flash-style prefill attention on tensor cores
// (mma.sync m16n8k16, bf16 operands, fp32 accumulation) over the fp32 head-major
// contiguous cache. Same function as LaunchAttention (AttentionArgs: causal, GQA,
// sliding window, per-kv-head or per-query-head key masks, a past of q_start_row rows),
// with q, K and V rounded to bf16 as they enter shared memory and the probabilities
// rounded to bf16 before they multiply V.
//
// First the visible rows of K and V are rounded into a bf16 copy in a workspace (one
// pass, under 1% of the attention time at 8k tokens). Then one block of 4 warps per (128
// query tokens, query head); each warp owns 32 query rows (two m16 tiles, so every K/V
// fragment feeds two MMAs) and keeps its scores, running max/sum (online softmax, exp2
// with the scale folded in) and output accumulator in registers. Key tiles (32 rows at
// head_dim 128, 64 at 64) are double-buffered into shared memory by cp.async, zero-filled
// beyond the last visible row and where a key mask hides a row of the past, so garbage
// or NaN in unwritten or evicted rows never reaches the sums. The heaviest (last) query
// blocks are launched first.
//
// Measured on an H200 (ncu, 8,192 tokens, 32 q / 8 kv heads, head_dim 128): 3.57 ms a
// layer, about 154 TFLOP/s: about half the rate of PyTorch's SDPA on the same shapes.
// Next: wgmma (sm_90a) or larger tiles with fewer rescales, and bf16 KV pages so the
// conversion pass goes away.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kAttentionBf16BlockM = 128;     // query tokens per block (32 per warp)
constexpr int kAttentionBf16BlockSize = 128;  // 4 warps
// Fewer query tokens than this (decode) go to LaunchAttention's split-K kernel, which
// fills the GPU better for one query row.
constexpr int kAttentionBf16MinTokens = 16;

// True when the tensor-core kernel takes these args: head_dim 64 or 128, pointers 16-byte
// aligned, at least kAttentionBf16MinTokens queries. Otherwise the backend runs the fp32
// kernel (exact fp32, inside the bf16 tolerances).
bool AttentionBf16Supported(const AttentionArgs& args);

// Bytes of device workspace LaunchAttentionBf16 needs: bf16 K and V of the
// q_start_row + num_tokens visible rows of every kv head.
size_t AttentionBf16WorkspaceBytes(const AttentionArgs& args);

// All pointers in args are device memory; `workspace` is device memory of at least
// AttentionBf16WorkspaceBytes(args), 16-byte aligned, used by this launch in stream
// order. Returns INVALID_ARGUMENT for args the fp32 kernel would reject, that
// AttentionBf16Supported refuses, or a short workspace; 0 tokens is a no-op.
absl::Status LaunchAttentionBf16(const AttentionArgs& args, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream);

}  // namespace kvgate::ops
