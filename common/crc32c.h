// File: CRC-32C (Castagnoli, reflected polynomial 0x82F63B78; crc32c("123456789") =
// 0xE3069283), the checksum every KV layer chunk carries on the wire
// (KvLayerChunk.crc32c). Computed by Debian's crcutil (Google's library, the SSE4.2
// `crc32` instruction over three interleaved stripes), with the table-driven loop kept
// for CPUs without SSE4.2 and as the benchmark's peer.
#pragma once

#include <cstdint>
#include <string_view>

namespace kvgate {

// CRC-32C of `data`: the hardware path when the CPU has SSE4.2, else the software one.
uint32_t Crc32c(std::string_view data);

// The software form (slicing-by-8 tables), whatever the CPU.
uint32_t Crc32cSoftware(std::string_view data);

// True when Crc32c runs on the CPU's crc32 instruction.
bool Crc32cIsHardwareAccelerated();

}  // namespace kvgate
