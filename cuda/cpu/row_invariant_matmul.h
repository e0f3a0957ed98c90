// File: the CPU GEMM for few rows (decode steps, small chunks) whose every output
// element is computed by the same instruction sequence whatever the number of rows, so a
// sequence decoded in a batch gets bit-for-bit the logits it gets decoded alone.
//
// Why our own loop: OpenBLAS picks its kernel from the shape (a "small matrix" kernel
// below an M*N*K threshold on AVX-512 machines, the blocked kernel above), so one row and
// six rows were summed in different orders: 1.368e-5 apart on one machine, 0 on another.
#pragma once

#include <cstdint>

#include "cuda/cpu/parallel_for.h"
#include "cuda/ops.h"

namespace kvgate::ops {

// Up to this many rows MatMul runs RowInvariantMatMul; above it, OpenBLAS (prefill).
// Decode batches are far smaller (one row per sequence), so decode is batch-invariant.
constexpr int32_t kRowInvariantMaxRows = 64;

// y[i, j] = dot(x[i, :], w[j, :]) (+ bias[j]) with one fixed summation order: eight
// interleaved float partial sums over k, a fixed pairwise combine, then the tail.
// Threads split the output columns, which does not change any element's arithmetic.
void RowInvariantMatMul(const MatMulArgs& args, ThreadPool* pool);

}  // namespace kvgate::ops
