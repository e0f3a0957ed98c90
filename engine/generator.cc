#include "engine/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::engine {
namespace {

// Prompt tokens decoded in front of the output, so that tokenizers which strip or mark
// word starts (SentencePiece's leading "▁") give the output text as it reads in context.
constexpr int kDetokenizePrefixTokens = 4;
constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

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

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAborted: return "aborted";
  }
  return "unknown";
}

absl::Status Generator::Validate(absl::Span<const int32_t> prompt, const GenerateOptions& options) const {
  const ModelConfig& c = model_->config();
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token id ", prompt[i], " at index ", i,
                                                     " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  const int64_t prompt_tokens = static_cast<int64_t>(prompt.size());
  if (prompt_tokens >= c.max_context_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt has ", prompt_tokens, " tokens; the model's context is ",
                                                   c.max_context_tokens, " tokens, which leaves no room to generate"));
  }
  if (options.max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be at least 1, got ", options.max_tokens));
  }
  if (prompt_tokens + options.max_tokens > c.max_context_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens: the model's context is ", c.max_context_tokens, " tokens, but ", prompt_tokens + options.max_tokens,
        " were requested (", prompt_tokens, " in the prompt, ", options.max_tokens, " to generate)"));
  }
  KVGATE_RETURN_IF_ERROR(ValidateSamplingOptions(options.sampling));
  if (options.stop.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat("stop: at most ", kMaxStopStrings, " stop strings, got ", options.stop.size()));
  }
  for (const std::string& stop : options.stop) {
    if (stop.empty() || stop.size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop: each stop string must have 1 to ", kMaxStopStringBytes, " bytes"));
    }
  }
  for (int32_t id : options.stop_token_ids) {
    if (id < 0 || id >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("stop_token_ids: ", id, " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<GenerateResult> Generator::Generate(absl::Span<const int32_t> prompt,
                                                   const GenerateOptions& options,
                                                   const TokenCallback& on_token, KvPlanner* planner) {
  KVGATE_RETURN_IF_ERROR(Validate(prompt, options));
  const ModelConfig& c = model_->config();
  const auto start = std::chrono::steady_clock::now();
  GenerateResult result;
  result.prompt_tokens = static_cast<int32_t>(prompt.size());
  // With a planner the contiguous cache only holds the prompt; decode continues paged.
  const int32_t capacity = result.prompt_tokens + (planner != nullptr ? 0 : options.max_tokens);
  KVGATE_ASSIGN_OR_RETURN(std::unique_ptr<KvCache> cache, model_->NewCache(capacity));
  PrefillCapture capture;
  std::vector<float> logits;
  if (planner != nullptr) {
    KVGATE_ASSIGN_OR_RETURN(logits, planner->Prefill(*model_, prompt, cache.get(), &capture));
  } else {
    KVGATE_ASSIGN_OR_RETURN(logits, model_->Forward(prompt, cache.get()));
  }
  std::unique_ptr<PagedKvBatch> paged;
  if (planner != nullptr) {
    KVGATE_ASSIGN_OR_RETURN(paged, planner->Commit(prompt, *cache, capture, &result.kv));
    cache.reset();  // the prompt's full cache is freed once compressed
  } else {
    result.kv.kv_entries_full = cache->num_entries();
    result.kv.kv_entries_kept = cache->num_entries();
    result.kv.bytes_full = result.kv.kv_entries_full * c.KvEntryBytes();
    result.kv.bytes_kept = result.kv.kv_entries_kept * c.KvEntryBytes();
  }
  result.prefill_ms = MillisSince(start);

  const std::vector<int32_t> prefix(prompt.end() - std::min<size_t>(prompt.size(), kDetokenizePrefixTokens),
                                    prompt.end());
  KVGATE_ASSIGN_OR_RETURN(const std::string prefix_text, tokenizer_->Decode(prefix, /*skip_special_tokens=*/true));
  Sampler sampler(options.sampling);
  std::vector<int32_t> window = prefix;  // prefix + generated, for detokenization
  size_t emitted_bytes = 0;
  std::chrono::steady_clock::time_point first_token_time;
  while (true) {
    const int32_t token = sampler.Sample(logits);
    result.token_ids.push_back(token);
    window.push_back(token);
    if (result.token_ids.size() == 1) {
      first_token_time = std::chrono::steady_clock::now();
      result.time_to_first_token_ms = MillisSince(start);
    }
    KVGATE_ASSIGN_OR_RETURN(std::string full, tokenizer_->Decode(window, /*skip_special_tokens=*/true));
    if (full.compare(0, prefix_text.size(), prefix_text) == 0) {
      result.text = full.substr(prefix_text.size());
    } else {
      KVGATE_ASSIGN_OR_RETURN(result.text, tokenizer_->Decode(result.token_ids, /*skip_special_tokens=*/true));
    }
    bool finished = false;
    // Stop strings: the earliest match in the text not yet released ends generation.
    size_t stop_at = std::string::npos;
    for (const std::string& stop : options.stop) {
      const size_t from = emitted_bytes >= stop.size() ? emitted_bytes - stop.size() + 1 : 0;
      const size_t at = result.text.find(stop, from);
      if (at != std::string::npos && at < stop_at) {
        stop_at = at;
        result.matched_stop = stop;
      }
    }
    if (stop_at != std::string::npos) {
      result.text.resize(stop_at);
      result.finish_reason = FinishReason::kStop;
      finished = true;
    } else if (std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(), token) !=
               options.stop_token_ids.end()) {
      result.finish_reason = FinishReason::kStop;
      result.matched_stop = absl::StrCat(token);
      finished = true;
    } else if (!options.ignore_eos &&
               std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), token) != c.eos_token_ids.end()) {
      result.finish_reason = FinishReason::kStop;
      finished = true;
    } else if (static_cast<int32_t>(result.token_ids.size()) >= options.max_tokens) {
      result.finish_reason = FinishReason::kLength;
      finished = true;
    }
    // Release text up to what might still change: an incomplete UTF-8 character
    // (decoded as U+FFFD) or the beginning of a stop string.
    size_t releasable = result.text.size();
    if (!finished) {
      std::string_view text(result.text);
      if (text.size() >= kReplacementChar.size() && text.substr(text.size() - kReplacementChar.size()) == kReplacementChar) {
        releasable -= kReplacementChar.size();
      }
      releasable -= HeldBackForStop(text.substr(0, releasable), options.stop);
    }
    std::string_view new_text;
    if (releasable > emitted_bytes) {
      new_text = std::string_view(result.text).substr(emitted_bytes, releasable - emitted_bytes);
      emitted_bytes = releasable;
    }
    if (on_token && !on_token(token, new_text)) {
      result.finish_reason = FinishReason::kAborted;
      finished = true;
    }
    if (finished) break;
    if (paged != nullptr) {
      KVGATE_ASSIGN_OR_RETURN(logits, model_->DecodeStep(absl::MakeConstSpan(&token, 1), paged.get()));
    } else {
      KVGATE_ASSIGN_OR_RETURN(logits, model_->Forward(absl::MakeConstSpan(&token, 1), cache.get()));
    }
  }
  result.decode_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - first_token_time).count();
  if (result.token_ids.size() > 1) result.time_per_output_token_ms = result.decode_ms / (result.token_ids.size() - 1);
  return result;
}

}  // namespace kvgate::engine
