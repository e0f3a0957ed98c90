// File: the proto mapping of a KvHandoff's descriptor (house-style section 5: FromProto /
// ToProto in one place): worker.proto KvTransferHeader carries everything of a handoff
// but its rows, which travel as layer payloads (kv_handoff.h SerializeLayer).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kv/kv_handoff.h"
#include "kvgate/v1/worker.pb.h"

namespace kvgate::kv {

// Largest shape a receiver accepts, so a malformed header cannot make it allocate
// unbounded bookkeeping before any byte is reserved.
inline constexpr int32_t kMaxTransferLayers = 1024;
inline constexpr int32_t kMaxTransferKvHeads = 1024;
inline constexpr int64_t kMaxTransferHeads = 65536;  // layers * kv heads
inline constexpr int32_t kMaxTransferHeadDim = 65536;
inline constexpr int64_t kMaxTransferPayloadBytes = int64_t{1} << 50;

// The header of `handoff` (lengths and payload_bytes computed from its rows).
v1::KvTransferHeader ToHeaderProto(const KvHandoff& handoff);

// A handoff shell from a header: every field but the rows; heads sized
// [num_layers * num_kv_heads] and empty (ParseLayer fills them from `lengths`, the
// header's lengths). INVALID_ARGUMENT naming the field for a shape out of range, a
// length count that does not match the shape, a negative length, payload_bytes that
// disagree with the lengths or an unknown eviction kind.
struct TransferHeader {
  KvHandoff shell;
  std::vector<int32_t> lengths;       // [num_layers * num_kv_heads]
  std::vector<int64_t> layer_bytes;   // [num_layers] payload bytes per layer
  int64_t payload_bytes = 0;
};
absl::StatusOr<TransferHeader> FromHeaderProto(const v1::KvTransferHeader& header);

}  // namespace kvgate::kv
