// File: a Hugging Face `tokenizer.json` tokenizer whose ids and decoded text equal
// those of HF `tokenizers` (checked against fixtures made by tokenizers 0.23).
//
// Supported components (anything else is rejected at load time with an
// InvalidArgumentError naming the JSON path and the type):
//   normalizer:     null, Sequence, Prepend, Replace (String/Regex), NFC, NFD, NFKC,
//                   NFKD, Lowercase, Strip
//   pre_tokenizer:  null, Sequence, Split, ByteLevel, Metaspace
//   model:          BPE (merges as "a b" or ["a","b"], unk_token, fuse_unk,
//                   byte_fallback, ignore_merges, continuing_subword_prefix,
//                   end_of_word_suffix; dropout must be null or 0)
//   post_processor: null, TemplateProcessing, ByteLevel, BertProcessing,
//                   RobertaProcessing, Sequence
//   decoder:        null, Sequence, Replace, ByteFallback, Fuse, Strip, ByteLevel,
//                   Metaspace
// Unicode data follows what HF 0.23 uses: NFC/NFD/NFKC/NFKD at Unicode 9.0 (HF's
// unicode-normalization-alignments), Lowercase at Unicode 17 (Rust's char), regex classes at
// Unicode 16 (Oniguruma). tokenizer_corpus_test checks ~3,100 strings per tokenizer.
// `truncation` and `padding` are ignored: Encode returns the full sequence.
//
// A Tokenizer is immutable after loading; Encode/Decode may run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace kvgate::engine {

namespace tok {
struct TokenizerState;
}  // namespace tok

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json_text);

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Ids equal to HF `Tokenizer.encode(text, add_special_tokens=...)`.ids, including the
  // tokens the post-processor adds (BOS) when add_special_tokens is true.
  // Invalid UTF-8 input -> InvalidArgumentError naming the byte offset.
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens = true) const;

  // Equal to HF `tokenizer.decode(ids, skip_special_tokens=...)`. Negative ids or ids
  // >= vocab_size() -> InvalidArgumentError (ids inside the range that name no token
  // are dropped, as HF does).
  absl::StatusOr<std::string> Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const;

  // Largest id (model vocab or added token) + 1.
  int32_t vocab_size() const;
  // Added tokens first, then the model vocab (as HF token_to_id).
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The added token's content, else the model vocab entry.
  std::optional<std::string> IdToToken(int32_t id) const;
  // True for an added token with "special": true.
  bool IsSpecial(int32_t id) const;
  // Ids of every added token with "special": true, ascending.
  std::vector<int32_t> SpecialIds() const;

 private:
  explicit Tokenizer(std::unique_ptr<tok::TokenizerState> state);
  std::unique_ptr<tok::TokenizerState> state_;
};

}  // namespace kvgate::engine
