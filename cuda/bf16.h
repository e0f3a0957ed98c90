// File: bfloat16 <-> float32 conversions on the host (references, weight upload, tests).
// bf16 is the upper half of a float32; rounding is to nearest, ties to even, the rule
// of __float2bfloat16_rn on the GPU, so host- and device-rounded values agree bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/ops.h"

namespace kvgate::ops {

inline float Bf16ToF32(Bf16 bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

inline Bf16 F32ToBf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  if ((word & 0x7f800000u) == 0x7f800000u && (word & 0x007fffffu) != 0) {
    return static_cast<Bf16>((word >> 16) | 0x0040u);  // NaN stays a (quiet) NaN
  }
  word += 0x7fffu + ((word >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<Bf16>(word >> 16);
}

// value rounded to the nearest bf16, as a float.
inline float RoundToBf16(float value) { return Bf16ToF32(F32ToBf16(value)); }

}  // namespace kvgate::ops
