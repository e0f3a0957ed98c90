// File: internal pipeline stages of engine::Tokenizer (normalizers, pre-tokenizers,
// the BPE model, post-processors, decoders), each built from its tokenizer.json node.
//
// The stages work on plain strings rather than HF's offset-tracking NormalizedString:
// only ids and decoded text are produced, and the one place HF consults original
// offsets (Metaspace prepend_scheme "first") is served by Piece::orig_start.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "engine/tokenizer_util.h"

namespace kvgate::engine::tok {

using Json = nlohmann::json;

// A piece of the input as it flows through the pipeline.
struct Piece {
  std::string text;
  // Where the piece starts in the caller's text; 0 only for the piece at the very
  // start (what Metaspace "first" asks). Approximate after a normalizer has changed
  // lengths, which only matters for normalizer + Metaspace(first) combinations.
  size_t orig_start = 0;
  // >= 0 when the piece is an added token, which no later stage touches.
  int32_t id = -1;
};

// The error every unsupported or malformed node produces.
absl::Status Unsupported(std::string_view path, std::string_view type);
absl::Status Malformed(std::string_view path, std::string_view what);

// Typed field access with clear errors ("tokenizer.json: model.vocab must be an object").
absl::StatusOr<std::string> GetString(const Json& j, std::string_view key, std::string_view path);
absl::StatusOr<bool> GetBool(const Json& j, std::string_view key, std::string_view path,
                             std::optional<bool> dflt);
absl::StatusOr<int64_t> GetInt(const Json& j, std::string_view key, std::string_view path,
                               std::optional<int64_t> dflt);
// A field holding exactly one Unicode char (Metaspace replacement, Strip content).
absl::StatusOr<std::string> GetChar(const Json& j, std::string_view key, std::string_view path);
// A {"String": s} or {"Regex": r} pattern, compiled (String patterns are escaped).
absl::StatusOr<std::unique_ptr<Regex>> GetPattern(const Json& j, std::string_view key,
                                                  std::string_view path);

// ---- Normalizers -----------------------------------------------------------------
class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual absl::Status Normalize(std::string& s) const = 0;
};
// `j` may be null (returns nullptr).
absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const Json& j, const std::string& path);

// Shared by the Replace normalizer and decoder: every match of `re` in `s` becomes
// `content`, taken literally ("$1" is not expanded, as in HF 0.23).
absl::StatusOr<std::string> ReplaceAll(const Regex& re, std::string_view s,
                                       std::string_view content);

// ---- Pre-tokenizers --------------------------------------------------------------
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Rewrites/splits every piece with id < 0; pieces that end up empty are dropped.
  virtual absl::Status PreTokenize(std::vector<Piece>& pieces) const = 0;
};
absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const Json& j,
                                                                const std::string& path);

// ---- Model -----------------------------------------------------------------------
class BpeModel {
 public:
  static absl::StatusOr<std::unique_ptr<BpeModel>> Parse(const Json& j, const std::string& path);

  // Appends the ids of one pre-token (HF Model::tokenize).
  absl::Status Tokenize(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // nullptr when no vocab entry has this id.
  const std::string* IdToToken(int32_t id) const;
  int32_t max_id() const { return static_cast<int32_t>(vocab_r_.size()) - 1; }
  // Number of vocab entries (HF get_vocab_size, which is not max_id + 1 with holes).
  int32_t vocab_count() const { return static_cast<int32_t>(vocab_.size()); }

 private:
  BpeModel() = default;
  absl::Status MergeWord(std::string_view w, std::vector<int32_t>& out) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::optional<std::string>> vocab_r_;
  // (left id, right id) -> (rank, merged id)
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  std::optional<std::string> unk_token_;
  std::optional<std::string> prefix_;
  std::optional<std::string> suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  int32_t byte_ids_[256];  // <0xXX> token ids, -1 when absent
};

// ---- Post-processors -------------------------------------------------------------
class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Only called when add_special_tokens is true.
  virtual void Process(std::vector<int32_t>& ids) const = 0;
};
absl::StatusOr<std::unique_ptr<PostProcessor>> ParsePostProcessor(const Json& j,
                                                                  const std::string& path);

// ---- Decoders --------------------------------------------------------------------
class Decoder {
 public:
  virtual ~Decoder() = default;
  // HF Decoder::decode_chain: tokens in, tokens out (the caller concatenates).
  virtual absl::Status DecodeChain(std::vector<std::string>& tokens) const = 0;
};
absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const Json& j, const std::string& path);

// GPT-2's byte <-> printable-char table (bytes_to_unicode), as UTF-8 strings.
const std::string& ByteToUnicode(uint8_t b);
// -1 when `cp` is not in the table.
int UnicodeToByte(char32_t cp);

}  // namespace kvgate::engine::tok
