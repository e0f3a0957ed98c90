// CRC-32C throughput on this CPU: the selected path (crcutil's SSE4.2 `crc32` over three
// stripes), the table-driven software loop (the peer it replaced), and the floor set by
// reading the same bytes (a sum of 64-bit words, which the compiler vectorises: the memory
// or cache read rate). Buffers from a KV layer chunk's size (64 KiB) up to 64 MiB, each
// timed as the best of several passes.
//   crc32c_bench [--json FILE]
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "common/crc32c.h"

namespace {

// Sum of the buffer as 64-bit words: the cost of touching every byte once.
__attribute__((noinline)) uint64_t ReadAll(std::string_view data) {
  uint64_t sum = 0;
  const size_t words = data.size() / 8;
  for (size_t i = 0; i < words; ++i) {
    uint64_t w;
    std::memcpy(&w, data.data() + 8 * i, 8);
    sum += w;
  }
  return sum;
}

template <typename Fn>
double BestGBps(std::string_view data, Fn&& fn) {
  const size_t passes = std::max<size_t>(3, (256u << 20) / data.size());
  double best_s = 1e30;
  volatile uint64_t sink = 0;
  for (int trial = 0; trial < 5; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t p = 0; p < passes; ++p) sink = sink + fn(data);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / passes;
    best_s = std::min(best_s, s);
  }
  return static_cast<double>(data.size()) / best_s / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0 && i + 1 < argc) {
      json_path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: crc32c_bench [--json FILE]\n");
      return 2;
    }
  }
  std::mt19937_64 rng(1);
  std::string buffer(64u << 20, '\0');
  for (size_t i = 0; i + 8 <= buffer.size(); i += 8) {
    const uint64_t w = rng();
    std::memcpy(buffer.data() + i, &w, 8);
  }
  std::printf("crc32c path: %s\n", kvgate::Crc32cIsHardwareAccelerated() ? "crcutil (SSE4.2 crc32)" : "software tables");
  std::printf("| bytes | read floor GB/s | crc32c (selected) GB/s | of floor | software tables GB/s | selected / software |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|\n");
  std::string rows;
  for (size_t size : {size_t{64} << 10, size_t{1} << 20, size_t{16} << 20, size_t{64} << 20}) {
    const std::string_view data(buffer.data(), size);
    const double floor = BestGBps(data, ReadAll);
    const double selected = BestGBps(data, [](std::string_view d) { return uint64_t{kvgate::Crc32c(d)}; });
    const double software = BestGBps(data, [](std::string_view d) { return uint64_t{kvgate::Crc32cSoftware(d)}; });
    std::printf("| %zu | %.2f | %.2f | %.0f%% | %.2f | %.1fx |\n", size, floor, selected, 100 * selected / floor,
                software, selected / software);
    absl::StrAppendFormat(&rows, "%s{\"bytes\": %d, \"read_floor_gbps\": %.3f, \"crc32c_gbps\": %.3f, \"software_gbps\": %.3f}",
                          rows.empty() ? "" : ", ", size, floor, selected, software);
  }
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    out << "{\"hardware\": " << (kvgate::Crc32cIsHardwareAccelerated() ? "true" : "false") << ", \"rows\": [" << rows
        << "]}\n";
  }
  return 0;
}
