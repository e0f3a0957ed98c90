#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/attention_bf16.cuh"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kM = kAttentionBf16BlockM;
constexpr int kWarps = kAttentionBf16BlockSize / 32;
static_assert(kM == 32 * kWarps, "one warp per 32 query rows (two m16 tiles)");
template <int D>
__host__ __device__ constexpr int QkStride() {
  return D + 8;  // bf16; (D + 8) / 2 words a row: conflict-free fragment and ldmatrix loads
}

template <int D, int N>
constexpr size_t SharedBytes() {  // Q, then two stages of K and of V
  return sizeof(__nv_bfloat16) * size_t{kM + 4 * N} * QkStride<D>();
}

// Key rows per tile: 32 for head_dim 128 keeps the two m16 tiles' scores and outputs in
// registers without spills (64 spilled 180 bytes), 64 for head_dim 64.
template <int D>
constexpr int TileKeys() {
  return D >= 128 ? 32 : 64;
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// d += a (16x16, row) * b (16x8, col); bf16 operands, fp32 accumulators.
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 bf16 matrices; lane L gives the address of row L % 8 of matrix L / 8.
__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const __nv_bfloat16* p) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// Four transposed 8x8 bf16 matrices; lane L gives the address of row L % 8 of matrix L / 8.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const __nv_bfloat16* p) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// 16 bytes global -> shared, asynchronously; zeros instead when !keep (nothing is read).
__device__ __forceinline__ void CpAsync16(__nv_bfloat16* dst, const __nv_bfloat16* src, bool keep) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(keep ? 16 : 0));
}

// Stores 4 floats as 4 bf16 at an 8-byte aligned address.
__device__ __forceinline__ void Store4(__nv_bfloat16* dst, float4 v) {
  uint2 packed;
  packed.x = PackBf16(v.x, v.y);
  packed.y = PackBf16(v.z, v.w);
  *reinterpret_cast<uint2*>(dst) = packed;
}

}  // namespace

// Rows [0, rows) of every kv head of the fp32 cache, rounded to bf16, into
// [num_kv_heads, rows, head_dim]: the K/V the tiles are copied from (half the bytes of
// fp32, and a plain copy that cp.async can stage).
static __global__ void KvToBf16Kernel(const float* k, const float* v, __nv_bfloat16* k_out, __nv_bfloat16* v_out,
                                      int32_t num_kv_heads, int32_t capacity, int32_t rows, int32_t head_dim) {
  const int64_t head_elems = static_cast<int64_t>(rows) * head_dim;
  const int64_t total4 = num_kv_heads * head_elems / 4;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * 4;
    const int64_t head = e / head_elems, rem = e % head_elems;
    const int64_t src = head * capacity * head_dim + rem;
    Store4(k_out + e, *reinterpret_cast<const float4*>(k + src));
    Store4(v_out + e, *reinterpret_cast<const float4*>(v + src));
  }
}

