// File: UTF-8 helpers and a PCRE2 regex wrapper shared by the tokenizer components.
//
// HF `tokenizers` runs its patterns with Oniguruma (Ruby syntax, Unicode 16 tables).
// Regex::Compile rewrites the escapes whose meaning differs in PCRE2 (\s, \w, \h,
// \p{..} general categories, see OnigCompatible in the .cc) and runs PCRE2 in UTF + UCP
// mode; FindAll reproduces the onig crate's find_iter (empty-match handling). Checked
// against HF on GPT-2, Llama-3 and Qwen2 patterns over random Unicode text.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvgate::engine::tok {

// The pinned abseil's string_view is its own type; hash-map lookups by std::string_view
// go through this.
inline absl::string_view AbslView(std::string_view s) { return {s.data(), s.size()}; }

// Byte range [first, second) inside a string.
using ByteRange = std::pair<size_t, size_t>;

// Returns the byte offset of the first invalid UTF-8 sequence, or npos if `s` is
// valid (no overlongs, surrogates or code points above U+10FFFF).
size_t FindInvalidUtf8(std::string_view s);

// Length in bytes of the UTF-8 sequence starting with lead byte `c` (1 for
// anything that is not a valid lead byte). Input must already be valid UTF-8.
inline size_t Utf8Len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c >> 5) == 0x6) return 2;
  if ((c >> 4) == 0xE) return 3;
  if ((c >> 3) == 0x1E) return 4;
  return 1;
}

// Decodes the code point at `s[i]` (valid UTF-8 assumed) and advances `i`.
char32_t DecodeUtf8(std::string_view s, size_t& i);
void AppendUtf8(char32_t cp, std::string& out);
std::string EncodeUtf8(char32_t cp);

// Rust `String::from_utf8_lossy`: each maximal invalid subpart becomes one U+FFFD.
std::string Utf8Lossy(std::string_view bytes);

// Unicode White_Space (what Rust's char::is_whitespace and regex `\s` use).
bool IsUnicodeWhitespace(char32_t cp);
// Rust regex `\w` (Unicode), used by added tokens' single_word: letters, marks,
// decimal/letter numbers, connector punctuation, joiners.
bool IsWordChar(char32_t cp);

// Escapes `literal` so PCRE2 matches it verbatim (HF escapes String patterns into a
// regex too, so both kinds of pattern share one matching path).
std::string RegexEscape(std::string_view literal);

// A compiled PCRE2 pattern (UTF | UCP | MULTILINE, JIT when available). Thread-safe:
// all matching state is per call.
class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(std::string_view pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // All non-overlapping matches, left to right, with Oniguruma find_iter semantics:
  // an empty match right where the previous match ended is skipped by one char.
  absl::Status FindAll(std::string_view text, std::vector<ByteRange>& out) const;

  const std::string& pattern() const { return pattern_; }

 private:
  Regex() = default;
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*; kept opaque so users need no pcre2.h
  bool jit_ = false;
};

// Code points PCRE2's Unicode tables leave unassigned that newer Unicode (what HF's
// Oniguruma uses) puts in a general category (tokenizer_unicode_data.cc).
struct UnicodeAddition {
  char category[3];  // two-letter general category, e.g. "Lo"
  char32_t first, last;
};
extern const UnicodeAddition kUnicodeAdditions[];
extern const size_t kNumUnicodeAdditions;

struct CodePointRange {
  char32_t first, last;
};
// Code points assigned after Unicode 9.0 that utf8proc knows (tokenizer_unicode_data.cc).
extern const CodePointRange kNewSinceUnicode9[];
extern const size_t kNumNewSinceUnicode9;
// True for a code point that HF's normalization tables (Unicode 9.0) leave unassigned but
// utf8proc or a newer Unicode assigns: such a code point must pass through NFC/NFD/NFKC/NFKD
// untouched and splits the text into independently normalized runs.
bool IsNewSinceUnicode9(char32_t cp);

struct LowercaseAddition {
  char32_t first, last;
  int32_t delta;
};
extern const LowercaseAddition kLowercaseAdditions[];
extern const size_t kNumLowercaseAdditions;
// Rust char::to_lowercase for one code point whose lowercase is one code point (every
// code point but U+0130): utf8proc plus kLowercaseAdditions.
char32_t ToLowerSimple(char32_t cp);

// Splits `text` into contiguous (range, is_match) pieces covering it all, like HF's
// Pattern::find_matches. An empty text gives one empty non-match.
absl::Status FindMatches(const Regex& re, std::string_view text, bool invert,
                         std::vector<std::pair<ByteRange, bool>>& out);

}  // namespace kvgate::engine::tok
