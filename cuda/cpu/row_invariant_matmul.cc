#include "cuda/cpu/row_invariant_matmul.h"

#include <algorithm>

namespace kvgate::ops {
namespace {

constexpr int kLanes = 8;
// Rows of x that share one pass over a row of w (register reuse of the w loads).
constexpr int kRowTile = 4;
// Columns (rows of w) per parallel task: a task's w rows stay in L1/L2 while every row of
// x passes over them, so w is read from memory once per call.
constexpr int64_t kColumnsPerTask = 16;

inline float Combine(const float (&acc)[kLanes]) {
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// ROWS dot products of x rows against one w row. Each accumulator sees exactly the
// operations Dot<1> would give it, so the result does not depend on ROWS.
template <int ROWS>
inline void Dots(const float* const* x, const float* w, int32_t k, float* out) {
  float acc[ROWS][kLanes] = {};
  int32_t kk = 0;
  for (; kk + kLanes <= k; kk += kLanes) {
    for (int r = 0; r < ROWS; ++r) {
      for (int l = 0; l < kLanes; ++l) acc[r][l] += x[r][kk + l] * w[kk + l];
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    float tail = 0.0f;
    for (int32_t t = kk; t < k; ++t) tail += x[r][t] * w[t];
    out[r] = Combine(acc[r]) + tail;
  }
}

}  // namespace

void RowInvariantMatMul(const MatMulArgs& a, ThreadPool* pool) {
  const int64_t tasks = (a.n + kColumnsPerTask - 1) / kColumnsPerTask;
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t j_end = std::min<int64_t>(a.n, (task + 1) * kColumnsPerTask);
      for (int64_t j = task * kColumnsPerTask; j < j_end; ++j) {
        const float* w = a.w + j * a.k;
        const float bias = a.bias != nullptr ? a.bias[j] : 0.0f;
        int32_t i = 0;
        for (; i + kRowTile <= a.m; i += kRowTile) {
          const float* x[kRowTile];
          for (int r = 0; r < kRowTile; ++r) x[r] = a.x + static_cast<int64_t>(i + r) * a.k;
          float out[kRowTile];
          Dots<kRowTile>(x, w, a.k, out);
          for (int r = 0; r < kRowTile; ++r) a.y[static_cast<int64_t>(i + r) * a.n + j] = out[r] + bias;
        }
        for (; i < a.m; ++i) {
          const float* x[1] = {a.x + static_cast<int64_t>(i) * a.k};
          float out[1];
          Dots<1>(x, w, a.k, out);
          a.y[static_cast<int64_t>(i) * a.n + j] = out[0] + bias;
        }
      }
    }
  };
  // A decode step of a small model is a few hundred thousand flops: waking threads for
  // it costs more than it saves.
  if (pool == nullptr || static_cast<int64_t>(a.m) * a.n * a.k < (1 << 16)) {
    body(0, tasks);
  } else {
    pool->ParallelFor(tasks, body);
  }
}

}  // namespace kvgate::ops
