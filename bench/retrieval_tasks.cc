#include "bench/retrieval_tasks.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"

namespace kvgate::bench {
namespace {

// Indexed by RetrievalTask.
const std::vector<std::string>& TaskNames() {
  static const std::vector<std::string>* const names = new std::vector<std::string>{
      "niah_single", "niah_multikey", "niah_multivalue", "kv_lookup", "vt",
      // Held out (bench/retrieval_tasks.md, "Held-out tasks"): never in training.
      "niah_reworded", "kv_lookup_48", "kv_lookup_keyfmt", "vt_8hop", "vt_reworded"};
  return *names;
}

// As listed in the spec (which calls it "the 64-word list" but lists 63 words;
// gates/train/tiny_data.py uses the same 63).
constexpr std::array<std::string_view, kNumKeyWords> kKeyWords = {
    "apple",  "banana",  "cherry", "dragon",  "eagle",  "falcon",  "garden",   "harbor",  "island",
    "jacket", "kettle",  "lemon",  "marble",  "needle", "orange",  "pepper",   "quartz",  "river",
    "silver", "tiger",   "umbrella", "violet", "walnut", "yellow", "zebra",    "anchor",  "bridge",
    "candle", "desert",  "ember",  "forest",  "glacier", "hammer", "icicle",   "jungle",  "koala",
    "lantern", "meadow", "nickel", "oyster",  "parrot", "quiver",  "rocket",   "saddle",  "tulip",
    "velvet", "willow",  "badger", "copper",  "dolphin", "engine", "feather",  "goblet",  "hornet",
    "indigo", "jasper",  "lizard", "mango",   "nectar", "orchid",  "pebble",   "raven",   "summit"};

// Needle counts per task.
constexpr int kMultiNeedles = 4;     // niah_multikey keys, niah_multivalue values
constexpr int kKvLookupPairs = 24;
constexpr int kVtHops = 4;
// Held-out tasks.
constexpr int kKvLookup48Pairs = 48;
constexpr int kVt8Hops = 8;

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r'; }

uint64_t Mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t Fnv1a64(std::string_view bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

// `number_first` (kv_lookup_keyfmt) writes `<ddd>-<word>` from the same draws.
std::vector<std::string> DrawKeys(int count, TaskRng* rng, bool number_first = false) {
  std::vector<std::string> keys;
  std::set<std::string> seen;
  while (static_cast<int>(keys.size()) < count) {
    const uint64_t word = rng->Below(kNumKeyWords);
    const uint64_t number = 100 + rng->Below(900);
    std::string key = number_first ? absl::StrCat(number, "-", std::string(kKeyWords[word]))
                                   : absl::StrCat(std::string(kKeyWords[word]), "-", number);
    if (seen.insert(key).second) keys.push_back(std::move(key));
  }
  return keys;
}

std::vector<std::string> DrawValues(int count, TaskRng* rng) {
  std::vector<std::string> values;
  std::set<std::string> seen;
  while (static_cast<int>(values.size()) < count) {
    std::string value = absl::StrCat(1000000 + rng->Below(9000000));
    if (seen.insert(value).second) values.push_back(std::move(value));
  }
  return values;
}

}  // namespace

const std::string& TaskName(RetrievalTask task) { return TaskNames()[static_cast<int>(task)]; }

absl::StatusOr<RetrievalTask> ParseTask(std::string_view name) {
  for (size_t i = 0; i < TaskNames().size(); ++i) {
    if (TaskNames()[i] == name) return static_cast<RetrievalTask>(i);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown task '", std::string(name), "' (tasks: ", absl::StrJoin(TaskNames(), ", "), ")"));
}

const std::vector<RetrievalTask>& AllTasks() {
  static const std::vector<RetrievalTask> tasks = {RetrievalTask::kNiahSingle, RetrievalTask::kNiahMultikey,
                                                   RetrievalTask::kNiahMultivalue, RetrievalTask::kKvLookup,
                                                   RetrievalTask::kVariableTracking};
  return tasks;
}

const std::vector<RetrievalTask>& HeldOutTasks() {
  static const std::vector<RetrievalTask> tasks = {
      RetrievalTask::kNiahReworded, RetrievalTask::kKvLookup48, RetrievalTask::kKvLookupKeyFormat,
      RetrievalTask::kVariableTracking8Hops, RetrievalTask::kVariableTrackingReworded};
  return tasks;
}

bool IsHeldOut(RetrievalTask task) {
  return std::find(HeldOutTasks().begin(), HeldOutTasks().end(), task) != HeldOutTasks().end();
}

const std::array<std::string_view, kNumKeyWords>& KeyWords() { return kKeyWords; }

std::vector<std::string> SplitSentences(std::string_view text) {
  std::vector<std::string> sentences;
  std::string current;
  bool pending_space = false;
  auto finish = [&] {
    if (!current.empty()) sentences.push_back(std::move(current));
    current.clear();
    pending_space = false;
  };
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (IsSpace(c)) {
      pending_space = !current.empty();
      continue;
    }
    if (pending_space) current.push_back(' ');
    pending_space = false;
    current.push_back(c);
    if ((c == '.' || c == '!' || c == '?') && (i + 1 == text.size() || IsSpace(text[i + 1]))) finish();
  }
  finish();
  return sentences;
}

Haystack Haystack::Generated() {
  return Haystack({"The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again."},
                  /*generated=*/true);
}

absl::StatusOr<Haystack> Haystack::FromText(std::string_view text) {
  std::vector<std::string> sentences = SplitSentences(text);
  if (sentences.empty()) return absl::InvalidArgumentError("haystack text holds no sentence");
  return Haystack(std::move(sentences), /*generated=*/false);
}

absl::StatusOr<Haystack> Haystack::FromPath(const std::string& path) {
  namespace fs = std::filesystem;
  auto read = [](const fs::path& file, std::string* out) -> absl::Status {
    std::ifstream in(file, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read haystack file '", file.string(), "'"));
    std::stringstream buffer;
    buffer << in.rdbuf();
    out->append(buffer.str());
    return absl::OkStatus();
  };
  std::error_code ec;
  std::string text;
  if (fs::is_directory(path, ec)) {
    std::vector<fs::path> files;
    for (const fs::directory_entry& entry : fs::directory_iterator(path, ec)) {
      if (entry.path().extension() == ".txt") files.push_back(entry.path());
    }
    std::sort(files.begin(), files.end());
    if (files.empty()) return absl::NotFoundError(absl::StrCat("haystack folder '", path, "' holds no .txt file"));
    for (size_t i = 0; i < files.size(); ++i) {
      if (i > 0) text.push_back('\n');
      KVGATE_RETURN_IF_ERROR(read(files[i], &text));
    }
  } else {
    KVGATE_RETURN_IF_ERROR(read(path, &text));
  }
  auto haystack = FromText(text);
  if (!haystack.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("haystack '", path, "': ", haystack.status().message()));
  }
  return haystack;
}

uint64_t TaskRng::Next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  return Mix64(z);
}

uint64_t TaskRng::Below(uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(Next()) * n) >> 64);
}

