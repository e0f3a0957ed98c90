# The GPU engine benchmark's driver (bench/gpu_engine_bench.py runs it on the GPU
# machine); it also builds without CUDA, where it can time the cpu backend.
add_executable(gpu_engine_bench ${CMAKE_CURRENT_SOURCE_DIR}/gpu_engine_bench.cc)
target_link_libraries(gpu_engine_bench PRIVATE kvgate_engine kvgate_kv_handoff absl::status absl::statusor absl::strings)
