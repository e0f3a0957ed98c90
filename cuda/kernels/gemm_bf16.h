// File: GemmBf16 on the GPU through cuBLASLt: bf16 operands, fp32 accumulation
// (CUBLAS_COMPUTE_32F), fp32 or bf16 output, beta = 1 for the fused residual add.
// Row-major y[m, n] = x[m, k] w[n, k]^T is cuBLAS's column-major y^T = op(w) x with
// op = transpose on the k x n column-major view of w. The matmul descriptor, layouts and
// the heuristic's algorithm are made once per (m, n, k, output) and reused, so a decode
// step pays no heuristic query. A product of at most kGemvBf16MaxRows rows (decode) goes
// to the weight-streaming kernel of gemv_bf16.cuh instead, unless the environment sets
// KVGATE_GEMV_BF16=0 (A/B runs of the benchmark).
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <map>
#include <tuple>

#include "absl/status/status.h"
#include "cuda/ops.h"

namespace kvgate::ops {

constexpr size_t kGemmBf16WorkspaceBytes = size_t{32} << 20;

class GemmBf16Runner {
 public:
  GemmBf16Runner() = default;
  GemmBf16Runner(const GemmBf16Runner&) = delete;
  GemmBf16Runner& operator=(const GemmBf16Runner&) = delete;
  ~GemmBf16Runner();

  // Creates the cuBLASLt handle; `workspace` is kGemmBf16WorkspaceBytes of device memory
  // that outlives this runner and is used in stream order.
  absl::Status Init(void* workspace);

  // All pointers in args are device memory, 16-byte aligned (cudaMalloc bases are).
  // Returns INVALID_ARGUMENT for negative sizes, bias with a bf16 output, or accumulate
  // with a bf16 output; m or n == 0 is a no-op; k == 0 writes zeros (or adds nothing).
  absl::Status Run(const GemmBf16Args& args, cudaStream_t stream);

 // The cached cuBLASLt objects of one shape (public for the file's helpers).
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };

 private:
  absl::Status MakePlan(const GemmBf16Args& args, Plan* plan);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  bool use_gemv_ = true;
  std::map<std::tuple<int32_t, int32_t, int32_t, bool>, Plan> plans_;
};

}  // namespace kvgate::ops
