#include "cuda/kernels/select_top.cuh"

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"

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
  const float* scores;     // row 0 of the selection; rows SelectTopArgs::row_stride apart
  int32_t rows;            // competing rows; entry e = p * rows + r is its order
  uint8_t* keep;           // row 0 of its keep rows
  uint8_t bit;
  bool first_bit;          // write the byte instead of or-ing into it
  const uint8_t* exclude;  // row 0 of its exclude rows (n apart), or null
};

__device__ __forceinline__ bool IsCandidate(const SelectTopArgs& a, const Selection& s, int32_t p, int32_t r) {
  return (a.candidates == nullptr || a.candidates[p] != 0) &&
         (s.exclude == nullptr || s.exclude[static_cast<int64_t>(r) * a.n + p] == 0);
}

__device__ __forceinline__ bool IsCandidateEntry(const SelectTopArgs& a, const Selection& s, int32_t e) {
  return IsCandidate(a, s, e / s.rows, e % s.rows);
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
    BlockRank(e < entries && IsCandidateEntry(a, s, e), warp_counts, &total);
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
        if (!IsCandidateEntry(a, s, e)) continue;
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
    const bool candidate = inside && IsCandidate(a, s, p, r);
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
      SelectOne(a, Selection{a.scores + row * a.row_stride, 1, a.keep + unit * a.n, static_cast<uint8_t>(1u << g), g == 0,
                             a.exclude == nullptr ? nullptr : a.exclude + row * a.n});
    }
  } else {
    const int64_t row = unit * a.rows_per_selection;
    SelectOne(a, Selection{a.scores + row * a.row_stride, a.rows_per_selection, a.keep + row * a.n, 1, true,
                           a.exclude == nullptr ? nullptr : a.exclude + row * a.n});
  }
}

// ---- Wide selections: few selections of many entries (Fast KVzip's one threshold over
// every layer and kv head) would leave all but a few SMs idle, one block each. They run
// the same radix select spread over blocks_x slices of every selection, pass by pass, with
// each selection's histogram and state in the workspace; the ties go in entry order by a
// count per slice and an offset per slice.
constexpr int32_t kWideSliceEntries = 8192;
constexpr int32_t kWideMaxSlices = 256;

struct WideState {
  unsigned long long candidates;
  unsigned long long above;
  uint32_t prefix, prefix_mask, threshold;
  int32_t mode;  // 0: radix search, 1: every candidate, 2: none
  long long ties_needed;
  uint32_t hist[256];
  uint32_t slice_ties[kWideMaxSlices];
};

__device__ __forceinline__ Selection WideSelection(const SelectTopArgs& a, int64_t unit) {
  const int64_t row = unit * a.rows_per_selection;
  return Selection{a.scores + row * a.row_stride, a.rows_per_selection, a.keep + row * a.n, 1, true,
                   a.exclude == nullptr ? nullptr : a.exclude + row * a.n};
}

__device__ __forceinline__ uint32_t WideKey(const SelectTopArgs& a, const Selection& s, int32_t e) {
  const int32_t p = e / s.rows, r = e % s.rows;
  return SelectionKey(s.scores[static_cast<int64_t>(r) * a.row_stride + p]);
}

// pass < 0: count candidates; else the histogram of digit `shift` under the prefix.
__global__ void __launch_bounds__(kThreads) WideHistKernel(SelectTopArgs a, WideState* states, int32_t slice, int shift) {
  __shared__ uint32_t hist[256];
  __shared__ int32_t warp_counts[kWarps];
  WideState& state = states[blockIdx.y];
  if (shift >= 0 && state.mode != 0) return;
  const Selection s = WideSelection(a, blockIdx.y);
  const int32_t entries = s.rows * a.n;
  const int32_t begin = blockIdx.x * slice, end = min(entries, begin + slice);
  if (shift < 0) {
    int64_t count = 0;
    for (int32_t base = begin; base < end; base += kThreads) {
      const int32_t e = base + threadIdx.x;
      int32_t total = 0;
      BlockRank(e < end && IsCandidateEntry(a, s, e), warp_counts, &total);
      count += total;
    }
    if (threadIdx.x == 0) atomicAdd(&state.candidates, static_cast<unsigned long long>(count));
    return;
  }
  for (int b = threadIdx.x; b < 256; b += kThreads) hist[b] = 0;
  __syncthreads();
  const uint32_t prefix = state.prefix, prefix_mask = state.prefix_mask;
  for (int32_t e = begin + threadIdx.x; e < end; e += kThreads) {
    if (!IsCandidateEntry(a, s, e)) continue;
    const uint32_t key = WideKey(a, s, e);
    if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < 256; b += kThreads) {
    if (hist[b] != 0) atomicAdd(&state.hist[b], hist[b]);
  }
}