double TaskRng::Unit() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

uint64_t SampleSeed(uint64_t seed, RetrievalTask task, int32_t context_tokens, int32_t index) {
  return seed ^ Mix64(Fnv1a64(absl::StrCat(TaskName(task), ":", context_tokens, ":", index)));
}

TaskContent MakeTaskContent(RetrievalTask task, TaskRng* rng, std::optional<double> depth) {
  TaskContent c;
  auto magic_question = [](const std::string& key) {
    return absl::StrCat("\nQuestion: What is the special magic number for ", key, "?\nAnswer:");
  };
  switch (task) {
    case RetrievalTask::kNiahSingle: {
      const auto keys = DrawKeys(1, rng);
      const auto values = DrawValues(1, rng);
      c.inserted = {absl::StrCat("The special magic number for ", keys[0], " is ", values[0], ".")};
      c.question = magic_question(keys[0]);
      c.answer = absl::StrCat(" ", values[0]);
      break;
    }
    case RetrievalTask::kNiahMultikey: {
      const auto keys = DrawKeys(kMultiNeedles, rng);
      const auto values = DrawValues(kMultiNeedles, rng);
      const size_t asked = rng->Below(kMultiNeedles);
      for (int i = 0; i < kMultiNeedles; ++i) {
        c.inserted.push_back(absl::StrCat("The special magic number for ", keys[i], " is ", values[i], "."));
      }
      c.question = magic_question(keys[asked]);
      c.answer = absl::StrCat(" ", values[asked]);
      break;
    }
    case RetrievalTask::kNiahMultivalue: {
      const auto keys = DrawKeys(1, rng);
      const auto values = DrawValues(kMultiNeedles, rng);
      for (int i = 0; i < kMultiNeedles; ++i) {
        c.inserted.push_back(absl::StrCat("One of the special magic numbers for ", keys[0], " is ", values[i], "."));
      }
      c.question = absl::StrCat("\nQuestion: What are all the special magic numbers for ", keys[0], "?\nAnswer:");
      c.answer = absl::StrCat(" ", absl::StrJoin(values, ", "));
      break;
    }
    // Held out: never in training (bench/retrieval_tasks.md, "Held-out tasks").
    case RetrievalTask::kNiahReworded: {
      const auto keys = DrawKeys(1, rng);
      const auto values = DrawValues(1, rng);
      c.inserted = {absl::StrCat("Remember that the secret code of ", keys[0], " is ", values[0], ".")};
      c.question = absl::StrCat("\nQuestion: What is the secret code of ", keys[0], "?\nAnswer:");
      c.answer = absl::StrCat(" ", values[0]);
      break;
    }
    // kv_lookup and its held-out variants (more pairs; keys with the number first).
    case RetrievalTask::kKvLookup:
    case RetrievalTask::kKvLookup48:
    case RetrievalTask::kKvLookupKeyFormat: {
      const int pairs = task == RetrievalTask::kKvLookup48 ? kKvLookup48Pairs : kKvLookupPairs;
      const auto keys = DrawKeys(pairs, rng, /*number_first=*/task == RetrievalTask::kKvLookupKeyFormat);
      const auto values = DrawValues(pairs, rng);
      const size_t asked = rng->Below(pairs);
      for (int i = 0; i < pairs; ++i) c.inserted.push_back(absl::StrCat("Key ", keys[i], " has value ", values[i], "."));
      c.question = absl::StrCat("\nQuestion: What is the value of key ", keys[asked], "?\nAnswer:");
      c.answer = absl::StrCat(" ", values[asked]);
      break;
    }
    // vt and its held-out 8-hop variant.
    case RetrievalTask::kVariableTracking:
    case RetrievalTask::kVariableTracking8Hops: {
      const int hops = task == RetrievalTask::kVariableTracking8Hops ? kVt8Hops : kVtHops;
      const auto names = DrawKeys(hops, rng);
      const auto values = DrawValues(1, rng);
      c.inserted.push_back(absl::StrCat("VAR ", names[0], " = ", values[0], "."));
      for (int i = 1; i < hops; ++i) c.inserted.push_back(absl::StrCat("VAR ", names[i], " = VAR ", names[i - 1], "."));
      c.question = absl::StrCat("\nQuestion: Which variables are assigned the value ", values[0], "?\nAnswer:");
      c.answer = absl::StrCat(" ", absl::StrJoin(names, " "));
      break;
    }
    case RetrievalTask::kVariableTrackingReworded: {
      const auto names = DrawKeys(kVtHops, rng);
      const auto values = DrawValues(1, rng);
      c.inserted.push_back(absl::StrCat("Let ", names[0], " be ", values[0], "."));
      for (int i = 1; i < kVtHops; ++i) c.inserted.push_back(absl::StrCat("Let ", names[i], " be ", names[i - 1], "."));
      c.question = absl::StrCat("\nQuestion: Which variables are equal to ", values[0], "?\nAnswer:");
      c.answer = absl::StrCat(" ", absl::StrJoin(names, " "));
      break;
    }
  }
  if (depth.has_value()) {
    c.depths.assign(c.inserted.size(), *depth);
  } else {
    for (size_t i = 0; i < c.inserted.size(); ++i) c.depths.push_back(rng->Unit());
    std::sort(c.depths.begin(), c.depths.end());
  }
  return c;
}

