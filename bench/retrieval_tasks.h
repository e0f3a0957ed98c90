// File: the synthetic long-context retrieval tasks of bench/retrieval_tasks.md (needle in
// a haystack, multi-key and multi-value needles, key-value lookup, variable tracking):
// deterministic sample generation from a seed, prompt length fitted with the model's own
// tokenizer, and exact-match scoring. `kvgate eval` (cli/eval_command.cc) runs them
// against every eviction policy; gates/train/train_tiny_model.py builds training prompts
// of the same shape. bench/retrieval_tasks.md is the specification: change both or
// neither.
//
// Randomness is fully specified here (no std:: distributions, whose output differs
// between standard libraries), so a sample is the same on every platform:
//   SampleSeed(seed, task, context, index) = seed ^ Mix64(FNV-1a-64("<task>:<context>:<index>"))
//   TaskRng = SplitMix64 seeded with it; Below(n) = (Next() * n) >> 64 (128-bit product),
//   Unit() = (Next() >> 11) * 2^-53.
// Draw order for one sample: (1) the haystack start sentence, Below(num haystack
// sentences), for the generated haystack too (as gates/train/tiny_data.py does); (2) the task's keys, each a word Below(63) then 100 + Below(900), redrawn
// while it repeats an earlier key; (3) its values, 1000000 + Below(9000000), redrawn while
// repeated; (4) the asked needle, Below(count), for niah_multikey and kv_lookup only;
// (5) one Unit() depth per inserted sentence, sorted ascending (none when niah_single is
// given an exact depth). The held-out tasks draw in the same order: kv_lookup_48 and
// kv_lookup_keyfmt as kv_lookup (48 pairs / 24 pairs; keyfmt writes each key number
// first, `<ddd>-<word>`, from the same two draws), vt_8hop and vt_reworded as vt (8 / 4
// names), niah_reworded as niah_single.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/tokenizer.h"

namespace kvgate::bench {

// Tokens left free below the target context (the spec's 16-token margin).
inline constexpr int32_t kContextMarginTokens = 16;
// Scoring: greedy, at most this many new tokens, stop at EOS or a newline.
inline constexpr int32_t kMaxAnswerTokens = 48;
// The eval's default seed; training draws from a disjoint stream.
inline constexpr uint64_t kDefaultEvalSeed = 1234;

enum class RetrievalTask {
  // The tasks kvgate-tiny and its gates were trained on.
  kNiahSingle, kNiahMultikey, kNiahMultivalue, kKvLookup, kVariableTracking,
  // Held out: never in training (bench/retrieval_tasks.md, "Held-out tasks").
  kNiahReworded, kKvLookup48, kKvLookupKeyFormat, kVariableTracking8Hops, kVariableTrackingReworded,
};

// "niah_single", "niah_multikey", "niah_multivalue", "kv_lookup", "vt"; held out:
// "niah_reworded", "kv_lookup_48", "kv_lookup_keyfmt", "vt_8hop", "vt_reworded".
const std::string& TaskName(RetrievalTask task);
// INVALID_ARGUMENT listing the known names for anything else.
absl::StatusOr<RetrievalTask> ParseTask(std::string_view name);
// The trained tasks, in the order above: the eval's default. Held-out tasks are never in it.
const std::vector<RetrievalTask>& AllTasks();
// The held-out tasks, in the order above; `kvgate eval --tasks` names them explicitly.
const std::vector<RetrievalTask>& HeldOutTasks();
bool IsHeldOut(RetrievalTask task);

// The key words as the spec lists them (it announces 64 but lists 63; the training data
// of gates/train/tiny_data.py uses the same 63).
inline constexpr int kNumKeyWords = 63;
const std::array<std::string_view, kNumKeyWords>& KeyWords();

// The spec's sentence splitter: a sentence ends after '.', '!' or '?' followed by
// whitespace (or at the end of the text); whitespace runs inside a sentence become one
// space; sentences are trimmed and empty ones dropped. Whitespace is ASCII (space, \t,
// \n, \v, \f, \r).
std::vector<std::string> SplitSentences(std::string_view text);

// Filler sentences, read from a seeded start sentence on and wrapping to the first: a
// file's sentences, or the generated five repeated in order.
class Haystack {
 public:
  // "The grass is green." "The sky is blue." "The sun is yellow." "Here we go."
  // "There and back again."
  static Haystack Generated();
  // INVALID_ARGUMENT when the text holds no sentence.
  static absl::StatusOr<Haystack> FromText(std::string_view text);
  // A text file, or every *.txt of a folder (sorted by name) joined by newlines, as
  // gates/train/tiny_data.py reads its --haystack. NOT_FOUND for a path that cannot be
  // read; INVALID_ARGUMENT as FromText.
  static absl::StatusOr<Haystack> FromPath(const std::string& path);

