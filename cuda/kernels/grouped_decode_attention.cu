#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention_core.cuh"
#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/grouped_decode_attention.cuh"

namespace kvgate::ops {
namespace {

constexpr int kWarps = kGroupedDecodeBlockSize / 32;
// Rows a team loads before it scores them: 2 x kRowsPerTeamStep 16-byte loads in flight
// per lane.
constexpr int kRowsPerTeamStep = 4;

__device__ __forceinline__ float Dot4(const float4& a, const float4& b) {
  return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, a.x * b.x)));
}

// blockIdx.x = kv head, blockIdx.y = split of the visible rows, blockIdx.z = query token.
// A team of D / 4 lanes holds one K/V row (one float4 per lane); a warp has 32 / (D / 4)
// teams, each walking kRowsPerTeamStep consecutive rows per step. Every lane keeps, for
// each of the G query heads of the group, its 4 dims of q, of the accumulator, and the
// running max and sum (equal across its team). The teams merge in shared memory.
template <int D, int G>
__global__ void __launch_bounds__(kGroupedDecodeBlockSize)
    GroupedDecodeAttentionKernel(AttentionArgs args, int32_t rows_per_split, float* partials) {
  constexpr int kTeamLanes = D / 4;
  constexpr int kTeamsPerWarp = 32 / kTeamLanes;
  constexpr int kTeams = kWarps * kTeamsPerWarp;
  constexpr int kRows = kRowsPerTeamStep;
  const int32_t kv = blockIdx.x, split = blockIdx.y, t = blockIdx.z;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int team_in_warp = lane / kTeamLanes, part = lane % kTeamLanes;
  const int team = warp * kTeamsPerWarp + team_in_warp;

  const attention_core::VisibleRows visible = attention_core::Visible(args, t);
  const int64_t first64 = static_cast<int64_t>(visible.lo) + static_cast<int64_t>(split) * rows_per_split;
  const int64_t split_end = first64 + rows_per_split - 1;
  const int32_t last = static_cast<int32_t>(split_end < visible.hi ? split_end : visible.hi);
  const int32_t first = static_cast<int32_t>(first64 <= last ? first64 : last + 1);

  const int64_t head0 = static_cast<int64_t>(t) * args.num_q_heads + static_cast<int64_t>(kv) * G;
  float4 q[G];
#pragma unroll
  for (int g = 0; g < G; ++g) q[g] = reinterpret_cast<const float4*>(args.q + (head0 + g) * D)[part];
  const int64_t head_offset = static_cast<int64_t>(kv) * args.capacity_tokens * D;
  const float4* k = reinterpret_cast<const float4*>(args.k_cache + head_offset);
  const float4* v = reinterpret_cast<const float4*>(args.v_cache + head_offset);
  const bool per_query_head = args.key_mask_per_query_head;
  const uint8_t* mask =
      args.key_mask == nullptr
          ? nullptr
          : args.key_mask + static_cast<int64_t>(per_query_head ? kv * G : kv) * args.capacity_tokens;
  constexpr uint32_t kAllHeads = (1u << G) - 1;

  float m[G], l[G];
  float4 acc[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
    acc[g] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  // The loop bounds are the same for every lane of a warp (the shuffles need that);
  // rows past `last` are dead lanes of the step.
  for (int32_t base = first + warp * kTeamsPerWarp * kRows; base <= last; base += kTeams * kRows) {
    float4 kr[kRows], vr[kRows];
    uint32_t sees[kRows];  // bit g: query head g of the group sees the row
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int32_t j = base + team_in_warp * kRows + r;
      uint32_t bits = 0;
      if (j <= last) {
        if (mask == nullptr || j == visible.hi) {
          bits = kAllHeads;
        } else if (!per_query_head) {
          bits = mask[j] != 0 ? kAllHeads : 0u;
        } else {
#pragma unroll
          for (int g = 0; g < G; ++g) bits |= static_cast<uint32_t>(mask[static_cast<int64_t>(g) * args.capacity_tokens + j] != 0) << g;
        }
      }
      sees[r] = bits;
      const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      kr[r] = bits != 0 ? k[static_cast<int64_t>(j) * kTeamLanes + part] : zero;
      vr[r] = bits != 0 ? v[static_cast<int64_t>(j) * kTeamLanes + part] : zero;
    }
    float s[G][kRows];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = Dot4(q[g], kr[r]);
#pragma unroll
        for (int offset = kTeamLanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        s[g][r] = (sees[r] >> g) & 1u ? dot * args.scale : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float step_max = m[g];
#pragma unroll
      for (int r = 0; r < kRows; ++r) step_max = fmaxf(step_max, s[g][r]);
      if (step_max == -INFINITY) continue;  // nothing seen yet by this head
      const float correction = expf(m[g] - step_max);  // 0 while m[g] is -inf
      l[g] *= correction;
      acc[g].x *= correction;
      acc[g].y *= correction;
      acc[g].z *= correction;
      acc[g].w *= correction;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        // A hidden row contributes nothing, and its V (maybe NaN) is never multiplied.
        if (s[g][r] == -INFINITY) continue;
        const float p = expf(s[g][r] - step_max);
        l[g] += p;
        acc[g].x = fmaf(p, vr[r].x, acc[g].x);
        acc[g].y = fmaf(p, vr[r].y, acc[g].y);
        acc[g].z = fmaf(p, vr[r].z, acc[g].z);
        acc[g].w = fmaf(p, vr[r].w, acc[g].w);
      }
      m[g] = step_max;
    }
  }

  __shared__ float team_max[kTeams][G];
  __shared__ float team_sum[kTeams][G];
  __shared__ float4 team_acc[kTeams][G][kTeamLanes];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (part == 0) {
      team_max[team][g] = m[g];
      team_sum[team][g] = l[g];
    }
    team_acc[team][g][part] = acc[g];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < G * kTeamLanes; idx += blockDim.x) {
    const int g = idx / kTeamLanes, c = idx % kTeamLanes;
    float block_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kTeams; ++i) block_max = fmaxf(block_max, team_max[i][g]);
    float total = 0.0f;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < kTeams; ++i) {
      if (team_max[i][g] == -INFINITY) continue;  // a team that saw no row
      const float w = expf(team_max[i][g] - block_max);
      total += team_sum[i][g] * w;
      const float4 a = team_acc[i][g][c];
      o.x = fmaf(a.x, w, o.x);
      o.y = fmaf(a.y, w, o.y);
      o.z = fmaf(a.z, w, o.z);
      o.w = fmaf(a.w, w, o.w);
    }
    const int64_t token_head = head0 + g;
    if (partials == nullptr) {
      float* out = args.out + token_head * D + 4 * c;
      // Divide (not multiply by the inverse): the reference divides.
      out[0] = total > 0.0f ? o.x / total : 0.0f;
      out[1] = total > 0.0f ? o.y / total : 0.0f;
      out[2] = total > 0.0f ? o.z / total : 0.0f;
      out[3] = total > 0.0f ? o.w / total : 0.0f;
    } else {
      float* partial = partials + (token_head * gridDim.y + split) * attention_core::PartialFloats(D);
      if (c == 0) {
        partial[0] = block_max;
        partial[1] = total;
      }
      partial[2 + 4 * c] = o.x;
      partial[3 + 4 * c] = o.y;
      partial[4 + 4 * c] = o.z;
      partial[5 + 4 * c] = o.w;
    }
  }
}

