// File: libFuzzer target for the KV handoff decoder: worker.proto KvTransferHeader
// (kv/transport/handoff_proto.h FromHeaderProto) and the layer payloads
// (kv/kv_handoff.h ParseLayer, Validate), as a receiver decodes them.
//
// Input: a little-endian uint32 header size n, n bytes of KvTransferHeader, then the
// payload; each layer takes its layer_bytes from the payload in order (the last takes
// what is left, so a short or long payload is exercised too).
// Properties: errors are INVALID_ARGUMENT; a handoff that parses and validates
// re-serializes to exactly the bytes it came from, and its header round-trips.
// KVGATE_FUZZ_WRITE_SEEDS=DIR writes the seed corpus to DIR and exits.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "fuzz/fuzz_util.h"
#include "fuzz/handoff_fuzz_util.h"
#include "kv/kv_handoff.h"
#include "kv/transport/handoff_proto.h"

namespace {

using kvgate::kv::KvHandoff;

std::string Encode(const KvHandoff& handoff) {
  const std::string header = kvgate::kv::ToHeaderProto(handoff).SerializeAsString();
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
  auto again = kvgate::kv::FromHeaderProto(kvgate::kv::ToHeaderProto(handoff));
  KVGATE_FUZZ_CHECK(again.ok(), again.status().ToString());
  KVGATE_FUZZ_CHECK(again->lengths == header->lengths && again->payload_bytes == header->payload_bytes);
  return 0;
}
