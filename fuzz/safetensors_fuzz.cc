// File: libFuzzer target for the safetensors reader (engine/safetensors.h). The input is
// a whole file (8-byte little-endian header length, JSON header, data), written to a
// memfd and opened by path through /proc/self/fd, as SafetensorsFile::Open maps real
// checkpoints. An accepted file must describe only bytes inside the mapping: every
// tensor's bytes are read (summed) so a lying header that slipped through faults here.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "engine/safetensors.h"

namespace {

int MemFd() {
  static const int fd = [] {
    const int fd = memfd_create("safetensors_fuzz", MFD_CLOEXEC);
    KVGATE_FUZZ_CHECK(fd >= 0);
    return fd;
  }();
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 1 << 20) return 0;
  const int fd = MemFd();
  KVGATE_FUZZ_CHECK(ftruncate(fd, 0) == 0);
  KVGATE_FUZZ_CHECK(pwrite(fd, data, size, 0) == static_cast<ssize_t>(size));
  auto file = kvgate::engine::SafetensorsFile::Open("/proc/self/fd/" + std::to_string(fd));
  if (!file.ok()) {
    KVGATE_FUZZ_CHECK(file.status().code() == absl::StatusCode::kInvalidArgument, file.status().ToString());
    return 0;
  }
  uint64_t sum = 0;
  for (const auto& [name, view] : (*file)->tensors()) {
    KVGATE_FUZZ_CHECK(view.bytes == 0 || view.data != nullptr, name);
    for (size_t i = 0; i < view.bytes; ++i) sum += view.data[i];
  }
  volatile uint64_t sink = sum;
  (void)sink;
  return 0;
}
