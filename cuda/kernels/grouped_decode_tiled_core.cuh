// File: the tiled block core of the head-paged grouped decode kernel: one block of
// kBlockSize threads scores rows [first, last] of one kv head against all G query heads
// of its GQA group, a tile of kBlockSize rows at a time, in three phases per tile:
//   1. scores: thread t owns row t of the tile, loads its whole K row (16-byte loads,
//      all independent) and forms its G dot products against the group's queries, which
//      the block holds in shared memory (every thread reads the same address: a
//      broadcast). No cross-lane reduction per row.
//   2. softmax: block-wide max and sum of the tile per query head; every thread keeps
//      the same running (max, sum) per head.
//   3. values: teams of D / 4 lanes walk the tile's rows, each lane accumulating 4 dims
//      of every head from one coalesced V row, with the probabilities from shared memory.
// The core of grouped_decode_core.cuh reduces each row's G dot products across a warp
// (5 dependent shuffles each) and repeats the softmax on every lane; at batch 32, 8k
// context, bf16 pages, one layer took 930 us with it and 603 us with this core on an H100
// (ncu, 2026-12-06; bench/results/gpu-engine-batched.md).
// Device code only; included by head_paged_decode_attention.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/attention_core.cuh"
#include "cuda/kernels/grouped_decode_core.cuh"

namespace kvgate::ops::grouped_decode {

constexpr int kTileRows = kBlockSize;

// dot[g] += q_s[g, c * 8 .. c * 8 + 8) . x[0 .. 8), for the G heads.
template <int D, int G>
__device__ __forceinline__ void Dot8(const float* q_s, int c, const float (&x)[8], float (&dot)[G]) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float4 a = reinterpret_cast<const float4*>(q_s + g * D)[2 * c];
    const float4 b = reinterpret_cast<const float4*>(q_s + g * D)[2 * c + 1];
    dot[g] = fmaf(a.x, x[0], dot[g]);
    dot[g] = fmaf(a.y, x[1], dot[g]);
    dot[g] = fmaf(a.z, x[2], dot[g]);
    dot[g] = fmaf(a.w, x[3], dot[g]);
    dot[g] = fmaf(b.x, x[4], dot[g]);
    dot[g] = fmaf(b.y, x[5], dot[g]);
    dot[g] = fmaf(b.z, x[6], dot[g]);
    dot[g] = fmaf(b.w, x[7], dot[g]);
  }
}

// The G dot products of one whole K row (D elements of T, widened to float).
template <int D, int G>
__device__ __forceinline__ void DotRow(const float* k_row, const float* q_s, float (&dot)[G]) {
  const float4* k4 = reinterpret_cast<const float4*>(k_row);
#pragma unroll
  for (int c = 0; c < D / 8; ++c) {
    const float4 a = k4[2 * c], b = k4[2 * c + 1];
    const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    Dot8<D, G>(q_s, c, x, dot);
  }
}
template <int D, int G>
__device__ __forceinline__ void DotRow(const uint16_t* k_row, const float* q_s, float (&dot)[G]) {
  const uint4* k4 = reinterpret_cast<const uint4*>(k_row);
#pragma unroll
  for (int c = 0; c < D / 8; ++c) {
    const uint4 w = k4[c];
    const float x[8] = {__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                        __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u),
                        __uint_as_float(w.z << 16), __uint_as_float(w.z & 0xffff0000u),
                        __uint_as_float(w.w << 16), __uint_as_float(w.w & 0xffff0000u)};
    Dot8<D, G>(q_s, c, x, dot);
  }
}

// Block-wide reduction of one value per head (max or sum); every thread gets the result.
template <int G, bool kMax>
__device__ __forceinline__ void BlockReduce(float (&v)[G], float (*scratch)[G]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, v[g], offset);
      v[g] = kMax ? fmaxf(v[g], other) : v[g] + other;
    }
    if (lane == 0) scratch[warp][g] = v[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float r = scratch[0][g];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = kMax ? fmaxf(r, scratch[w][g]) : r + scratch[w][g];
    v[g] = r;
  }
  __syncthreads();  // scratch is reused by the next reduction
}