  bool generated() const { return generated_; }
  const std::vector<std::string>& sentences() const { return sentences_; }
  // Sentence k (k >= 0) of a haystack that starts at sentence `start`.
  const std::string& At(int64_t start, int64_t k) const {
    return sentences_[static_cast<size_t>((start + k) % static_cast<int64_t>(sentences_.size()))];
  }

 private:
  Haystack(std::vector<std::string> sentences, bool generated)
      : sentences_(std::move(sentences)), generated_(generated) {}
  std::vector<std::string> sentences_;
  bool generated_ = false;
};

// SplitMix64 with the draws named in the file comment.
class TaskRng {
 public:
  explicit TaskRng(uint64_t seed) : state_(seed) {}
  uint64_t Next();
  // Uniform in [0, n); n >= 1. Exactly one Next() per call.
  uint64_t Below(uint64_t n);
  // Uniform in [0, 1), 53 bits. Exactly one Next() per call.
  double Unit();

 private:
  uint64_t state_;
};

// seed ^ hash(task, context_tokens, index): adding a task, a context or samples never
// changes the others' samples.
uint64_t SampleSeed(uint64_t seed, RetrievalTask task, int32_t context_tokens, int32_t index);

// What a task inserts into the haystack and asks, before any length fitting.
struct TaskContent {
  std::vector<std::string> inserted;  // sentences in order of appearance
  std::vector<double> depths;         // [inserted.size()], ascending, each in [0, 1]
  std::string question;               // "\nQuestion: ...\nAnswer:"
  std::string answer;                 // with its leading space, e.g. " 5821934"
};

// Draws steps (2) to (5) of the file comment from `rng`. `depth` (niah_single only; in
// [0, 1]) replaces the drawn depth.
TaskContent MakeTaskContent(RetrievalTask task, TaskRng* rng, std::optional<double> depth = std::nullopt);

// The prompt body: `filler_count` haystack sentences from `start` with the inserted
// sentences between them, sentence i going before filler sentence
// floor(depths[i] * filler_count + 0.5) (so depth 0 leads the body and depth 1 ends it),
// all joined with one space.
std::string ComposeBody(const Haystack& haystack, int64_t start, int64_t filler_count, const TaskContent& content);

// One prompt, fitted to its target context.
struct TaskSample {
  RetrievalTask task = RetrievalTask::kNiahSingle;
  int32_t context_tokens = 0;  // the target context
  int32_t index = 0;           // sample index within (task, context)
  uint64_t seed = 0;           // SampleSeed(...)
  std::optional<double> forced_depth;  // niah_single with an exact depth
  TaskContent content;
  int64_t haystack_start = 0;     // first haystack sentence
  int64_t filler_sentences = 0;   // haystack sentences in the body
  std::string prompt;             // body + question (the text after <BOS>)
  std::vector<int32_t> prompt_ids;  // <BOS> + prompt, the model's tokens
  int32_t total_tokens = 0;       // tokens of <BOS> + prompt + answer, <= context - margin
};

// Builds sample `index` of `task` at `context_tokens`: the most haystack sentences for
// which <BOS> + body + question + answer tokenizes to at most context_tokens -
// kContextMarginTokens tokens (the haystack grown sentence by sentence, found by
// bisection since the length only grows with the sentence count). The tokenizer's
// post-processor supplies <BOS> where it has one; otherwise `bos_token_id` (>= 0) is
// prepended. INVALID_ARGUMENT when even an empty haystack does not fit, or for a depth
// outside [0, 1] or one given for another task.
absl::StatusOr<TaskSample> MakeSample(const Haystack& haystack, const engine::Tokenizer& tokenizer,
                                      int32_t bos_token_id, RetrievalTask task, int32_t context_tokens,
                                      uint64_t seed, int32_t index, std::optional<double> depth = std::nullopt);

// The model's answer as scored: cut at the first newline, surrounding ASCII whitespace
// stripped.
std::string NormalizeAnswer(std::string_view generated);
// Exact match of NormalizeAnswer(generated) with `answer` minus its leading space.
bool IsExactMatch(std::string_view generated, std::string_view answer);

}  // namespace kvgate::bench
