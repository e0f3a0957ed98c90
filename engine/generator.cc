#include "engine/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "engine/output_stream.h"

namespace kvgate::engine {
namespace {

double MillisSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
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

  KVGATE_ASSIGN_OR_RETURN(OutputStream output, OutputStream::Create(tokenizer_, prompt, options, c.eos_token_ids));
  Sampler sampler(options.sampling);
  std::chrono::steady_clock::time_point first_token_time;
  while (true) {
    const int32_t token = sampler.Sample(logits);
    KVGATE_ASSIGN_OR_RETURN(TokenOutcome outcome, output.Push(token));
    if (output.token_ids().size() == 1) {
      first_token_time = std::chrono::steady_clock::now();
      result.time_to_first_token_ms = MillisSince(start);
    }
    bool finished = outcome.finished;
    if (finished) {
      result.finish_reason = outcome.finish_reason;
      result.matched_stop = outcome.matched_stop;
    }
    if (on_token && !on_token(token, outcome.new_text)) {
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
  result.token_ids = output.token_ids();
  result.text = output.text();
  result.decode_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - first_token_time).count();
  if (result.token_ids.size() > 1) result.time_per_output_token_ms = result.decode_ms / (result.token_ids.size() - 1);
  return result;
}

}  // namespace kvgate::engine