std::string ComposeBody(const Haystack& haystack, int64_t start, int64_t filler_count, const TaskContent& content) {
  std::string body;
  size_t next_inserted = 0;
  auto append = [&body](std::string_view sentence) {
    if (!body.empty()) body.push_back(' ');
    body.append(sentence);
  };
  auto insert_up_to = [&](int64_t slot) {
    while (next_inserted < content.inserted.size() &&
           static_cast<int64_t>(std::nearbyint(content.depths[next_inserted] * static_cast<double>(filler_count))) <=
               slot) {
      append(content.inserted[next_inserted++]);
    }
  };
  for (int64_t k = 0; k < filler_count; ++k) {
    insert_up_to(k);
    append(haystack.At(start, k));
  }
  insert_up_to(filler_count);
  return body;
}

absl::StatusOr<TaskSample> MakeSample(const Haystack& haystack, const engine::Tokenizer& tokenizer,
                                      int32_t bos_token_id, RetrievalTask task, int32_t context_tokens,
                                      uint64_t seed, int32_t index, std::optional<double> depth) {
  if (depth.has_value()) {
    if (task != RetrievalTask::kNiahSingle) {
      return absl::InvalidArgumentError(absl::StrCat("an exact depth is only for niah_single, not ", TaskName(task)));
    }
    if (!(*depth >= 0.0 && *depth <= 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat("depth must be in [0, 1], got ", *depth));
    }
  }
  TaskSample s;
  s.task = task;
  s.context_tokens = context_tokens;
  s.index = index;
  s.seed = SampleSeed(seed, task, context_tokens, index);
  s.forced_depth = depth;
  TaskRng rng(s.seed);
  s.haystack_start = static_cast<int64_t>(rng.Below(haystack.sentences().size()));
  s.content = MakeTaskContent(task, &rng, depth);

  // Token ids of <BOS> + text: the post-processor's BOS when it adds one.
  auto encode = [&](const std::string& text) -> absl::StatusOr<std::vector<int32_t>> {
    KVGATE_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer.Encode(text, /*add_special_tokens=*/true));
    if (bos_token_id >= 0 && (ids.empty() || ids.front() != bos_token_id)) ids.insert(ids.begin(), bos_token_id);
    return ids;
  };
  const int32_t limit = context_tokens - kContextMarginTokens;
  // Tokens of <BOS> + body + question + answer with n haystack sentences.
  auto length = [&](int64_t n) -> absl::StatusOr<int64_t> {
    KVGATE_ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                            encode(absl::StrCat(ComposeBody(haystack, s.haystack_start, n, s.content),
                                                s.content.question, s.content.answer)));
    return static_cast<int64_t>(ids.size());
  };
  KVGATE_ASSIGN_OR_RETURN(const int64_t bare, length(0));
  if (bare > limit) {
    return absl::InvalidArgumentError(absl::StrCat("context ", context_tokens, " is too small for ", TaskName(task),
                                                    ": its inserted sentences, question and answer alone take ", bare,
                                                    " tokens, more than the ", limit, " a ", context_tokens,
                                                    "-token context leaves after the ", kContextMarginTokens,
                                                    "-token margin"));
  }
  // Bracket the answer: lo fits, hi does not. A first guess from the tokens of a few
  // sentences keeps the bisection short.
  int64_t lo = 0, hi = 0;
  {
    constexpr int64_t kProbe = 8;
    KVGATE_ASSIGN_OR_RETURN(const int64_t probe, length(kProbe));
    const double per_sentence = std::max(1.0, static_cast<double>(probe - bare) / kProbe);
    if (probe > limit) {
      hi = kProbe;
    } else {
      lo = kProbe;
      int64_t step = std::max<int64_t>(1, static_cast<int64_t>((limit - probe) / per_sentence) + 1);
      while (true) {
        KVGATE_ASSIGN_OR_RETURN(const int64_t len, length(lo + step));
        if (len > limit) {
          hi = lo + step;
          break;
        }
        lo += step;
        step = std::max<int64_t>(1, step / 8);
        if (lo > (int64_t{1} << 24)) return absl::InternalError("haystack length did not converge");
      }
    }
  }
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    KVGATE_ASSIGN_OR_RETURN(const int64_t len, length(mid));
    (len <= limit ? lo : hi) = mid;
  }
  s.filler_sentences = lo;
  s.prompt = absl::StrCat(ComposeBody(haystack, s.haystack_start, lo, s.content), s.content.question);
  KVGATE_ASSIGN_OR_RETURN(s.prompt_ids, encode(s.prompt));
  KVGATE_ASSIGN_OR_RETURN(const int64_t total, length(lo));
  s.total_tokens = static_cast<int32_t>(total);
  return s;
}

std::string NormalizeAnswer(std::string_view generated) {
  if (size_t newline = generated.find('\n'); newline != std::string_view::npos) generated = generated.substr(0, newline);
  while (!generated.empty() && IsSpace(generated.front())) generated.remove_prefix(1);
  while (!generated.empty() && IsSpace(generated.back())) generated.remove_suffix(1);
  return std::string(generated);
}

bool IsExactMatch(std::string_view generated, std::string_view answer) {
  if (!answer.empty() && answer.front() == ' ') answer.remove_prefix(1);
  return NormalizeAnswer(generated) == answer;
}

}  // namespace kvgate::bench
