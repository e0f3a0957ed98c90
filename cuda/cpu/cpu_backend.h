// File: the CPU backend: OpenBLAS GEMMs and threaded loops over host memory.
#pragma once

#include <memory>

#include "cuda/backend.h"

namespace kvgate::ops {

// num_threads <= 0 means std::thread::hardware_concurrency().
std::unique_ptr<Backend> CreateCpuBackend(int num_threads = 0);

}  // namespace kvgate::ops