// Fragment layout of mma.m16n8k16 (g = lane / 4, q = lane % 4): A regs {row g, row g+8}
// x {cols 2q..2q+1, cols 8+2q..}; B regs k rows {2q..2q+1, 8+2q..}, column g; C/D
// {row g: cols 2q, 2q+1; row g+8: the same}. A score tile's C layout is the A layout of
// the P @ V product, so the probabilities never leave registers. Each warp owns two
// m16 tiles (32 query rows), so every K/V fragment it loads from shared memory feeds two
// MMAs. K and V tiles are row-major (key row, dim), double-buffered by cp.async; their B
// fragments come from ldmatrix (K) and ldmatrix.trans (V); Q's A fragments are re-read
// from shared memory by ldmatrix per tile (registers go to the accumulators).
template <int D, int kN>
static __global__ void __launch_bounds__(kAttentionBf16BlockSize)
    AttentionBf16Kernel(AttentionArgs args, const __nv_bfloat16* k_bf16, const __nv_bfloat16* v_bf16, int32_t kv_rows) {
  constexpr int kQs = QkStride<D>();
  constexpr int kRowsPerWarp = kM / kWarps;  // 32: two m16 tiles
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __nv_bfloat16* q_tile = reinterpret_cast<__nv_bfloat16*>(shared_raw);  // [kM][kQs]
  __nv_bfloat16* k_tiles = q_tile + kM * kQs;                             // [2][kN][kQs]
  __nv_bfloat16* v_tiles = k_tiles + 2 * kN * kQs;                        // [2][kN][kQs]
  __shared__ uint8_t row_visible[2][kN];  // key mask of each stage's rows (1 without a mask)
  static_assert(kN % 16 == 0 && kN >= 16, "key tiles are whole k16 chunks");

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
  const int64_t head_offset = static_cast<int64_t>(kv_head) * kv_rows * D;
  const __nv_bfloat16* k_head = k_bf16 + head_offset;
  const __nv_bfloat16* v_head = v_bf16 + head_offset;
  const uint8_t* mask =
      args.key_mask != nullptr
          ? args.key_mask + static_cast<int64_t>(args.key_mask_per_query_head ? q_head : kv_head) * args.capacity_tokens
          : nullptr;

  // Rows past hi, before lo, and of the past hidden by the key mask are zero-filled, so
  // whatever they hold (NaN included) never reaches a sum.
  const auto load_tile = [&](int j0, int stage) {
    for (int i = threadIdx.x; i < kN * D / 8; i += kAttentionBf16BlockSize) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      const int j = j0 + r;
      const bool keep = j >= lo && j <= hi && (mask == nullptr || mask[j] != 0 || j >= row_first);
      const int64_t src = static_cast<int64_t>(keep ? j : 0) * D + c;
      CpAsync16(k_tiles + (stage * kN + r) * kQs + c, k_head + src, keep);
      CpAsync16(v_tiles + (stage * kN + r) * kQs + c, v_head + src, keep);
      if (c == 0) row_visible[stage][r] = (mask == nullptr || (j >= 0 && j <= hi && mask[j] != 0)) ? 1 : 0;
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };

  const int first_j0 = lo / kN * kN;
  const int num_tiles = (hi - first_j0) / kN + 1;
  load_tile(first_j0, 0);

  // Q tile, rows past num_tokens zero.
  for (int i = threadIdx.x; i < kM * D / 4; i += kAttentionBf16BlockSize) {
    const int r = i / (D / 4), c = (i % (D / 4)) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (t0 + r < args.num_tokens) {
      v = *reinterpret_cast<const float4*>(args.q + (static_cast<int64_t>(t0 + r) * args.num_q_heads + q_head) * D + c);
    }
    Store4(q_tile + r * kQs + c, v);
  }
  const __nv_bfloat16* qw = q_tile + warp * kRowsPerWarp * kQs;

  float o[2][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
  }
  float m_run[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
  float l_run[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // this lane's partial row sums
  const int warp_row_first = row_first + warp * kRowsPerWarp;
  const float scale_log2 = args.scale * 1.4426950408889634f;
  // ldmatrix addresses (lane L gives a row of matrix L / 8). K, plain: matrices {rows
  // +0, dims +0}, {+0, +8}, {+8, +0}, {+8, +8}; V, transposed: {+0, +0}, {+8, +0},
  // {+0, +8}, {+8, +8}.
  const int k_ld_row = (lane % 8) + (lane / 16) * 8, k_ld_col = ((lane / 8) & 1) * 8;
  const int v_ld_row = (lane % 8) + ((lane / 8) & 1) * 8, v_ld_col = (lane / 16) * 8;

  for (int it = 0; it < num_tiles; ++it) {
    const int j0 = first_j0 + it * kN;
    const int stage = it & 1;
    if (it + 1 < num_tiles) {
      load_tile(j0 + kN, stage ^ 1);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();  // tile `it` (and, the first time, Q) is in shared memory for every warp
    // A masked tile wholly before this warp's queries: the key mask alone decides, per key
    // column, so each lane keeps the visibility of its kN / 4 score columns as bits
    // (column nt * 8 + 2 * quad + b at bit 2 * nt + b) instead of testing every score, and
    // the warp skips the tile when no column is visible (it would add e^-inf = 0).
    const bool column_rule = mask != nullptr && args.sliding_window == 0 && j0 + kN - 1 < warp_row_first;
    uint32_t visible_columns = 0;
    if (column_rule) {
#pragma unroll
      for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
          if (row_visible[stage][nt * 8 + 2 * quad + b] != 0) visible_columns |= 1u << (2 * nt + b);
        }
      }
    }
    const bool tile_hidden = column_rule && !__any_sync(0xffffffffu, visible_columns != 0);
    if (j0 <= warp_row_first + kRowsPerWarp - 1 && !tile_hidden) {  // else no key of it reaches this warp's queries
      const __nv_bfloat16* k_tile = k_tiles + stage * kN * kQs;
      const __nv_bfloat16* v_tile = v_tiles + stage * kN * kQs;
      float s[2][kN / 8][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[2][4];  // A fragments of the two m16 tiles: matrices {rows +0, k +0},
                           // {+8, +0}, {+0, +8}, {+8, +8}, the V addressing pattern
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) LdMatrixX4(a[mt], qw + (mt * 16 + v_ld_row) * kQs + kk * 16 + v_ld_col);
#pragma unroll
        for (int nt = 0; nt < kN / 8; nt += 2) {
          uint32_t b[4];  // {b0, b1} of key rows nt*8.., then of (nt+1)*8..
          LdMatrixX4(b, k_tile + (nt * 8 + k_ld_row) * kQs + kk * 16 + k_ld_col);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Mma(s[mt][nt], a[mt], b[0], b[1]);
            Mma(s[mt][nt + 1], a[mt], b[2], b[3]);
          }
        }
      }
      const bool all_visible = mask == nullptr && args.sliding_window == 0 && j0 + kN - 1 <= warp_row_first;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kN / 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float v = s[mt][nt][e] * scale_log2;
            if (column_rule) {
              if ((visible_columns & (1u << (2 * nt + (e & 1)))) == 0) v = -INFINITY;
            } else if (!all_visible) {
              const int row = warp_row_first + mt * 16 + g + 8 * (e / 2);
              const int j = j0 + nt * 8 + 2 * quad + (e & 1);
              const bool visible = j <= row && (args.sliding_window == 0 || j > row - args.sliding_window) &&
                                   (row_visible[stage][j - j0] != 0 || j == row);
              if (!visible) v = -INFINITY;
            }
            s[mt][nt][e] = v;
          }
        }
      }
      // Online softmax over the 4 lanes that share a row.
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float mx = m_run[mt][h];
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * h], s[mt][nt][2 * h + 1]));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          const float base = mx == -INFINITY ? 0.f : mx;  // a row that sees nothing yet
          alpha[h] = exp2f(m_run[mt][h] - base);
          m_run[mt][h] = mx;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kN / 8; ++nt) {
            s[mt][nt][2 * h] = exp2f(s[mt][nt][2 * h] - base);
            s[mt][nt][2 * h + 1] = exp2f(s[mt][nt][2 * h + 1] - base);
            sum += s[mt][nt][2 * h] + s[mt][nt][2 * h + 1];
          }
          l_run[mt][h] = l_run[mt][h] * alpha[h] + sum;
        }
        // Most tiles leave every running max of the warp unchanged (alpha == 1): skip the
        // rescale of the accumulators then (a warp-uniform branch).
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
          for (int dt = 0; dt < D / 8; ++dt) {
            o[mt][dt][0] *= alpha[0];
            o[mt][dt][1] *= alpha[0];
            o[mt][dt][2] *= alpha[1];
            o[mt][dt][3] *= alpha[1];
          }
        }
      }
