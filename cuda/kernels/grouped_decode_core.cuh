// File: the block-level core of the grouped decode attention kernels: one block scores
// rows [first, last] of one kv head against all G query heads of its GQA group, reading
// each K/V row once, in 16-byte vectors. Where the rows live (a contiguous cache or
// head-paged pages) and which query heads see a row is the `Rows` policy of the caller:
// grouped_decode_attention.cu (Attention) and head_paged_decode_attention.cu
// (HeadPagedDecodeAttention). Device code only; included by those .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/attention_core.cuh"

namespace kvgate::ops::grouped_decode {

constexpr int kBlockSize = 128;  // 4 warps
constexpr int kWarps = kBlockSize / 32;
// Rows a team loads before it scores them: 2 x kRowsPerTeamStep 16-byte loads in flight
// per lane.
constexpr int kRowsPerTeamStep = 4;

__device__ __forceinline__ float Dot4(const float4& a, const float4& b) {
  return fmaf(a.w, b.w, fmaf(a.z, b.z, fmaf(a.y, b.y, a.x * b.x)));
}

// Elements [4 * part, 4 * part + 4) of row `row` of D-wide rows, widened to float: one
// 16-byte load of float32 rows, one 8-byte load of bf16 rows (uint16_t storage; a bf16
// is the upper half of a float32, so widening is a shift).
template <int D>
__device__ __forceinline__ float4 LoadRow4(const float* base, int64_t row, int part) {
  return reinterpret_cast<const float4*>(base)[row * (D / 4) + part];
}
template <int D>
__device__ __forceinline__ float4 LoadRow4(const uint16_t* base, int64_t row, int part) {
  const uint2 w = reinterpret_cast<const uint2*>(base)[row * (D / 4) + part];
  return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u), __uint_as_float(w.y << 16),
                     __uint_as_float(w.y & 0xffff0000u));
}

// Dims [4c, 4c + 4) of query head g's result: the normalised output o / total (zeros when
// no row was seen) at out_group + g * D, or, with partials, (max, total, o) at partials +
// ((head0 + g) * gridDim.y + blockIdx.y) * PartialFloats(D), the layout
// attention_core::AttentionMergeKernel combines.
template <int D>
__device__ __forceinline__ void WriteGroupOutput(const float4& o, float max, float total, int g, int c,
                                                 float* out_group, float* partials, int64_t head0) {
  if (partials == nullptr) {
    float* out = out_group + g * D + 4 * c;
    // Divide (not multiply by the inverse): the reference divides.
    out[0] = total > 0.0f ? o.x / total : 0.0f;
    out[1] = total > 0.0f ? o.y / total : 0.0f;
    out[2] = total > 0.0f ? o.z / total : 0.0f;
    out[3] = total > 0.0f ? o.w / total : 0.0f;
    return;
  }
  float* partial = partials + ((head0 + g) * gridDim.y + blockIdx.y) * attention_core::PartialFloats(D);
  if (c == 0) {
    partial[0] = max;
    partial[1] = total;
  }
  partial[2 + 4 * c] = o.x;
  partial[3 + 4 * c] = o.y;
  partial[4 + 4 * c] = o.z;
  partial[5 + 4 * c] = o.w;
}

// `rows.Locate(j, &row)` gives the storage row of row j (K at k + row * D elements of T,
// float or bf16 as uint16_t, widened to float as loaded) and returns
// the bits of the group's query heads that see it (bit g = query head g; 0 = skip the
// row without loading it). Query head g's query is q[g * D ..], its output out[g * D ..].
// With partials == null the block writes normalised outputs; otherwise, for each g,
// (max, sum, accumulator[D]) at partials + ((head0 + g) * gridDim.y + blockIdx.y) *
// PartialFloats(D), the layout attention_core::AttentionMergeKernel combines.
//
// A team of D / 4 lanes holds one K/V row (one float4 per lane); a warp has 32 / (D / 4)
// teams, each walking kRowsPerTeamStep consecutive rows per step. Every lane keeps, for
// each of the G query heads of the group, its 4 dims of q, of the accumulator, and the
// running max and sum (equal across its team). The teams merge in shared memory.
template <int D, int G, class Rows, typename T>
__device__ __forceinline__ void AttendGroupRows(const Rows& rows, const T* __restrict__ k_base,
                                                const T* __restrict__ v_base, const float* q_group, float scale,
                                                int32_t first, int32_t last, float* out_group, float* partials,
                                                int64_t head0) {
  constexpr int kTeamLanes = D / 4;
  constexpr int kTeamsPerWarp = 32 / kTeamLanes;
  constexpr int kTeams = kWarps * kTeamsPerWarp;
  constexpr int kRows = kRowsPerTeamStep;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int team_in_warp = lane / kTeamLanes, part = lane % kTeamLanes;
  const int team = warp * kTeamsPerWarp + team_in_warp;

  float4 q[G];
#pragma unroll
  for (int g = 0; g < G; ++g) q[g] = reinterpret_cast<const float4*>(q_group + g * D)[part];

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
      int64_t row = 0;
      const uint32_t bits = j <= last ? rows.Locate(j, &row) : 0u;
      sees[r] = bits;
      const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      kr[r] = bits != 0 ? LoadRow4<D>(k_base, row, part) : zero;
      vr[r] = bits != 0 ? LoadRow4<D>(v_base, row, part) : zero;
    }
    float s[G][kRows];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float dot = Dot4(q[g], kr[r]);
#pragma unroll
        for (int offset = kTeamLanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        s[g][r] = (sees[r] >> g) & 1u ? dot * scale : -INFINITY;
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
    WriteGroupOutput<D>(o, block_max, total, g, c, out_group, partials, head0);
  }
}

}  // namespace kvgate::ops::grouped_decode
