// File: libFuzzer target for the tokenizer (engine/tokenizer.h) over every tokenizer.json
// the repository holds: models/kvgate-tiny and tests/golden/tokenizers/*/.
//
// Input: byte 0 picks the tokenizer (mod count) and the mode (bits 7..6 after the pick);
// the rest is the payload.
//   mode 0/1: payload is text. Encode(text, add_special = mode), every id must be in
//             [0, vocab_size); Decode(ids) with and without skip_special_tokens must
//             succeed (ids came from Encode).
//   mode 2/3: payload is little-endian int32 ids (the fuzzer's raw values: out-of-range
//             and negative ids must be InvalidArgument, never a crash); then the same
//             ids folded into [0, vocab_size) must decode OK.
// Checks are KVGATE_FUZZ_CHECKs: a violation is a crash the fuzzer reports.
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "engine/tokenizer.h"
#include "fuzz/fuzz_util.h"

namespace {

using kvgate::engine::Tokenizer;

const std::vector<std::unique_ptr<Tokenizer>>& Tokenizers() {
  static const auto* tokenizers = [] {
    auto* out = new std::vector<std::unique_ptr<Tokenizer>>();
    for (const std::string& path : kvgate::fuzz::TokenizerPaths()) {
      auto tok = Tokenizer::FromFile(path);
      KVGATE_FUZZ_CHECK(tok.ok(), path, ": ", tok.status().ToString());
      out->push_back(std::move(*tok));
    }
    KVGATE_FUZZ_CHECK(!out->empty());
    return out;
  }();
  return *tokenizers;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Tokenizers();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1 || size > 4096) return 0;  // long inputs only slow the BPE down
  const auto& tokenizers = Tokenizers();
  const Tokenizer& tok = *tokenizers[data[0] % tokenizers.size()];
  const int mode = (data[0] / tokenizers.size()) % 4;
  const std::string_view payload(reinterpret_cast<const char*>(data + 1), size - 1);
  const int32_t vocab = tok.vocab_size();

  if (mode < 2) {
    auto ids = tok.Encode(payload, /*add_special_tokens=*/mode == 1);
    if (!ids.ok()) {
      KVGATE_FUZZ_CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument, ids.status().ToString());
      return 0;
    }
    for (int32_t id : *ids) KVGATE_FUZZ_CHECK(id >= 0 && id < vocab, id);
    for (bool skip : {false, true}) {
      auto text = tok.Decode(*ids, skip);
      KVGATE_FUZZ_CHECK(text.ok(), text.status().ToString());
    }
    return 0;
  }

  std::vector<int32_t> ids(payload.size() / 4);
  if (!ids.empty()) std::memcpy(ids.data(), payload.data(), ids.size() * 4);
  const bool skip = mode == 3;
  auto raw = tok.Decode(ids, skip);
  bool in_range = true;
  for (int32_t id : ids) in_range &= id >= 0 && id < vocab;
  KVGATE_FUZZ_CHECK(raw.ok() == in_range, raw.status().ToString());
  if (!raw.ok()) KVGATE_FUZZ_CHECK(raw.status().code() == absl::StatusCode::kInvalidArgument);
  for (int32_t& id : ids) id = static_cast<int32_t>(static_cast<uint32_t>(id) % static_cast<uint32_t>(vocab));
  auto folded = tok.Decode(ids, skip);
  KVGATE_FUZZ_CHECK(folded.ok(), folded.status().ToString());
  return 0;
}
