#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention_bf16.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kM = kAttentionBf16BlockM;
constexpr int kN = kAttentionBf16BlockN;
constexpr int kWarps = kAttentionBf16BlockSize / 32;
static_assert(kM == 16 * kWarps, "one warp per 16 query rows");
constexpr int kVStride = kN + 8;  // bf16; 36 words a row: conflict-free fragment loads

template <int D>
__host__ __device__ constexpr int QkStride() {
  return D + 8;  // bf16; (D + 8) / 2 words a row: conflict-free fragment loads
}

template <int D>
constexpr size_t SharedBytes() {
  return sizeof(__nv_bfloat16) * (size_t{kM} * QkStride<D>() + size_t{kN} * QkStride<D>() + size_t{D} * kVStride);
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t Load32(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// d += a (16x16, row) * b (16x8, col); bf16 operands, fp32 accumulators.
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Stores 4 floats as 4 bf16 at an 8-byte aligned shared address.
__device__ __forceinline__ void Store4(__nv_bfloat16* dst, float4 v) {
  uint2 packed;
  packed.x = PackBf16(v.x, v.y);
  packed.y = PackBf16(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = packed;
}

}  // namespace

// Fragment layout of mma.m16n8k16 (g = lane / 4, q = lane % 4): A regs {row g, row g+8}
// x {cols 2q..2q+1, cols 8+2q..}; B regs k rows {2q..2q+1, 8+2q..}, column g; C/D
// {row g: cols 2q, 2q+1; row g+8: the same}. A score tile's C layout is the A layout of
// the P @ V product, so the probabilities never leave registers.
template <int D>
static __global__ void __launch_bounds__(kAttentionBf16BlockSize)
    AttentionBf16Kernel(AttentionArgs args) {
  constexpr int kQs = QkStride<D>();
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared_raw);  // [kM][kQs]
  __nv_bfloat16* k_tile = q_tile + kM * kQs;                              // [kN][kQs]
  __nv_bfloat16* vt_tile = k_tile + kN * kQs;                             // [D][kVStride], V^T
  __shared__ uint8_t row_visible[kN];  // key mask of the tile's rows (1 without a mask)

  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int q_head = blockIdx.y;
  const int kv_head = q_head / (args.num_q_heads / args.num_kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, quad = lane % 4;
  const int t0 = m_block * kM;
  const int t_end = min(t0 + kM, args.num_tokens);
  const int row_first = args.q_start_row + t0;  // cache row of the block's first query
  const int hi = args.q_start_row + t_end - 1;  // last key row any query of the block sees
  const int lo = args.sliding_window > 0 ? max(0, row_first - args.sliding_window + 1) : 0;
  const int64_t head_offset = static_cast<int64_t>(kv_head) * args.capacity_tokens * D;
  const float* k_head = args.k_cache + head_offset;
  const float* v_head = args.v_cache + head_offset;
  const uint8_t* mask =
      args.key_mask != nullptr
          ? args.key_mask + static_cast<int64_t>(args.key_mask_per_query_head ? q_head : kv_head) * args.capacity_tokens
          : nullptr;

  // Q tile, rows past num_tokens zero.
  for (int i = threadIdx.x; i < kM * D / 4; i += kAttentionBf16BlockSize) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (t0 + r < args.num_tokens) {
      v = *reinterpret_cast<const float4*>(args.q + (static_cast<int64_t>(t0 + r) * args.num_q_heads + q_head) * D + c);
    }
    Store4(q_tile + r * kQs + c, v);
  }
  __syncthreads();
  uint32_t qf[D / 16][4];
  {
    const __nv_bfloat16* qw = q_tile + warp * 16 * kQs;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = Load32(qw + g * kQs + kk * 16 + 2 * quad);
      qf[kk][1] = Load32(qw + (g + 8) * kQs + kk * 16 + 2 * quad);
      qf[kk][2] = Load32(qw + g * kQs + kk * 16 + 8 + 2 * quad);
      qf[kk][3] = Load32(qw + (g + 8) * kQs + kk * 16 + 8 + 2 * quad);
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};  // this lane's partial row sums
  const int warp_row_first = row_first + warp * 16;
  const int my_row[2] = {warp_row_first + g, warp_row_first + g + 8};
  const float scale_log2 = args.scale * 1.4426950408889634f;

  for (int j0 = lo / kN * kN; j0 <= hi; j0 += kN) {
    __syncthreads();  // the previous tile is no longer read
    // K: 32 lanes along a row (coalesced, 8-byte conflict-free stores).
    for (int i = threadIdx.x; i < kN * D / 4; i += kAttentionBf16BlockSize) {
      const int r = i / (D / 4), c = (i % (D / 4)) * 4;
      const int j = j0 + r;
      const bool keep = j >= lo && j <= hi && (mask == nullptr || mask[j] != 0 || j >= row_first);
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (keep) v = *reinterpret_cast<const float4*>(k_head + static_cast<int64_t>(j) * D + c);
      Store4(k_tile + r * kQs + c, v);
      if (c == 0) row_visible[r] = (mask == nullptr || (j <= hi && mask[j] != 0)) ? 1 : 0;
    }
    // V transposed: a warp covers 8 rows x 4 float4 columns (64-byte row segments; at
    // most 2-way conflicts on the 2-byte transposed stores).
    for (int i = threadIdx.x; i < kN * D / 4; i += kAttentionBf16BlockSize) {
      const int r = (i % 8) + 8 * (i / (8 * (D / 4))), c = ((i / 8) % (D / 4)) * 4;
      const int j = j0 + r;
      const bool keep = j >= lo && j <= hi && (mask == nullptr || mask[j] != 0 || j >= row_first);
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (keep) v = *reinterpret_cast<const float4*>(v_head + static_cast<int64_t>(j) * D + c);
      vt_tile[(c + 0) * kVStride + r] = __float2bfloat16_rn(v.x);
      vt_tile[(c + 1) * kVStride + r] = __float2bfloat16_rn(v.y);
      vt_tile[(c + 2) * kVStride + r] = __float2bfloat16_rn(v.z);
      vt_tile[(c + 3) * kVStride + r] = __float2bfloat16_rn(v.w);
    }
    __syncthreads();
    if (j0 > warp_row_first + 15) continue;  // every key of the tile is after this warp's queries

    float s[kN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        const __nv_bfloat16* kr = k_tile + (nt * 8 + g) * kQs + kk * 16 + 2 * quad;
        Mma(s[nt], qf[kk], Load32(kr), Load32(kr + 8));
      }
    }
    const bool all_visible = mask == nullptr && args.sliding_window == 0 && j0 + kN - 1 <= warp_row_first;
#pragma unroll
    for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[nt][e] * scale_log2;
        if (!all_visible) {
          const int row = my_row[e / 2];
          const int j = j0 + nt * 8 + 2 * quad + (e & 1);
          const bool visible = j <= row && (args.sliding_window == 0 || j > row - args.sliding_window) &&
                               (row_visible[j - j0] != 0 || j == row);
          if (!visible) v = -INFINITY;
        }
        s[nt][e] = v;
      }
    }
    // Online softmax over the 4 lanes that share a row.
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m_run[h];
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.f : mx;  // a row that sees nothing yet
      alpha[h] = exp2f(m_run[h] - base);
      m_run[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
        s[nt][2 * h] = exp2f(s[nt][2 * h] - base);
        s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - base);
        sum += s[nt][2 * h] + s[nt][2 * h + 1];
      }
      l_run[h] = l_run[h] * alpha[h] + sum;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