#pragma unroll
      for (int c = 0; c < kN / 16; ++c) {
        uint32_t p[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          p[mt][0] = PackBf16(s[mt][2 * c][0], s[mt][2 * c][1]);
          p[mt][1] = PackBf16(s[mt][2 * c][2], s[mt][2 * c][3]);
          p[mt][2] = PackBf16(s[mt][2 * c + 1][0], s[mt][2 * c + 1][1]);
          p[mt][3] = PackBf16(s[mt][2 * c + 1][2], s[mt][2 * c + 1][3]);
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; dt += 2) {
          uint32_t b[4];  // {b0, b1} of dims dt*8.., then of dims (dt+1)*8..
          LdMatrixX4Trans(b, v_tile + (c * 16 + v_ld_row) * kQs + dt * 8 + v_ld_col);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            Mma(o[mt][dt], p[mt], b[0], b[1]);
            Mma(o[mt][dt + 1], p[mt], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with `stage` before it is refilled
  }

#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mt][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int t = t0 + warp * kRowsPerWarp + mt * 16 + g + 8 * h;
      if (t >= args.num_tokens) continue;
      float* out = args.out + (static_cast<int64_t>(t) * args.num_q_heads + q_head) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<float2*>(out + dt * 8 + 2 * quad) =
            make_float2(o[mt][dt][2 * h] * inv, o[mt][dt][2 * h + 1] * inv);
      }
    }
  }
}