// Same contract as AttendGroupRows (grouped_decode_core.cuh): `rows.Locate(j, &row)`
// gives the storage row of row j and the bits of the group's query heads that see it;
// outputs normalised to out_group, or (max, sum, accumulator[D]) per head to partials.
template <int D, int G, class Rows, typename T>
__device__ __forceinline__ void AttendGroupRowsTiled(const Rows& rows, const T* __restrict__ k_base,
                                                     const T* __restrict__ v_base, const float* q_group, float scale,
                                                     int32_t first, int32_t last, float* out_group, float* partials,
                                                     int64_t head0) {
  static_assert(D % 8 == 0 && D <= 128 && 32 % (D / 4) == 0, "D of 64 or 128");
  constexpr int kTeamLanes = D / 4;
  constexpr int kTeamsPerWarp = 32 / kTeamLanes;
  constexpr int kTeams = kWarps * kTeamsPerWarp;
  __shared__ __align__(16) float q_s[G * D];
  __shared__ float p_s[G][kTileRows];
  __shared__ int64_t row_s[kTileRows];
  __shared__ uint32_t seen_s[kTileRows];
  __shared__ float reduce_s[kWarps][G];
  __shared__ float4 team_acc[kTeams][G][kTeamLanes];

  const int t = threadIdx.x;
  const int lane = t % 32, warp = t / 32;
  const int team = warp * kTeamsPerWarp + lane / kTeamLanes, part = lane % kTeamLanes;
  for (int i = t; i < G * D; i += blockDim.x) q_s[i] = q_group[i];
  __syncthreads();

  float m[G], l[G];
  float4 acc[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
    acc[g] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  for (int32_t tile = first; tile <= last; tile += kTileRows) {
    // 1. This thread's row of the tile: its G scores (-inf where a head does not see it).
    const int32_t j = tile + t;
    int64_t row = 0;
    const uint32_t bits = j <= last ? rows.Locate(j, &row) : 0u;
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = 0.0f;
    if (bits != 0) DotRow<D, G>(k_base + row * D, q_s, s);
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = (bits >> g) & 1u ? s[g] * scale : -INFINITY;
    row_s[t] = row;
    seen_s[t] = bits;

    // 2. The tile's max per head, the probabilities, their sum, the running state.
    float tile_max[G];
#pragma unroll
    for (int g = 0; g < G; ++g) tile_max[g] = s[g];
    BlockReduce<G, true>(tile_max, reduce_s);
    float correction[G], p_sum[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float new_max = fmaxf(m[g], tile_max[g]);
      // A head that has seen nothing yet keeps an empty state (no NaN from -inf - -inf).
      const float p = new_max == -INFINITY || s[g] == -INFINITY ? 0.0f : expf(s[g] - new_max);
      p_s[g][t] = p;
      p_sum[g] = p;
      correction[g] = m[g] == -INFINITY ? 0.0f : expf(m[g] - new_max);
      m[g] = new_max;
    }
    BlockReduce<G, false>(p_sum, reduce_s);  // its barrier also publishes p_s, row_s, seen_s

    // 3. Values: each team walks its share of the tile's rows.
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (m[g] == -INFINITY) continue;
      l[g] = l[g] * correction[g] + p_sum[g];
      acc[g].x *= correction[g];
      acc[g].y *= correction[g];
      acc[g].z *= correction[g];
      acc[g].w *= correction[g];
    }
    const int32_t tile_rows = min(kTileRows, last - tile + 1);
    for (int r = team; r < tile_rows; r += kTeams) {
      if (seen_s[r] == 0) continue;
      const float4 v = LoadRow4<D>(v_base, row_s[r], part);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        // A hidden row contributes nothing, and its V (maybe NaN) is never multiplied.
        const float p = p_s[g][r];
        if (p == 0.0f) continue;
        acc[g].x = fmaf(p, v.x, acc[g].x);
        acc[g].y = fmaf(p, v.y, acc[g].y);
        acc[g].z = fmaf(p, v.z, acc[g].z);
        acc[g].w = fmaf(p, v.w, acc[g].w);
      }
    }
    __syncthreads();  // p_s, row_s, seen_s are rewritten by the next tile
  }

  // Every team used the same running max, so the teams' accumulators simply add up.
#pragma unroll
  for (int g = 0; g < G; ++g) team_acc[team][g][part] = acc[g];
  __syncthreads();
  for (int idx = t; idx < G * kTeamLanes; idx += blockDim.x) {
    const int g = idx / kTeamLanes, c = idx % kTeamLanes;
    float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < kTeams; ++i) {
      const float4 a = team_acc[i][g][c];
      o.x += a.x;
      o.y += a.y;
      o.z += a.z;
      o.w += a.w;
    }
    WriteGroupOutput<D>(o, m[g], l[g], g, c, out_group, partials, head0);
  }
}

}  // namespace kvgate::ops::grouped_decode
