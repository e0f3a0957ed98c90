// File: the Attention op (AttentionArgs: contiguous fp32 cache, causal, GQA, sliding
// window, key masks) for a few query tokens, as decode runs it. attention.cu gives each
// (token, query head) its own blocks, so the query heads of a GQA group each read their
// shared K/V rows, and a warp reads one row at a time in 4-byte lanes. Here one block
// serves every query head of one kv head: each K/V row is read once, in 16-byte vectors
// (head_dim / 4 lanes a row), and scored against all the group's queries; the rows are
// split across blocks (flash decoding) and the partials merged by attention.cu's merge
// kernel. Same reference (AttentionRef) and the same parity tests as Attention.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda/kernels/attention.cuh"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr int kGroupedDecodeMaxTokens = 8;
constexpr int kGroupedDecodeMaxGroup = 8;       // query heads per kv head
constexpr int kGroupedDecodeBlockSize = 128;    // 4 warps
constexpr int kGroupedDecodeMinRowsPerSplit = 128;

// True when args are valid Attention arguments this kernel takes: 1 to
// kGroupedDecodeMaxTokens tokens, head_dim 64 or 128, at most kGroupedDecodeMaxGroup query
// heads per kv head, 16-byte aligned q, k_cache, v_cache and out. Anything else (invalid
// arguments included, which LaunchAttention reports) stays with attention.cu.
bool GroupedDecodeAttentionSupported(const AttentionArgs& args);

// The split of the visible rows across blocks: about 4 blocks per SM of num_sms, each
// with at least kGroupedDecodeMinRowsPerSplit rows, at most kAttentionMaxSplits splits;
// workspace_floats for the partials (one per token, query head and split). Host only.
AttentionPlan PlanGroupedDecodeAttention(const AttentionArgs& args, int num_sms);

// INVALID_ARGUMENT when !GroupedDecodeAttentionSupported(args) or the plan does not fit;
// `workspace` holds plan.workspace_floats floats of device memory (null when 0).
absl::Status LaunchGroupedDecodeAttention(const AttentionArgs& args, const AttentionPlan& plan,
                                          float* workspace, cudaStream_t stream);

}  // namespace kvgate::ops