#pragma unroll
    for (int c = 0; c < kN / 16; ++c) {
      const uint32_t p[4] = {PackBf16(s[2 * c][0], s[2 * c][1]), PackBf16(s[2 * c][2], s[2 * c][3]),
                             PackBf16(s[2 * c + 1][0], s[2 * c + 1][1]), PackBf16(s[2 * c + 1][2], s[2 * c + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const __nv_bfloat16* vr = vt_tile + (dt * 8 + g) * kVStride + c * 16 + 2 * quad;
        Mma(o[dt], p, Load32(vr), Load32(vr + 8));
      }
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = l_run[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int t = t0 + warp * 16 + g + 8 * h;
    if (t >= args.num_tokens) continue;
    float* out = args.out + (static_cast<int64_t>(t) * args.num_q_heads + q_head) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<float2*>(out + dt * 8 + 2 * quad) = make_float2(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
    }
  }
}

bool AttentionBf16Supported(const AttentionArgs& args) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return (args.head_dim == 64 || args.head_dim == 128) && args.num_tokens >= kAttentionBf16MinTokens &&
         aligned(args.q) && aligned(args.k_cache) && aligned(args.v_cache) && aligned(args.out);
}

template <int D>
static absl::Status Launch(const AttentionArgs& args, cudaStream_t stream) {
  constexpr size_t kShared = SharedBytes<D>();
  KVGATE_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(AttentionBf16Kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kShared)));
  const dim3 grid(static_cast<unsigned>((args.num_tokens + kM - 1) / kM), static_cast<unsigned>(args.num_q_heads));
  AttentionBf16Kernel<D><<<grid, kAttentionBf16BlockSize, kShared, stream>>>(args);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchAttentionBf16(const AttentionArgs& args, cudaStream_t stream) {
  if (args.num_tokens < 0 || args.num_q_heads < 0 || args.num_kv_heads < 0 || args.capacity_tokens < 0 ||
      args.q_start_row < 0 || args.sliding_window < 0) {
    return absl::InvalidArgumentError("AttentionBf16: negative size, start row or window");
  }
  if (args.num_tokens == 0 || args.num_q_heads == 0) return absl::OkStatus();
  if (args.num_kv_heads == 0 || args.num_q_heads % args.num_kv_heads != 0 || args.num_q_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("AttentionBf16: num_q_heads ", args.num_q_heads,
                                                   " is not a multiple of num_kv_heads ", args.num_kv_heads,
                                                   " (or above 65535)"));
  }
  if (static_cast<int64_t>(args.q_start_row) + args.num_tokens > args.capacity_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("AttentionBf16: query rows [", args.q_start_row, ", ",
                                                   static_cast<int64_t>(args.q_start_row) + args.num_tokens,
                                                   ") exceed the cache of ", args.capacity_tokens, " rows"));
  }
  if (!AttentionBf16Supported(args)) {
    return absl::InvalidArgumentError(absl::StrCat("AttentionBf16: head_dim ", args.head_dim, ", ", args.num_tokens,
                                                   " tokens or unaligned pointers: not supported"));
  }
  return args.head_dim == 64 ? Launch<64>(args, stream) : Launch<128>(args, stream);
}

}  // namespace kvgate::ops
