#include "cuda/kernels/select_top.cuh"

#include <cstdint>
#include <string>

#include "cuda/cpu/reference_ops.h"
#include "cuda/kernels/cuda_check.h"

namespace kvgate::ops {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;

// gates/internal/select_util.h ScoreKey: order-preserving, NaN lowest, -0 == +0.
__device__ __forceinline__ uint32_t SelectionKey(float score) {
  if (isnan(score)) return 0;
  if (score == 0.0f) score = 0.0f;
  const uint32_t bits = __float_as_uint(score);
  return (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
}

struct Selection {
  const float* scores;  // row 0 of the selection; rows SelectTopArgs::row_stride apart
  int32_t rows;         // competing rows; entry e = p * rows + r is its order
  uint8_t* keep;        // row 0 of its keep rows
  uint8_t bit;
  bool first_bit;       // write the byte instead of or-ing into it
};

__device__ __forceinline__ bool IsCandidate(const SelectTopArgs& a, int32_t p) {
  return a.candidates == nullptr || a.candidates[p] != 0;
}

// Block-wide exclusive prefix count of `flag` over thread order; *total gets the sum.
__device__ int32_t BlockRank(bool flag, int32_t* warp_counts, int32_t* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint32_t ballot = __ballot_sync(0xffffffffu, flag);
  const int32_t in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int32_t before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) before += warp_counts[w];
    sum += warp_counts[w];
  }
  *total = sum;
  __syncthreads();  // warp_counts is reused by the next call
  return before + in_warp;
}

__device__ void SelectOne(const SelectTopArgs& a, const Selection& s) {
  __shared__ uint32_t hist[256];
  __shared__ int32_t warp_counts[kWarps];
  __shared__ int64_t shared_above;
  __shared__ uint32_t shared_digit;
  const int32_t entries = s.rows * a.n;  // < 2^31 (SelectTopArgsError)
  auto key_of = [&](int32_t e) {
    const int32_t p = e / s.rows, r = e % s.rows;
    return SelectionKey(s.scores[static_cast<int64_t>(r) * a.row_stride + p]);
  };

  // Candidates of the selection.
  int64_t candidates = 0;
  for (int32_t base = 0; base < entries; base += kThreads) {
    const int32_t e = base + threadIdx.x;
    int32_t total = 0;
    BlockRank(e < entries && IsCandidate(a, e / s.rows), warp_counts, &total);
    candidates += total;
  }

  uint32_t threshold = 0;
  int64_t ties_needed = 0;
  if (a.need >= candidates) {
    ties_needed = int64_t{entries} + 1;  // threshold 0 and every tie: all candidates
  } else if (a.need <= 0) {
    threshold = 0xffffffffu;  // nothing is above it, no tie is taken
  } else {
    uint32_t prefix = 0, prefix_mask = 0;
    if (threadIdx.x == 0) shared_above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
      __syncthreads();
      for (int32_t e = threadIdx.x; e < entries; e += kThreads) {
        if (!IsCandidate(a, e / s.rows)) continue;
        const uint32_t key = key_of(e);
        if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t above = shared_above;
        uint32_t digit = 0;
        for (int b = 255; b >= 0; --b) {
          if (above + hist[b] >= a.need) {
            digit = static_cast<uint32_t>(b);
            break;
          }
          above += hist[b];
        }
        shared_above = above;
        shared_digit = digit;
      }
      __syncthreads();
      prefix |= shared_digit << shift;
      prefix_mask |= 0xffu << shift;
    }
    threshold = prefix;
    ties_needed = a.need - shared_above;  // >= 1
  }

  // Keep every candidate above the threshold and its first ties_needed ties in order.
  int64_t ties_before = 0;
  for (int32_t base = 0; base < entries; base += kThreads) {
    const int32_t e = base + threadIdx.x;
    const bool inside = e < entries;
    const int32_t p = inside ? e / s.rows : 0, r = inside ? e % s.rows : 0;
    const bool candidate = inside && IsCandidate(a, p);
    const uint32_t key = candidate ? key_of(e) : 0;
    const bool tie = candidate && key == threshold;
    int32_t ties_here = 0;
    const int32_t rank = BlockRank(tie, warp_counts, &ties_here);
    if (inside) {
      const bool selected = candidate && (key > threshold || (tie && ties_before + rank < ties_needed));
      uint8_t* out = s.keep + static_cast<int64_t>(r) * a.n + p;
      const uint8_t value = selected ? s.bit : 0;
      *out = s.first_bit ? value : static_cast<uint8_t>(*out | value);
    }
    ties_before += ties_here;
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) SelectTopKernel(SelectTopArgs a) {
  const int64_t unit = blockIdx.x;
  if (a.merge_rows > 1) {
    for (int g = 0; g < a.merge_rows; ++g) {
      const int64_t row = unit * a.merge_rows + g;
      SelectOne(a, Selection{a.scores + row * a.row_stride, 1, a.keep + unit * a.n, static_cast<uint8_t>(1u << g), g == 0});
    }
  } else {
    const int64_t row = unit * a.rows_per_selection;
    SelectOne(a, Selection{a.scores + row * a.row_stride, a.rows_per_selection, a.keep + row * a.n, 1, true});
  }
}

}  // namespace

absl::Status LaunchSelectTop(const SelectTopArgs& args, cudaStream_t stream) {
  if (std::string error = SelectTopArgsError(args); !error.empty()) return absl::InvalidArgumentError(error);
  const int32_t units = args.merge_rows > 1 ? args.rows / args.merge_rows : args.rows / args.rows_per_selection;
  SelectTopArgs resolved = args;
  if (resolved.row_stride == 0) resolved.row_stride = resolved.n;
  SelectTopKernel<<<static_cast<unsigned>(units), kThreads, 0, stream>>>(resolved);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
