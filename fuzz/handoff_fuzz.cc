// File: libFuzzer target for the KV handoff decoder: worker.proto KvTransferHeader
// (kv/transport/handoff_proto.h FromHeaderProto) and the layer payloads
// (kv/kv_handoff.h ParseLayer, Validate), as a receiver decodes them.
//
// Input: a little-endian uint32 header size n, n bytes of KvTransferHeader, then the
// payload; each layer takes its layer_bytes from the payload in order (the last takes
// what is left, so a short or long payload is exercised too).
// A header with device_rows (cuda_ipc) is decoded as the KvTransfer service does: K and V
// stay apart (here a host stand-in for the receiver's device copies, when small), and the
// layer payloads hold positions, masks and scores only.
// Properties: errors are INVALID_ARGUMENT; a handoff that parses and validates
// re-serializes to exactly the bytes it came from, and its header round-trips.
// KVGATE_FUZZ_WRITE_SEEDS=DIR writes the seed corpus to DIR and exits.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>

#include "fuzz/fuzz_util.h"
#include "fuzz/handoff_fuzz_util.h"
#include "kv/kv_handoff.h"
#include "kv/transport/handoff_proto.h"

namespace {

using kvgate::kv::KvHandoff;

// Backend rows in host memory standing in for the receiver's device copies.
std::shared_ptr<const kvgate::kv::BackendRows> HostRows(int64_t rows, int32_t head_dim, kvgate::ops::KvDtype dtype,
                                                        size_t bytes) {
  auto out = std::make_shared<kvgate::kv::BackendRows>();
  out->backend = "host stand-in";
  out->rows = rows;
  out->head_dim = head_dim;
  out->dtype = dtype;
  out->k = kvgate::ops::DeviceBuffer(std::calloc(bytes, 1), bytes, [](void* p) { std::free(p); });
  out->v = kvgate::ops::DeviceBuffer(std::calloc(bytes, 1), bytes, [](void* p) { std::free(p); });
  return out;
}

// The header a sender writes for `handoff`; with backend rows, naming them as cuda_ipc does.
kvgate::v1::KvTransferHeader HeaderOf(const KvHandoff& handoff) {
  kvgate::v1::KvTransferHeader header = kvgate::kv::ToHeaderProto(handoff);
  if (handoff.backend_rows != nullptr) {
    kvgate::v1::KvDeviceRows* device = header.mutable_device_rows();
    device->set_k_name("k-ipc-name");
    device->set_v_name("v-ipc-name");
    device->set_rows(handoff.backend_rows->rows);
    device->set_dtype(handoff.backend_rows->dtype == kvgate::ops::KvDtype::kBf16 ? kvgate::v1::KV_ROW_DTYPE_BF16
                                                                                  : kvgate::v1::KV_ROW_DTYPE_FLOAT32);
  }
  return header;
}

std::string Encode(const KvHandoff& handoff) {
  const std::string header = HeaderOf(handoff).SerializeAsString();
  const uint32_t n = static_cast<uint32_t>(header.size());
  std::string out(reinterpret_cast<const char*>(&n), 4);
  out += header;
  for (int32_t l = 0; l < handoff.num_layers; ++l) out += kvgate::kv::SerializeLayer(handoff, l);
  return out;
}

void WriteSeeds(const std::string& dir) {
  std::filesystem::create_directories(dir);
  for (bool full : {false, true}) {
    std::ofstream(dir + (full ? "/masks_scores" : "/plain"), std::ios::binary)
        << Encode(kvgate::fuzz::SeedHandoff(full));
  }
  // cuda_ipc: K and V named in the header, not in the payload.
  KvHandoff device = kvgate::fuzz::SeedHandoff(true);
  int64_t rows = 0;
  for (kvgate::kv::HeadRows& head : device.heads) {
    rows += static_cast<int64_t>(head.positions.size());
    head.k.clear();
    head.v.clear();
  }
  device.backend_rows = HostRows(rows, device.head_dim, kvgate::ops::KvDtype::kBf16,
                                 static_cast<size_t>(std::max<int64_t>(rows, 1)) * device.head_dim * 2);
  std::ofstream(dir + "/device_rows", std::ios::binary) << Encode(device);
}

void CheckInvalidArgument(const absl::Status& s) {
  KVGATE_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument, s.ToString());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("KVGATE_FUZZ_WRITE_SEEDS")) {
    WriteSeeds(dir);
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  uint32_t header_bytes = 0;
  std::memcpy(&header_bytes, data, 4);
  if (header_bytes > size - 4) return 0;
  kvgate::v1::KvTransferHeader proto;
  if (!proto.ParseFromArray(data + 4, static_cast<int>(header_bytes))) return 0;
  std::string_view payload(reinterpret_cast<const char*>(data) + 4 + header_bytes, size - 4 - header_bytes);

  auto header = kvgate::kv::FromHeaderProto(proto);
  if (!header.ok()) {
    CheckInvalidArgument(header.status());
    return 0;
  }
  KvHandoff handoff = std::move(header->shell);
  if (header->device_rows) {
    // The service copies the named rows into buffers of buffer_bytes each; the stand-in
    // only for sizes a fuzz input may allocate.
    if (header->device_rows->buffer_bytes > (int64_t{1} << 20)) return 0;
    handoff.backend_rows = HostRows(header->device_rows->rows, handoff.head_dim, header->device_rows->dtype,
                                    static_cast<size_t>(header->device_rows->buffer_bytes));
  }
  const int32_t L = handoff.num_layers;
  size_t at = 0;
  for (int32_t l = 0; l < L; ++l) {
    const size_t want = static_cast<size_t>(header->layer_bytes[l]);
    const size_t take = l + 1 == L ? payload.size() - at : std::min(want, payload.size() - at);
    absl::Status s = kvgate::kv::ParseLayer(payload.substr(at, take), header->lengths, l, &handoff);
    if (!s.ok()) {
      CheckInvalidArgument(s);
      return 0;
    }
    at += take;
  }
  if (absl::Status s = handoff.Validate(); !s.ok()) {
    CheckInvalidArgument(s);
    return 0;
  }
  // Accepted: it must be exactly what a sender of this handoff would have sent.
  KVGATE_FUZZ_CHECK(handoff.PayloadBytes() == header->payload_bytes);
  for (int32_t l = 0, off = 0; l < L; ++l) {
    const std::string layer = kvgate::kv::SerializeLayer(handoff, l);
    KVGATE_FUZZ_CHECK(layer == payload.substr(off, layer.size()), "layer ", l);
    off += static_cast<int32_t>(layer.size());
  }
  kvgate::v1::KvTransferHeader resent = kvgate::kv::ToHeaderProto(handoff);
  if (proto.has_device_rows()) *resent.mutable_device_rows() = proto.device_rows();
  auto again = kvgate::kv::FromHeaderProto(resent);
  KVGATE_FUZZ_CHECK(again.ok(), again.status().ToString());
  KVGATE_FUZZ_CHECK(again->lengths == header->lengths && again->payload_bytes == header->payload_bytes);
  return 0;
}