template <int D>
void LaunchForDim(const AttentionArgs& args, const dim3& grid, int32_t rows_per_split, float* partials,
                  cudaStream_t stream) {
  const int group = args.num_q_heads / args.num_kv_heads;
  switch (group) {
#define KVGATE_GROUPED_CASE(G)                                                                              \
  case G:                                                                                                   \
    GroupedDecodeAttentionKernel<D, G><<<grid, kGroupedDecodeBlockSize, 0, stream>>>(args, rows_per_split, \
                                                                                     partials);            \
    break;
    KVGATE_GROUPED_CASE(1)
    KVGATE_GROUPED_CASE(2)
    KVGATE_GROUPED_CASE(3)
    KVGATE_GROUPED_CASE(4)
    KVGATE_GROUPED_CASE(5)
    KVGATE_GROUPED_CASE(6)
    KVGATE_GROUPED_CASE(7)
    KVGATE_GROUPED_CASE(8)
#undef KVGATE_GROUPED_CASE
    default:
      break;  // excluded by GroupedDecodeAttentionSupported
  }
}

}  // namespace

bool GroupedDecodeAttentionSupported(const AttentionArgs& args) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return args.num_tokens >= 1 && args.num_tokens <= kGroupedDecodeMaxTokens &&
         (args.head_dim == 64 || args.head_dim == 128) && args.num_kv_heads > 0 && args.num_q_heads > 0 &&
         args.num_q_heads % args.num_kv_heads == 0 && args.num_q_heads / args.num_kv_heads <= kGroupedDecodeMaxGroup &&
         args.num_kv_heads <= 65535 && args.capacity_tokens >= 0 && args.q_start_row >= 0 &&
         args.sliding_window >= 0 && static_cast<int64_t>(args.q_start_row) + args.num_tokens <= args.capacity_tokens &&
         aligned16(args.q) && aligned16(args.k_cache) && aligned16(args.v_cache) && aligned16(args.out);
}

