// File: the proto mapping of a KvHandoff's descriptor (house-style section 5: FromProto /
// ToProto in one place): worker.proto KvTransferHeader carries everything of a handoff
// but its rows, which travel as layer payloads (kv_handoff.h SerializeLayer).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
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
inline constexpr size_t kMaxDeviceRowsNameBytes = 4096;

// The header of `handoff` (lengths and payload_bytes computed from its rows).
v1::KvTransferHeader ToHeaderProto(const KvHandoff& handoff);

// A handoff shell from a header: every field but the rows; heads sized
// [num_layers * num_kv_heads] and empty (ParseLayer fills them from `lengths`, the
// header's lengths). INVALID_ARGUMENT naming the field for a shape out of range, a
// length count that does not match the shape, a negative length, payload_bytes that
// disagree with the lengths (K and V left out with device_rows), device_rows whose names
// are empty, whose rows are not the lengths' sum or whose dtype is unknown.
// K and V rows that stay in the sender's device memory (header.device_rows).
struct DeviceRowsRef {
  std::string k_name, v_name;  // Backend::OpenIpc names
  int64_t rows = 0;
  ops::KvDtype dtype = ops::KvDtype::kFloat32;
  // Bytes of each of the K and V buffers: [max(rows, 1), head_dim] of dtype (as
  // KvPool::GatherRows allocates them).
  int64_t buffer_bytes = 0;
};
struct TransferHeader {
  KvHandoff shell;
  std::vector<int32_t> lengths;       // [num_layers * num_kv_heads]
  std::vector<int64_t> layer_bytes;   // [num_layers] payload bytes per layer
  int64_t payload_bytes = 0;
  std::optional<DeviceRowsRef> device_rows;
  // What the receiver holds once the transfer is complete: the payload and, with device
  // rows, its own copies of K and V (KvHandoff::HeldBytes of the delivered handoff).
  int64_t held_bytes() const { return payload_bytes + (device_rows ? 2 * device_rows->buffer_bytes : 0); }
};
absl::StatusOr<TransferHeader> FromHeaderProto(const v1::KvTransferHeader& header);

}  // namespace kvgate::kv
