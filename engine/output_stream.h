// File: OutputStream, what happens to each sampled token of one sequence: stop
// conditions (stop strings, stop ids, EOS, max_tokens) and incremental detokenization
// that releases text only once it can no longer change (an incomplete UTF-8 character, or
// the beginning of a stop string, is held back). The offline generator and the decode
// worker share it, so both stop and stream identically.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "engine/generator.h"
#include "engine/tokenizer.h"

namespace kvgate::engine {

// Prompt tokens decoded in front of the output, so that tokenizers which strip or mark
// word starts (SentencePiece's leading "▁") give the output text as it reads in context.
inline constexpr int kDetokenizePrefixTokens = 4;

struct TokenOutcome {
  std::string new_text;  // text released by this token (possibly empty)
  bool finished = false;
  FinishReason finish_reason = FinishReason::kLength;
  std::string matched_stop;  // stop string or decimal stop id
};

class OutputStream {
 public:
  // `prompt_tail`: the last (at most kDetokenizePrefixTokens) prompt tokens. `eos_ids`:
  // the model's end-of-sequence ids. `options` must have passed Generator::Validate.
  static absl::StatusOr<OutputStream> Create(const Tokenizer* tokenizer, absl::Span<const int32_t> prompt_tail,
                                             const GenerateOptions& options, std::vector<int32_t> eos_ids,
                                             bool skip_text = false);

  // Records the next generated token and says what it releases and whether generation
  // ends with it. With skip_text, no text is decoded (stop strings cannot match).
  absl::StatusOr<TokenOutcome> Push(int32_t token);
  // Ends the stream early (aborted): no further text is released.
  const std::vector<int32_t>& token_ids() const { return token_ids_; }
  const std::string& text() const { return text_; }  // generated text so far, stop string removed

 private:
  OutputStream() = default;
  const Tokenizer* tokenizer_ = nullptr;
  GenerateOptions options_;
  std::vector<int32_t> eos_ids_;
  bool skip_text_ = false;
  std::vector<int32_t> window_;  // prompt tail + generated
  std::string prefix_text_;
  std::vector<int32_t> token_ids_;
  std::string text_;
  size_t emitted_bytes_ = 0;
};

}  // namespace kvgate::engine
