#include "common/crc32c.h"

#include <array>
#include <cstring>

// crcutil's header declares the crc32 intrinsics itself; this file is compiled with
// -mcrc32 so that GCC accepts them. Only crcutil's out-of-line code, compiled by Debian
// with the instruction, runs them, and only after IsSSE42Available().
#include <crc32c_sse4.h>

namespace kvgate {
namespace {

constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;

// Slicing-by-8: kTables[0] is the byte-at-a-time table; kTables[k][b] advances b through
// k more zero bytes.
constexpr std::array<std::array<uint32_t, 256>, 8> MakeTables() {
  std::array<std::array<uint32_t, 256>, 8> t{};
  for (uint32_t b = 0; b < 256; ++b) {
    uint32_t crc = b;
    for (int i = 0; i < 8; ++i) crc = (crc >> 1) ^ ((crc & 1u) ? kCastagnoliReflected : 0u);
    t[0][b] = crc;
  }
  for (size_t k = 1; k < 8; ++k) {
    for (uint32_t b = 0; b < 256; ++b) t[k][b] = (t[k - 1][b] >> 8) ^ t[0][t[k - 1][b] & 0xFFu];
  }
  return t;
}

constexpr std::array<std::array<uint32_t, 256>, 8> kTables = MakeTables();

// crcutil's engine holds its stripe-combination tables (about 64 KiB), built once.
const crcutil::Crc32cSSE4* HardwareEngine() {
  static const crcutil::Crc32cSSE4* const engine =
      crcutil::Crc32cSSE4::IsSSE42Available() ? new crcutil::Crc32cSSE4(/*canonical=*/true) : nullptr;
  return engine;
}

}  // namespace

uint32_t Crc32cSoftware(std::string_view data) {
  const auto& t = kTables;
  uint32_t crc = 0xFFFFFFFFu;
  const unsigned char* p = reinterpret_cast<const unsigned char*>(data.data());
  size_t n = data.size();
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= crc;
    crc = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
          t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return crc ^ 0xFFFFFFFFu;
}

uint32_t Crc32c(std::string_view data) {
  const crcutil::Crc32cSSE4* engine = HardwareEngine();
  if (engine == nullptr) return Crc32cSoftware(data);
  return static_cast<uint32_t>(engine->CrcDefault(data.data(), data.size(), 0));
}

bool Crc32cIsHardwareAccelerated() { return HardwareEngine() != nullptr; }

}  // namespace kvgate