AttentionPlan PlanGroupedDecodeAttention(const AttentionArgs& args, int num_sms) {
  AttentionPlan plan;
  const attention_core::VisibleRows last = attention_core::Visible(args, std::max(args.num_tokens - 1, 0));
  const int32_t max_rows = std::max(last.hi - last.lo + 1, 1);
  plan.rows_per_split = max_rows;
  const int64_t blocks = static_cast<int64_t>(args.num_tokens) * args.num_kv_heads;
  if (num_sms <= 0 || blocks <= 0 || blocks >= 4 * static_cast<int64_t>(num_sms)) return plan;
  const int64_t want = (4 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks;
  const int64_t most = (max_rows + kGroupedDecodeMinRowsPerSplit - 1) / kGroupedDecodeMinRowsPerSplit;
  const int64_t splits = std::min<int64_t>({want, most, kAttentionMaxSplits});
  if (splits <= 1) return plan;
  plan.rows_per_split = static_cast<int32_t>((max_rows + splits - 1) / splits);
  plan.num_splits = (max_rows + plan.rows_per_split - 1) / plan.rows_per_split;
  if (plan.num_splits <= 1) return AttentionPlan{1, max_rows, 0};
  plan.workspace_floats =
      static_cast<int64_t>(args.num_tokens) * args.num_q_heads * plan.num_splits * attention_core::PartialFloats(args.head_dim);
  return plan;
}

absl::Status LaunchGroupedDecodeAttention(const AttentionArgs& args, const AttentionPlan& plan, float* workspace,
                                          cudaStream_t stream) {
  if (!GroupedDecodeAttentionSupported(args)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GroupedDecodeAttention: needs 1 to ", kGroupedDecodeMaxTokens, " tokens, head_dim 64 or 128, at most ",
        kGroupedDecodeMaxGroup, " query heads per kv head, rows inside the cache and 16-byte aligned tensors; got ",
        args.num_tokens, " tokens, head_dim ", args.head_dim, ", ", args.num_q_heads, "/", args.num_kv_heads, " heads"));
  }
  const attention_core::VisibleRows last = attention_core::Visible(args, args.num_tokens - 1);
  const int64_t max_rows = last.hi - last.lo + 1;
  const int64_t partial_floats = static_cast<int64_t>(args.num_tokens) * args.num_q_heads * plan.num_splits *
                                 attention_core::PartialFloats(args.head_dim);
  if (plan.num_splits < 1 || plan.num_splits > kAttentionMaxSplits || plan.rows_per_split < 1 ||
      static_cast<int64_t>(plan.num_splits) * plan.rows_per_split < max_rows ||
      (plan.num_splits > 1 && (workspace == nullptr || plan.workspace_floats < partial_floats))) {
    return absl::InvalidArgumentError(absl::StrCat("GroupedDecodeAttention: plan of ", plan.num_splits, " splits x ",
                                                   plan.rows_per_split, " rows with ", plan.workspace_floats,
                                                   " workspace floats does not fit ", max_rows, " visible rows"));
  }
  const dim3 grid(static_cast<unsigned>(args.num_kv_heads), static_cast<unsigned>(plan.num_splits),
                  static_cast<unsigned>(args.num_tokens));
  float* partials = plan.num_splits > 1 ? workspace : nullptr;
  if (args.head_dim == 64) {
    LaunchForDim<64>(args, grid, plan.rows_per_split, partials, stream);
  } else {
    LaunchForDim<128>(args, grid, plan.rows_per_split, partials, stream);
  }
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (plan.num_splits > 1) {
    const dim3 merge_grid(static_cast<unsigned>(args.num_tokens), static_cast<unsigned>(args.num_q_heads));
    attention_core::AttentionMergeKernel<<<merge_grid, kAttentionCombineBlockSize, 0, stream>>>(
        workspace, args.out, plan.num_splits, args.head_dim);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace kvgate::ops
