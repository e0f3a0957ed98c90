#include <atomic>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cuda/backend.h"
#include "cuda/cpu/cpu_backend.h"
#include "cuda/cuda_backend.h"

namespace kvgate::ops {

uint64_t NewConstantOwner() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1);
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(std::string_view name_view) {
  // Debian's abseil has its own string_view type, so messages use a std::string.
  const std::string name(name_view);
  if (name == "cpu") return CreateCpuBackend();
  if (name == "cuda") return CreateCudaBackend(0);
  if (name.substr(0, 5) == "cuda:") {
    int ordinal = 0;
    if (!absl::SimpleAtoi(name.substr(5), &ordinal) || ordinal < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("backend '", name, "': the device ordinal after 'cuda:' must be a non-negative integer"));
    }
    return CreateCudaBackend(ordinal);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", name, "'; expected cpu, cuda or cuda:N"));
}

}  // namespace kvgate::ops
