#include "engine/output_stream.h"

#include <algorithm>
#include <string_view>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::engine {
namespace {

constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

// Length of the longest suffix of `text` that is a proper prefix of some stop string:
// that much text is held back because the next token may complete the stop string.
size_t HeldBackForStop(std::string_view text, const std::vector<std::string>& stops) {
  size_t held = 0;
  for (const std::string& stop : stops) {
    for (size_t len = std::min(stop.size() - 1, text.size()); len > held; --len) {
      if (text.substr(text.size() - len) == std::string_view(stop).substr(0, len)) {
        held = len;
        break;
      }
    }
  }
  return held;
}

}  // namespace

absl::StatusOr<OutputStream> OutputStream::Create(const Tokenizer* tokenizer, absl::Span<const int32_t> prompt_tail,
                                                  const GenerateOptions& options, std::vector<int32_t> eos_ids,
                                                  bool skip_text) {
  OutputStream stream;
  stream.tokenizer_ = tokenizer;
  stream.options_ = options;
  stream.eos_ids_ = std::move(eos_ids);
  stream.skip_text_ = skip_text;
  const size_t tail = std::min<size_t>(prompt_tail.size(), kDetokenizePrefixTokens);
  stream.window_.assign(prompt_tail.end() - tail, prompt_tail.end());
  if (!skip_text) {
    KVGATE_ASSIGN_OR_RETURN(stream.prefix_text_, tokenizer->Decode(stream.window_, /*skip_special_tokens=*/true));
  }
  return stream;
}

absl::StatusOr<TokenOutcome> OutputStream::Push(int32_t token) {
  TokenOutcome outcome;
  token_ids_.push_back(token);
  window_.push_back(token);
  if (!skip_text_) {
    KVGATE_ASSIGN_OR_RETURN(std::string full, tokenizer_->Decode(window_, /*skip_special_tokens=*/true));
    if (full.compare(0, prefix_text_.size(), prefix_text_) == 0) {
      text_ = full.substr(prefix_text_.size());
    } else {
      KVGATE_ASSIGN_OR_RETURN(text_, tokenizer_->Decode(token_ids_, /*skip_special_tokens=*/true));
    }
  }
  // Stop strings: the earliest match in the text not yet released ends generation.
  size_t stop_at = std::string::npos;
  for (const std::string& stop : options_.stop) {
    const size_t from = emitted_bytes_ >= stop.size() ? emitted_bytes_ - stop.size() + 1 : 0;
    const size_t at = text_.find(stop, from);
    if (at != std::string::npos && at < stop_at) {
      stop_at = at;
      outcome.matched_stop = stop;
    }
  }
  const auto& stop_ids = options_.stop_token_ids;
  if (stop_at != std::string::npos) {
    text_.resize(stop_at);
    outcome.finish_reason = FinishReason::kStop;
    outcome.finished = true;
  } else if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end()) {
    outcome.finish_reason = FinishReason::kStop;
    outcome.matched_stop = absl::StrCat(token);
    outcome.finished = true;
  } else if (!options_.ignore_eos && std::find(eos_ids_.begin(), eos_ids_.end(), token) != eos_ids_.end()) {
    outcome.finish_reason = FinishReason::kStop;
    outcome.finished = true;
  } else if (static_cast<int32_t>(token_ids_.size()) >= options_.max_tokens) {
    outcome.finish_reason = FinishReason::kLength;
    outcome.finished = true;
  }
  // Release text up to what might still change: an incomplete UTF-8 character (decoded
  // as U+FFFD) or the beginning of a stop string.
  size_t releasable = text_.size();
  if (!outcome.finished) {
    std::string_view text(text_);
    if (text.size() >= kReplacementChar.size() &&
        text.substr(text.size() - kReplacementChar.size()) == kReplacementChar) {
      releasable -= kReplacementChar.size();
    }
    releasable -= HeldBackForStop(text.substr(0, releasable), options_.stop);
  }
  if (releasable > emitted_bytes_) {
    outcome.new_text = text_.substr(emitted_bytes_, releasable - emitted_bytes_);
    emitted_bytes_ = releasable;
  }
  return outcome;
}

}  // namespace kvgate::engine
