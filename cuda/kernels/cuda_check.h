// File: error-propagation macros for CUDA runtime and cuBLAS calls. They turn a failed
// call into absl::InternalError carrying the call text, the error string, file and
// line (ggml's CUDA_CHECK_GEN message, NCCL's CUDACHECK return); nothing here aborts.
//
// Check cudaGetLastError() after every kernel launch:
//   FooKernel<<<grid, block, 0, stream>>>(...);
//   KVGATE_CUDA_RETURN_IF_ERROR(cudaGetLastError());
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

// Clears the (non-sticky) last error so that the next check does not report it again.
#define KVGATE_CUDA_RETURN_IF_ERROR(expr)                                                       \
  do {                                                                                          \
    cudaError_t kv_err_ = (expr);                                                               \
    if (kv_err_ != cudaSuccess) {                                                               \
      (void)cudaGetLastError();                                                                 \
      return absl::InternalError(absl::StrCat(#expr, ": ", cudaGetErrorString(kv_err_), " at ", \
                                              __FILE__, ":", __LINE__));                        \
    }                                                                                           \
  } while (0)

#define KVGATE_CUBLAS_RETURN_IF_ERROR(expr)                                                     \
  do {                                                                                          \
    cublasStatus_t kv_blas_err_ = (expr);                                                       \
    if (kv_blas_err_ != CUBLAS_STATUS_SUCCESS) {                                                \
      return absl::InternalError(absl::StrCat(#expr, ": ", cublasGetStatusString(kv_blas_err_), \
                                              " at ", __FILE__, ":", __LINE__));                \
    }                                                                                           \
  } while (0)
