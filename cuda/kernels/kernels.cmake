# kvgate_ops_cuda: the CUDA backend (cuda_backend.cc) with cuBLAS for MatMul, cuBLASLt
# for GemmBf16 and one kernel file per op. Included from cuda/CMakeLists.txt when KVGATE_WITH_CUDA, so
# CMAKE_CURRENT_SOURCE_DIR is cuda/.
add_library(kvgate_ops_cuda STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/cuda_backend.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/add.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/argmax_rows.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/attention.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/attention_bf16.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/cast_bf16.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/copy_rows.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/embed.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/embed_bf16.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/gemm_bf16.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/gemv_bf16.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/grouped_decode_attention.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/head_paged_decode_attention.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/matmul_bias.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/pinned_upload_ring.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/rms_norm.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/rms_norm_bf16.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/rope.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/shareable_memory.cc
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/silu_mul.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/silu_mul_bf16.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/store_kv.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/window_attention_probs.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/pool_window_scores.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/select_top.cu
  ${CMAKE_CURRENT_SOURCE_DIR}/kernels/sink_gate_scores.cu)
add_library(kvgate::ops_cuda ALIAS kvgate_ops_cuda)
target_include_directories(kvgate_ops_cuda PUBLIC ${PROJECT_SOURCE_DIR})
target_link_libraries(kvgate_ops_cuda PUBLIC kvgate_common kvgate_ops_cpu CUDA::cudart CUDA::cublas CUDA::cublasLt
                      absl::status absl::statusor absl::strings)
if(NOT KVGATE_CUDA_ARCHITECTURES)
  set(KVGATE_CUDA_ARCHITECTURES "90;80")
endif()
# CUDA_STANDARD 17: CMake 3.25 knows no C++20 flag for nvcc ("requires the language
# dialect CUDA20 ... the current compiler NVIDIA does not support this"), so the .cu
# files are C++17 while the .cc files follow CMAKE_CXX_STANDARD 20; the headers they
# share (absl, cuda/ops.h) are the same in both. No --use_fast_math: the kernels are
# checked element-wise against fp32 references.
set_target_properties(kvgate_ops_cuda PROPERTIES
  CUDA_ARCHITECTURES "${KVGATE_CUDA_ARCHITECTURES}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  CUDA_EXTENSIONS OFF
  POSITION_INDEPENDENT_CODE ON)

# Parity tests against the <Op>Ref references; they skip without a GPU. kvgate_ops is
# defined after this include: target names resolve at generate time, so this links.
kvgate_add_test(cuda_backend_test
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/kernels/cuda_backend_test.cc
  LIBS kvgate_ops
  LABELS gpu)
kvgate_add_test(cuda_bf16_ops_test
  SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/kernels/cuda_bf16_ops_test.cc
  LIBS kvgate_ops
  LABELS gpu)