// One thread per selection: after the count (shift < 0) the mode; after a histogram the
// digit, as SelectOne chooses it; after the last digit the threshold.
__global__ void WideStepKernel(SelectTopArgs a, WideState* states, int32_t units, int shift) {
  const int32_t unit = blockIdx.x * blockDim.x + threadIdx.x;
  if (unit >= units) return;
  WideState& state = states[unit];
  if (shift < 0) {
    const int32_t entries = a.rows_per_selection * a.n;
    state.mode = a.need >= static_cast<long long>(state.candidates) ? 1 : a.need <= 0 ? 2 : 0;
    state.threshold = state.mode == 2 ? 0xffffffffu : 0;
    state.ties_needed = state.mode == 1 ? entries + 1LL : 0;
    return;
  }
  if (state.mode != 0) return;
  unsigned long long above = state.above;
  uint32_t digit = 0;
  for (int b = 255; b >= 0; --b) {
    if (static_cast<long long>(above + state.hist[b]) >= a.need) {
      digit = static_cast<uint32_t>(b);
      break;
    }
    above += state.hist[b];
  }
  for (int b = 0; b < 256; ++b) state.hist[b] = 0;
  state.above = above;
  state.prefix |= digit << shift;
  state.prefix_mask |= 0xffu << shift;
  if (shift == 0) {
    state.threshold = state.prefix;
    state.ties_needed = a.need - static_cast<long long>(above);
  }
}

// write == false: each slice counts its ties; true: each slice writes its keep bytes,
// its ties ranked after those of the slices before it.
__global__ void __launch_bounds__(kThreads) WideKeepKernel(SelectTopArgs a, WideState* states, int32_t slice, bool write) {
  __shared__ int32_t warp_counts[kWarps];
  WideState& state = states[blockIdx.y];
  const Selection s = WideSelection(a, blockIdx.y);
  const int32_t entries = s.rows * a.n;
  const int32_t begin = blockIdx.x * slice, end = min(entries, begin + slice);
  const uint32_t threshold = state.threshold;
  int64_t ties_before = 0;
  for (uint32_t b = 0; write && b < blockIdx.x; ++b) ties_before += state.slice_ties[b];
  for (int32_t base = begin; base < end; base += kThreads) {
    const int32_t e = base + threadIdx.x;
    const bool inside = e < end;
    const int32_t p = inside ? e / s.rows : 0, r = inside ? e % s.rows : 0;
    const bool candidate = inside && IsCandidate(a, s, p, r);
    const uint32_t key = candidate ? WideKey(a, s, e) : 0;
    const bool tie = candidate && key == threshold;
    int32_t ties_here = 0;
    const int32_t rank = BlockRank(tie, warp_counts, &ties_here);
    if (write && inside) {
      const bool selected = candidate && (key > threshold || (tie && ties_before + rank < state.ties_needed));
      s.keep[static_cast<int64_t>(r) * a.n + p] = selected ? 1 : 0;
    }
    ties_before += ties_here;
  }
  if (!write && threadIdx.x == 0) state.slice_ties[blockIdx.x] = static_cast<uint32_t>(ties_before);
}

}  // namespace

int64_t SelectTopWorkspaceBytes(const SelectTopArgs& args) {
  if (!SelectTopArgsError(args).empty() || args.merge_rows > 1) return 0;
  const int64_t units = args.rows / args.rows_per_selection;
  const int64_t entries = int64_t{args.rows_per_selection} * args.n;
  if (entries < 2 * kWideSliceEntries || units > 16) return 0;  // one block a selection suffices
  return units * static_cast<int64_t>(sizeof(WideState));
}

absl::Status LaunchSelectTop(const SelectTopArgs& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (std::string error = SelectTopArgsError(args); !error.empty()) return absl::InvalidArgumentError(error);
  const int32_t units = args.merge_rows > 1 ? args.rows / args.merge_rows : args.rows / args.rows_per_selection;
  SelectTopArgs resolved = args;
  if (resolved.row_stride == 0) resolved.row_stride = resolved.n;
  const int64_t wide_bytes = SelectTopWorkspaceBytes(args);
  if (wide_bytes == 0 || units == 0) {
    SelectTopKernel<<<static_cast<unsigned>(units), kThreads, 0, stream>>>(resolved);
    KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }
  if (workspace == nullptr || workspace_bytes < static_cast<size_t>(wide_bytes)) {
    return absl::InvalidArgumentError(absl::StrCat("SelectTop: a workspace of ", wide_bytes, " bytes is needed"));
  }
  auto* states = static_cast<WideState*>(workspace);
  const int64_t entries = int64_t{args.rows_per_selection} * args.n;
  const int32_t slices = static_cast<int32_t>(
      std::min<int64_t>(kWideMaxSlices, (entries + kWideSliceEntries - 1) / kWideSliceEntries));
  const int32_t slice = static_cast<int32_t>((entries + slices - 1) / slices);
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(units));
  KVGATE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(states, 0, static_cast<size_t>(wide_bytes), stream));
  WideHistKernel<<<grid, kThreads, 0, stream>>>(resolved, states, slice, -1);
  WideStepKernel<<<1, 32, 0, stream>>>(resolved, states, units, -1);
  for (int shift = 24; shift >= 0; shift -= 8) {
    WideHistKernel<<<grid, kThreads, 0, stream>>>(resolved, states, slice, shift);
    WideStepKernel<<<1, 32, 0, stream>>>(resolved, states, units, shift);
  }
  WideKeepKernel<<<grid, kThreads, 0, stream>>>(resolved, states, slice, false);
  WideKeepKernel<<<grid, kThreads, 0, stream>>>(resolved, states, slice, true);
  KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace kvgate::ops
