// File: libFuzzer target for the worker protos' decoders (kv_manager/proto_convert.h:
// SamplingParams, CompressionSpec and EvictionPlan to the domain structs, as the KV
// manager and the workers decode what the router sent them).
//
// Input: byte 0 picks the message (mod 3), the rest is its wire bytes.
// Properties: decoding never fails or crashes on any parseable message, and the mapping
// is stable: ToProto(FromProto(ToProto(FromProto(p)))) == ToProto(FromProto(p)) byte
// for byte (the first decode resolves what the contract fixes, e.g. top_p 0 -> 1;
// after that a round trip changes nothing).
#include <cstdint>
#include <string>

#include "fuzz/fuzz_util.h"
#include "kv_manager/proto_convert.h"

namespace {

template <typename Proto>
std::string Bytes(const Proto& p) {
  std::string out;
  p.SerializeToString(&out);  // no maps in these messages: field order is fixed
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const void* wire = data + 1;
  const int n = static_cast<int>(size - 1);
  using namespace kvgate;
  switch (data[0] % 3) {
    case 0: {
      v1::SamplingParams p;
      if (!p.ParseFromArray(wire, n)) return 0;
      const v1::SamplingParams once = kv::ToProto(kv::FromProto(p));
      const v1::SamplingParams twice = kv::ToProto(kv::FromProto(once));
      KVGATE_FUZZ_CHECK(Bytes(once) == Bytes(twice), once.ShortDebugString(), " vs ", twice.ShortDebugString());
      break;
    }
    case 1: {
      v1::CompressionSpec p;
      if (!p.ParseFromArray(wire, n)) return 0;
      const v1::CompressionSpec once = kv::ToProto(kv::FromProto(p));
      const v1::CompressionSpec twice = kv::ToProto(kv::FromProto(once));
      KVGATE_FUZZ_CHECK(Bytes(once) == Bytes(twice), once.ShortDebugString(), " vs ", twice.ShortDebugString());
      // The same spec as a plan (router -> KV manager -> prefill worker).
      const v1::EvictionPlan plan = kv::ToPlanProto(kv::FromProto(p));
      KVGATE_FUZZ_CHECK(Bytes(kv::ToPlanProto(kv::FromProto(plan))) == Bytes(plan), plan.ShortDebugString());
      break;
    }
    case 2: {
      v1::EvictionPlan p;
      if (!p.ParseFromArray(wire, n)) return 0;
      const v1::EvictionPlan once = kv::ToPlanProto(kv::FromProto(p));
      const v1::EvictionPlan twice = kv::ToPlanProto(kv::FromProto(once));
      KVGATE_FUZZ_CHECK(Bytes(once) == Bytes(twice), once.ShortDebugString(), " vs ", twice.ShortDebugString());
      break;
    }
  }
  return 0;
}