bool AttentionBf16Supported(const AttentionArgs& args) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return (args.head_dim == 64 || args.head_dim == 128) && args.num_tokens >= kAttentionBf16MinTokens &&
         aligned(args.q) && aligned(args.k_cache) && aligned(args.v_cache) && aligned(args.out);
}

size_t AttentionBf16WorkspaceBytes(const AttentionArgs& args) {
  const int64_t rows = static_cast<int64_t>(args.q_start_row) + args.num_tokens;
  return rows <= 0 || args.num_kv_heads <= 0 || args.head_dim <= 0
             ? 0
             : static_cast<size_t>(2 * sizeof(__nv_bfloat16)) * args.num_kv_heads * rows * args.head_dim;
}

template <int D>
static absl::Status Launch(const AttentionArgs& args, __nv_bfloat16* k_bf16, __nv_bfloat16* v_bf16,
                           cudaStream_t stream) {
  const int32_t rows = args.q_start_row + args.num_tokens;
  const int64_t total4 = static_cast<int64_t>(args.num_kv_heads) * rows * D / 4;
  const int64_t convert_blocks = std::min<int64_t>((total4 + 255) / 256, 4096);
  KvToBf16Kernel<<<static_cast<unsigned>(convert_blocks), 256, 0, stream>>>(
      args.k_cache, args.v_cache, k_bf16, v_bf16, args.num_kv_heads, args.capacity_tokens, rows, D);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  constexpr int kN = TileKeys<D>();
  constexpr size_t kShared = SharedBytes<D, kN>();
  KVGATE_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(AttentionBf16Kernel<D, kN>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   static_cast<int>(kShared)));
  const dim3 grid(static_cast<unsigned>((args.num_tokens + kM - 1) / kM), static_cast<unsigned>(args.num_q_heads));
  AttentionBf16Kernel<D, kN><<<grid, kAttentionBf16BlockSize, kShared, stream>>>(args, k_bf16, v_bf16, rows);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchAttentionBf16(const AttentionArgs& args, void* workspace, size_t workspace_bytes,
                                 cudaStream_t stream) {
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
  const size_t need = AttentionBf16WorkspaceBytes(args);
  if (workspace == nullptr || workspace_bytes < need || reinterpret_cast<uintptr_t>(workspace) % 16 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("AttentionBf16: a workspace of ", need, " bytes (16-byte aligned) is needed"));
  }
  __nv_bfloat16* k_bf16 = static_cast<__nv_bfloat16*>(workspace);
  __nv_bfloat16* v_bf16 = k_bf16 + need / 2 / sizeof(__nv_bfloat16);
  return args.head_dim == 64 ? Launch<64>(args, k_bf16, v_bf16, stream) : Launch<128>(args, k_bf16, v_bf16, stream);
}

}  // namespace kvgate::ops
