#include "cuda/kernels/gemm_bf16.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "cuda/kernels/cuda_check.h"
#include "cuda/kernels/gemv_bf16.cuh"
#include "cuda/kernels/matmul_bias.cuh"

namespace kvgate::ops {

namespace {

void DestroyPlan(const GemmBf16Runner::Plan& plan) {
  if (plan.a != nullptr) cublasLtMatrixLayoutDestroy(plan.a);
  if (plan.b != nullptr) cublasLtMatrixLayoutDestroy(plan.b);
  if (plan.c != nullptr) cublasLtMatrixLayoutDestroy(plan.c);
  if (plan.desc != nullptr) cublasLtMatmulDescDestroy(plan.desc);
}

}  // namespace

GemmBf16Runner::~GemmBf16Runner() {
  for (const auto& [key, plan] : plans_) DestroyPlan(plan);
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

absl::Status GemmBf16Runner::Init(void* workspace) {
  workspace_ = workspace;
  const char* gemv = std::getenv("KVGATE_GEMV_BF16");
  use_gemv_ = gemv == nullptr || std::strcmp(gemv, "0") != 0;
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&handle_));
  return absl::OkStatus();
}

absl::Status GemmBf16Runner::MakePlan(const GemmBf16Args& args, Plan* plan) {
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                               &transa, sizeof(transa)));
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                               &transb, sizeof(transb)));
  // A = w as stored: column-major k x n (ld k), transposed; B = x: column-major k x m;
  // C = D = y: column-major n x m (ld n).
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, args.k, args.n, args.k));
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, args.k, args.m, args.k));
  KVGATE_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&plan->c, args.y_bf16 ? CUDA_R_16BF : CUDA_R_32F, args.n, args.m, args.n));
  cublasLtMatmulPreference_t preference = nullptr;
  KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&preference));
  const size_t workspace_bytes = kGemmBf16WorkspaceBytes;
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(
      preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes, sizeof(workspace_bytes));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (status == CUBLAS_STATUS_SUCCESS) {
    status = cublasLtMatmulAlgoGetHeuristic(handle_, plan->desc, plan->a, plan->b, plan->c, plan->c, preference, 1,
                                            &result, &found);
  }
  cublasLtMatmulPreferenceDestroy(preference);
  KVGATE_CUBLAS_RETURN_IF_ERROR(status);
  if (found == 0) {
    return absl::InternalError(absl::StrCat("GemmBf16: cuBLASLt has no algorithm for m=", args.m, " n=", args.n,
                                            " k=", args.k, args.y_bf16 ? " (bf16 out)" : " (fp32 out)"));
  }
  plan->algo = result.algo;
  return absl::OkStatus();
}

absl::Status GemmBf16Runner::Run(const GemmBf16Args& args, cudaStream_t stream) {
  if (args.m < 0 || args.n < 0 || args.k < 0) return absl::InvalidArgumentError("GemmBf16: negative size");
  if (args.y_bf16 && (args.bias != nullptr || args.accumulate)) {
    return absl::InvalidArgumentError("GemmBf16: bias and accumulate need an fp32 output");
  }
  if (args.m == 0 || args.n == 0) return absl::OkStatus();
  if (use_gemv_ && GemvBf16Supported(args)) return LaunchGemvBf16(args, stream);
  if (args.k == 0) {
    // An empty sum; cuBLASLt would reject a leading dimension of 0.
    if (!args.accumulate) {
      KVGATE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
          args.y, 0, static_cast<size_t>(args.m) * args.n * (args.y_bf16 ? 2 : 4), stream));
    }
  } else {
    const auto key = std::make_tuple(args.m, args.n, args.k, args.y_bf16);
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      Plan plan;
      const absl::Status made = MakePlan(args, &plan);
      if (!made.ok()) {
        DestroyPlan(plan);
        return made;
      }
      it = plans_.emplace(key, plan).first;
    }
    const Plan& plan = it->second;
    const float alpha = 1.0f;
    const float beta = args.accumulate ? 1.0f : 0.0f;
    KVGATE_CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(handle_, plan.desc, &alpha, args.w, plan.a, args.x, plan.b, &beta,
                                                 args.y, plan.c, args.y, plan.c, &plan.algo, workspace_,
                                                 kGemmBf16WorkspaceBytes, stream));
  }
  if (args.bias == nullptr) return absl::OkStatus();
  MatMulArgs bias_args;
  bias_args.bias = args.bias;
  bias_args.y = static_cast<float*>(args.y);
  bias_args.m = args.m;
  bias_args.n = args.n;
  bias_args.k = args.k;
  return LaunchMatMulBias(bias_args, stream);
}

}  // namespace kvgate::ops
