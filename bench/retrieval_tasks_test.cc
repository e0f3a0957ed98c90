#include "bench/retrieval_tasks.h"

#include <algorithm>
#include <fstream>
#include <regex>
#include <set>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/model_config.h"
#include "tests/testing/paths.h"

namespace kvgate::bench {
namespace {

// The kvgate-tiny tokenizer (the model these tasks were made for) measures every length here.
class RetrievalTasksTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto tokenizer = engine::Tokenizer::FromFile(testing::KvgateTinyDir() + "/tokenizer.json");
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(*tokenizer).release();
    auto config = engine::LoadModelConfig(testing::KvgateTinyDir());
    ASSERT_TRUE(config.ok()) << config.status();
    bos_ = config->bos_token_id;
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }
  static int64_t Length(const std::string& text) { return static_cast<int64_t>(tokenizer_->Encode(text)->size()); }

  static engine::Tokenizer* tokenizer_;
  static int32_t bos_;
};
engine::Tokenizer* RetrievalTasksTest::tokenizer_ = nullptr;
int32_t RetrievalTasksTest::bos_ = -1;

constexpr char kEssay[] =
    "  It was a bright cold day in April, and the clocks were striking thirteen.\n"
    "Winston Smith, his chin nuzzled into his breast, slipped quickly through the glass doors!  "
    "Was it?\tYes. The hallway smelt of boiled cabbage and old rag mats... At one end of it a coloured "
    "poster, too large for indoor display, had been tacked to the wall.It depicted simply an enormous face";

TEST(SplitSentencesTest, EndsAfterPunctuationFollowedByWhitespace) {
  EXPECT_EQ(SplitSentences(kEssay),
            (std::vector<std::string>{
                "It was a bright cold day in April, and the clocks were striking thirteen.",
                "Winston Smith, his chin nuzzled into his breast, slipped quickly through the glass doors!",
                "Was it?", "Yes.", "The hallway smelt of boiled cabbage and old rag mats...",
                "At one end of it a coloured poster, too large for indoor display, had been tacked to the "
                "wall.It depicted simply an enormous face"}));
  EXPECT_EQ(SplitSentences("a.\n\n\n b? \r\n"), (std::vector<std::string>{"a.", "b?"}));
  EXPECT_EQ(SplitSentences("Dr.Who said \"hi.\" Then left."),
            (std::vector<std::string>{"Dr.Who said \"hi.\" Then left."}));
  EXPECT_TRUE(SplitSentences(" \n\t ").empty());
  EXPECT_FALSE(Haystack::FromText("   ").ok());
}

TEST(HaystackTest, GeneratedAndFromPath) {
  const Haystack generated = Haystack::Generated();
  EXPECT_TRUE(generated.generated());
  EXPECT_EQ(generated.sentences(), (std::vector<std::string>{"The grass is green.", "The sky is blue.",
                                                            "The sun is yellow.", "Here we go.",
                                                            "There and back again."}));
  EXPECT_EQ(generated.At(0, 7), "The sun is yellow.");
  EXPECT_EQ(generated.At(4, 2), "The sky is blue.");
  const auto dir = testing::MakeTempDir("haystack");
  std::ofstream(dir / "b.txt") << "Second file.";
  std::ofstream(dir / "a.txt") << "First file. Two";
  std::ofstream(dir / "skip.md") << "Not read.";
  auto folder = Haystack::FromPath(dir.string());
  ASSERT_TRUE(folder.ok()) << folder.status();
  EXPECT_FALSE(folder->generated());
  // Files sorted by name, joined by a newline (so "Two" ends before "Second").
  EXPECT_EQ(folder->sentences(), (std::vector<std::string>{"First file.", "Two Second file."}));
  EXPECT_EQ(folder->At(1, 1), "First file.");
  auto file = Haystack::FromPath((dir / "b.txt").string());
  ASSERT_TRUE(file.ok());
  EXPECT_EQ(file->sentences(), (std::vector<std::string>{"Second file."}));
  EXPECT_EQ(Haystack::FromPath((dir / "missing.txt").string()).status().code(), absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

TEST(TaskRngTest, SeedsAreStableAndIndependent) {
  // Pinned (SplitMix64, FNV-1a; recomputed in Python): a change here changes every eval
  // sample.
  TaskRng rng(1234);
  EXPECT_EQ(rng.Next(), 0xbb0cf61b2f181cdbull);
  EXPECT_EQ(rng.Next(), 0x97c7a1364df06524ull);
  EXPECT_EQ(TaskRng(1234).Below(63), 46u);
  EXPECT_EQ(SampleSeed(1234, RetrievalTask::kNiahSingle, 1024, 0), 0x1c57ae4964068ad9ull);
  TaskRng a(7), b(7);
  for (int i = 0; i < 100; ++i) {
    const uint64_t below = a.Below(63);
    EXPECT_LT(below, 63u);
    EXPECT_EQ(below, b.Below(63));
    const double unit = a.Unit();
    EXPECT_GE(unit, 0.0);
    EXPECT_LT(unit, 1.0);
    b.Unit();
  }
  EXPECT_EQ(SampleSeed(1234, RetrievalTask::kNiahSingle, 1024, 3), SampleSeed(1234, RetrievalTask::kNiahSingle, 1024, 3));
  std::set<uint64_t> seeds;
  for (RetrievalTask task : AllTasks()) {
    for (int32_t context : {1024, 2048}) {
      for (int32_t i = 0; i < 4; ++i) seeds.insert(SampleSeed(1234, task, context, i));
    }
  }
  EXPECT_EQ(seeds.size(), AllTasks().size() * 2 * 4);
  EXPECT_NE(SampleSeed(1234, RetrievalTask::kKvLookup, 1024, 0), SampleSeed(1235, RetrievalTask::kKvLookup, 1024, 0));
}

TEST(TaskNamesTest, ParseRoundTrips) {
  for (RetrievalTask task : AllTasks()) EXPECT_EQ(*ParseTask(TaskName(task)), task);
  EXPECT_EQ(TaskName(RetrievalTask::kVariableTracking), "vt");
  auto bad = ParseTask("niah");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "kv_lookup"));
  EXPECT_EQ(KeyWords().front(), "apple");
  EXPECT_EQ(KeyWords().back(), "summit");
  EXPECT_EQ(std::set<std::string_view>(KeyWords().begin(), KeyWords().end()).size(), KeyWords().size());
}

// Templates, answer formats and order of appearance, for every task.
TEST(TaskContentTest, TemplatesAndAnswers) {
  const std::string key = "[a-z]+-[1-9][0-9][0-9]", value = "[1-9][0-9]{6}";
  auto full = [](const std::string& s, const std::string& re) { return std::regex_match(s, std::regex(re)); };
  for (uint64_t seed = 0; seed < 50; ++seed) {
    TaskRng rng(seed);
    const TaskContent single = MakeTaskContent(RetrievalTask::kNiahSingle, &rng);
    ASSERT_EQ(single.inserted.size(), 1u);
    EXPECT_TRUE(full(single.inserted[0], "The special magic number for " + key + " is " + value + "\\."))
        << single.inserted[0];
    std::smatch m;
    ASSERT_TRUE(std::regex_match(single.inserted[0], m, std::regex("The special magic number for (.*) is (.*)\\.")));
    EXPECT_EQ(single.question, absl::StrCat("\nQuestion: What is the special magic number for ", m[1].str(), "?\nAnswer:"));
    EXPECT_EQ(single.answer, " " + m[2].str());

    const TaskContent multikey = MakeTaskContent(RetrievalTask::kNiahMultikey, &rng);
    ASSERT_EQ(multikey.inserted.size(), 4u);
    std::set<std::string> keys;
    bool asked_found = false;
    for (const std::string& s : multikey.inserted) {
      ASSERT_TRUE(std::regex_match(s, m, std::regex("The special magic number for (" + key + ") is (" + value + ")\\.")));
      keys.insert(m[1].str());
      if (multikey.question == absl::StrCat("\nQuestion: What is the special magic number for ", m[1].str(), "?\nAnswer:")) {
        EXPECT_EQ(multikey.answer, " " + m[2].str());
        asked_found = true;
      }
    }
    EXPECT_EQ(keys.size(), 4u);
    EXPECT_TRUE(asked_found);

    const TaskContent multivalue = MakeTaskContent(RetrievalTask::kNiahMultivalue, &rng);
    ASSERT_EQ(multivalue.inserted.size(), 4u);
    std::vector<std::string> values;
    std::string the_key;
    for (const std::string& s : multivalue.inserted) {
      ASSERT_TRUE(std::regex_match(s, m, std::regex("One of the special magic numbers for (" + key + ") is (" + value + ")\\.")));
      if (the_key.empty()) the_key = m[1].str();
      EXPECT_EQ(m[1].str(), the_key);
      values.push_back(m[2].str());
    }
    EXPECT_EQ(std::set<std::string>(values.begin(), values.end()).size(), 4u);
    EXPECT_EQ(multivalue.question,
              absl::StrCat("\nQuestion: What are all the special magic numbers for ", the_key, "?\nAnswer:"));
    EXPECT_EQ(multivalue.answer, absl::StrCat(" ", values[0], ", ", values[1], ", ", values[2], ", ", values[3]));

    const TaskContent kv = MakeTaskContent(RetrievalTask::kKvLookup, &rng);
    ASSERT_EQ(kv.inserted.size(), 24u);
    keys.clear();
    std::set<std::string> kv_values;
    asked_found = false;
    for (const std::string& s : kv.inserted) {
      ASSERT_TRUE(std::regex_match(s, m, std::regex("Key (" + key + ") has value (" + value + ")\\.")));
      keys.insert(m[1].str());
      kv_values.insert(m[2].str());
      if (kv.question == absl::StrCat("\nQuestion: What is the value of key ", m[1].str(), "?\nAnswer:")) {
        EXPECT_EQ(kv.answer, " " + m[2].str());
        asked_found = true;
      }
    }
    EXPECT_EQ(keys.size(), 24u);
    EXPECT_EQ(kv_values.size(), 24u);
    EXPECT_TRUE(asked_found);

    const TaskContent vt = MakeTaskContent(RetrievalTask::kVariableTracking, &rng);
    ASSERT_EQ(vt.inserted.size(), 4u);
    ASSERT_TRUE(std::regex_match(vt.inserted[0], m, std::regex("VAR (" + key + ") = (" + value + ")\\.")));
    std::vector<std::string> names = {m[1].str()};
    const std::string v = m[2].str();
    for (int i = 1; i < 4; ++i) {
      ASSERT_TRUE(std::regex_match(vt.inserted[i], m, std::regex("VAR (" + key + ") = VAR (" + key + ")\\.")));
      EXPECT_EQ(m[2].str(), names.back());
      names.push_back(m[1].str());
    }
    EXPECT_EQ(std::set<std::string>(names.begin(), names.end()).size(), 4u);
    EXPECT_EQ(vt.question, absl::StrCat("\nQuestion: Which variables are assigned the value ", v, "?\nAnswer:"));
    EXPECT_EQ(vt.answer, absl::StrCat(" ", names[0], " ", names[1], " ", names[2], " ", names[3]));

    for (const TaskContent* c : {&single, &multikey, &multivalue, &kv, &vt}) {
      ASSERT_EQ(c->depths.size(), c->inserted.size());
      EXPECT_TRUE(std::is_sorted(c->depths.begin(), c->depths.end()));
      for (double d : c->depths) {
        EXPECT_GE(d, 0.0);
        EXPECT_LE(d, 1.0);
      }
    }
  }
}

TEST(HeldOutTasksTest, NamedButNeverDefault) {
  // The default (trained) task list is exactly the five of the spec, in order.
  std::vector<std::string> trained;
  for (RetrievalTask task : AllTasks()) trained.push_back(TaskName(task));
  EXPECT_EQ(trained, (std::vector<std::string>{"niah_single", "niah_multikey", "niah_multivalue", "kv_lookup", "vt"}));
  std::vector<std::string> held_out;
  for (RetrievalTask task : HeldOutTasks()) {
    held_out.push_back(TaskName(task));
    EXPECT_EQ(*ParseTask(TaskName(task)), task);
    EXPECT_TRUE(IsHeldOut(task));
    EXPECT_EQ(std::find(AllTasks().begin(), AllTasks().end(), task), AllTasks().end()) << TaskName(task);
  }
  EXPECT_EQ(held_out,
            (std::vector<std::string>{"niah_reworded", "kv_lookup_48", "kv_lookup_keyfmt", "vt_8hop", "vt_reworded"}));
  for (RetrievalTask task : AllTasks()) EXPECT_FALSE(IsHeldOut(task));
  EXPECT_TRUE(absl::StrContains(ParseTask("niah").status().message(), "vt_8hop"));
  // Seeds come from the task's name: the trained tasks' samples are those pinned above.
  EXPECT_EQ(SampleSeed(1234, RetrievalTask::kNiahSingle, 1024, 0), 0x1c57ae4964068ad9ull);
  std::set<uint64_t> seeds;
  for (const auto* tasks : {&AllTasks(), &HeldOutTasks()}) {
    for (RetrievalTask task : *tasks) seeds.insert(SampleSeed(1234, task, 1024, 0));
  }
  EXPECT_EQ(seeds.size(), AllTasks().size() + HeldOutTasks().size());
}

// Held-out templates and answers; each draws in its trained counterpart's order, so the
// same rng state gives the counterpart's keys and values in the new wording.
TEST(HeldOutTasksTest, TemplatesAnswersAndDrawOrder) {
  const std::string key = "[a-z]+-[1-9][0-9][0-9]", value = "[1-9][0-9]{6}";
  std::smatch m;
  for (uint64_t seed = 0; seed < 50; ++seed) {
    auto content = [seed](RetrievalTask task) {
      TaskRng rng(seed);
      return MakeTaskContent(task, &rng);
    };
    const TaskContent single = content(RetrievalTask::kNiahSingle);
    ASSERT_TRUE(std::regex_match(single.inserted[0], m, std::regex("The special magic number for (.*) is (.*)\\.")));
    const std::string k = m[1].str(), v = m[2].str();

    const TaskContent reworded = content(RetrievalTask::kNiahReworded);
    EXPECT_EQ(reworded.inserted,
              std::vector<std::string>{absl::StrCat("Remember that the secret code of ", k, " is ", v, ".")});
    EXPECT_EQ(reworded.question, absl::StrCat("\nQuestion: What is the secret code of ", k, "?\nAnswer:"));
    EXPECT_EQ(reworded.answer, " " + v);
    EXPECT_EQ(reworded.depths, single.depths);

    const TaskContent kv = content(RetrievalTask::kKvLookup);
    const TaskContent keyfmt = content(RetrievalTask::kKvLookupKeyFormat);
    ASSERT_EQ(keyfmt.inserted.size(), kv.inserted.size());
    for (size_t i = 0; i < kv.inserted.size(); ++i) {
      ASSERT_TRUE(std::regex_match(kv.inserted[i], m, std::regex("Key ([a-z]+)-([0-9]+) has value (" + value + ")\\.")));
      EXPECT_EQ(keyfmt.inserted[i], absl::StrCat("Key ", m[2].str(), "-", m[1].str(), " has value ", m[3].str(), "."));
      if (kv.question == absl::StrCat("\nQuestion: What is the value of key ", m[1].str(), "-", m[2].str(), "?\nAnswer:")) {
        EXPECT_EQ(keyfmt.question,
                  absl::StrCat("\nQuestion: What is the value of key ", m[2].str(), "-", m[1].str(), "?\nAnswer:"));
      }
    }
    EXPECT_EQ(keyfmt.answer, kv.answer);
    EXPECT_EQ(keyfmt.depths, kv.depths);

    const TaskContent kv48 = content(RetrievalTask::kKvLookup48);
    ASSERT_EQ(kv48.inserted.size(), 48u);
    std::set<std::string> keys, values;
    bool asked_found = false;
    for (size_t i = 0; i < kv48.inserted.size(); ++i) {
      ASSERT_TRUE(std::regex_match(kv48.inserted[i], m, std::regex("Key (" + key + ") has value (" + value + ")\\.")));
      keys.insert(m[1].str());
      values.insert(m[2].str());
      // The first 24 keys are kv_lookup's (the keys are drawn first).
      if (i < kv.inserted.size()) EXPECT_TRUE(absl::StartsWith(kv.inserted[i], "Key " + m[1].str() + " "));
      if (kv48.question == absl::StrCat("\nQuestion: What is the value of key ", m[1].str(), "?\nAnswer:")) {
        EXPECT_EQ(kv48.answer, " " + m[2].str());
        asked_found = true;
      }
    }
    EXPECT_EQ(keys.size(), 48u);
    EXPECT_EQ(values.size(), 48u);
    EXPECT_TRUE(asked_found);
    EXPECT_EQ(kv48.depths.size(), 48u);

    const TaskContent vt = content(RetrievalTask::kVariableTracking);
    const TaskContent vt8 = content(RetrievalTask::kVariableTracking8Hops);
    ASSERT_EQ(vt8.inserted.size(), 8u);
    ASSERT_TRUE(std::regex_match(vt8.inserted[0], m, std::regex("VAR (" + key + ") = (" + value + ")\\.")));
    std::vector<std::string> names = {m[1].str()};
    const std::string v8 = m[2].str();
    for (int i = 1; i < 8; ++i) {
      ASSERT_TRUE(std::regex_match(vt8.inserted[i], m, std::regex("VAR (" + key + ") = VAR (" + key + ")\\.")));
      EXPECT_EQ(m[2].str(), names.back());
      names.push_back(m[1].str());
    }
    EXPECT_EQ(std::set<std::string>(names.begin(), names.end()).size(), 8u);
    EXPECT_EQ(vt8.question, absl::StrCat("\nQuestion: Which variables are assigned the value ", v8, "?\nAnswer:"));
    EXPECT_EQ(vt8.answer, " " + absl::StrJoin(names, " "));
    // The first 4 names are vt's.
    EXPECT_TRUE(absl::StartsWith(vt.answer, absl::StrCat(" ", names[0], " ", names[1], " ", names[2], " ", names[3])));

    const TaskContent vt_reworded = content(RetrievalTask::kVariableTrackingReworded);
    ASSERT_EQ(vt_reworded.inserted.size(), 4u);
    ASSERT_TRUE(std::regex_match(vt.inserted[0], m, std::regex("VAR (" + key + ") = (" + value + ")\\.")));
    const std::string vt_value = m[2].str();
    std::vector<std::string> vt_names = absl::StrSplit(vt.answer.substr(1), ' ');
    EXPECT_EQ(vt_reworded.inserted[0], absl::StrCat("Let ", vt_names[0], " be ", vt_value, "."));
    for (int i = 1; i < 4; ++i) {
      EXPECT_EQ(vt_reworded.inserted[i], absl::StrCat("Let ", vt_names[i], " be ", vt_names[i - 1], "."));
    }
    EXPECT_EQ(vt_reworded.question, absl::StrCat("\nQuestion: Which variables are equal to ", vt_value, "?\nAnswer:"));
    EXPECT_EQ(vt_reworded.answer, vt.answer);
    EXPECT_EQ(vt_reworded.depths, vt.depths);

    for (const TaskContent* c : {&reworded, &keyfmt, &kv48, &vt8, &vt_reworded}) {
      ASSERT_EQ(c->depths.size(), c->inserted.size());
      EXPECT_TRUE(std::is_sorted(c->depths.begin(), c->depths.end()));
    }
  }
}

TEST(ComposeBodyTest, DepthPlacementBetweenSentences) {
  const Haystack h = Haystack::Generated();
  TaskContent c;
  c.inserted = {"A.", "B.", "C."};
  c.depths = {0.0, 0.5, 1.0};
  EXPECT_EQ(ComposeBody(h, 0, 4, c),
            "A. The grass is green. The sky is blue. B. The sun is yellow. Here we go. C.");
  // round(0.5 * 5) = 2 (half to even, as Python's round), round(0.7 * 5) = round(3.5) = 4.
  c.depths = {0.5, 0.7, 0.7};
  EXPECT_EQ(ComposeBody(h, 0, 5, c),
            "The grass is green. The sky is blue. A. The sun is yellow. Here we go. B. C. There and back again.");
  // Wraps around the haystack from the start sentence.
  c.depths = {1.0, 1.0, 1.0};
  EXPECT_EQ(ComposeBody(h, 3, 3, c), "Here we go. There and back again. The grass is green. A. B. C.");
  EXPECT_EQ(ComposeBody(h, 0, 0, c), "A. B. C.");
  // An exact niah_single depth takes no draw and lands exactly.
  TaskRng rng(5);
  const TaskContent at_quarter = MakeTaskContent(RetrievalTask::kNiahSingle, &rng, 0.25);
  EXPECT_EQ(at_quarter.depths, std::vector<double>{0.25});
  const std::string body = ComposeBody(h, 0, 8, at_quarter);
  EXPECT_TRUE(absl::StartsWith(body, "The grass is green. The sky is blue. The special magic number for")) << body;
}

TEST_F(RetrievalTasksTest, SamplesAreDeterministicAndFitTheirContext) {
  const Haystack generated = Haystack::Generated();
  auto essay = Haystack::FromText(std::string(kEssay) + " " + kEssay);
  ASSERT_TRUE(essay.ok());
  for (const Haystack* haystack : std::vector<const Haystack*>{&generated, &*essay}) {
    // One more filler sentence adds at most its own tokens (+1 for the space before it).
    int64_t longest_sentence_tokens = 0;
    for (const std::string& sentence : haystack->sentences()) {
      longest_sentence_tokens = std::max(longest_sentence_tokens, Length(" " + sentence));
    }
    for (RetrievalTask task : AllTasks()) {
      // kv_lookup's 24 pairs alone take about 600 tokens (digits are single
      // tokens); the tokenizer itself has no context limit.
      const std::vector<int32_t> contexts =
          task == RetrievalTask::kKvLookup ? std::vector<int32_t>{700, 1024} : std::vector<int32_t>{256, 448};
      for (int32_t context : contexts) {
        auto a = MakeSample(*haystack, *tokenizer_, bos_, task, context, 1234, 2);
        ASSERT_TRUE(a.ok()) << TaskName(task) << " " << context << ": " << a.status();
        auto b = MakeSample(*haystack, *tokenizer_, bos_, task, context, 1234, 2);
        ASSERT_TRUE(b.ok());
        EXPECT_EQ(a->prompt, b->prompt);
        EXPECT_EQ(a->prompt_ids, b->prompt_ids);
        EXPECT_EQ(a->content.answer, b->content.answer);
        auto other = MakeSample(*haystack, *tokenizer_, bos_, task, context, 1234, 3);
        ASSERT_TRUE(other.ok());
        EXPECT_NE(a->prompt, other->prompt);
        auto other_seed = MakeSample(*haystack, *tokenizer_, bos_, task, context, 99, 2);
        ASSERT_TRUE(other_seed.ok());
        EXPECT_NE(a->prompt, other_seed->prompt);

        // <BOS> + prompt; prompt = body + question; answer after it.
        EXPECT_EQ(a->prompt_ids.front(), bos_);
        EXPECT_EQ(a->prompt_ids, *tokenizer_->Encode(a->prompt));
        EXPECT_TRUE(absl::EndsWith(a->prompt, a->content.question));
        const std::string body = a->prompt.substr(0, a->prompt.size() - a->content.question.size());
        EXPECT_EQ(body, ComposeBody(*haystack, a->haystack_start, a->filler_sentences, a->content));
        for (const std::string& s : a->content.inserted) EXPECT_TRUE(absl::StrContains(body, s));
        // The haystack grew while it fitted: one more sentence would not.
        const int32_t limit = context - kContextMarginTokens;
        EXPECT_EQ(a->total_tokens, Length(a->prompt + a->content.answer));
        EXPECT_LE(a->total_tokens, limit);
        const std::string longer = ComposeBody(*haystack, a->haystack_start, a->filler_sentences + 1, a->content);
        EXPECT_GT(Length(longer + a->content.question + a->content.answer), limit);
        EXPECT_GT(a->total_tokens, limit - longest_sentence_tokens - 1)
            << "the haystack stopped growing before the context was full";
        EXPECT_LT(a->haystack_start, static_cast<int64_t>(haystack->sentences().size()));
      }
    }
  }
}

TEST_F(RetrievalTasksTest, HeldOutSamplesAreDeterministicAndFitTheirContext) {
  const Haystack h = Haystack::Generated();
  for (RetrievalTask task : HeldOutTasks()) {
    const int32_t context =
        task == RetrievalTask::kKvLookup48 ? 1024 : task == RetrievalTask::kKvLookupKeyFormat ? 700 : 448;
    auto a = MakeSample(h, *tokenizer_, bos_, task, context, 1234, 2);
    ASSERT_TRUE(a.ok()) << TaskName(task) << ": " << a.status();
    auto b = MakeSample(h, *tokenizer_, bos_, task, context, 1234, 2);
    ASSERT_TRUE(b.ok());
    EXPECT_EQ(a->prompt_ids, b->prompt_ids);
    EXPECT_EQ(a->content.answer, b->content.answer);
    EXPECT_EQ(a->seed, SampleSeed(1234, task, context, 2));
    EXPECT_NE(a->prompt, MakeSample(h, *tokenizer_, bos_, task, context, 1234, 3)->prompt);
    EXPECT_EQ(a->prompt_ids, *tokenizer_->Encode(a->prompt));
    EXPECT_TRUE(absl::EndsWith(a->prompt, a->content.question));
    for (const std::string& s : a->content.inserted) EXPECT_TRUE(absl::StrContains(a->prompt, s));
    EXPECT_LE(a->total_tokens, context - kContextMarginTokens);
    EXPECT_GT(a->filler_sentences, 0);
    // The answer scores as itself, and a truncated chain does not.
    EXPECT_TRUE(IsExactMatch(a->content.answer + "\n", a->content.answer));
    EXPECT_FALSE(IsExactMatch(a->content.answer.substr(0, a->content.answer.size() - 1), a->content.answer));
  }
  // An exact depth stays niah_single's alone.
  EXPECT_EQ(MakeSample(h, *tokenizer_, bos_, RetrievalTask::kNiahReworded, 448, 1234, 0, 0.5).status().code(),
            absl::StatusCode::kInvalidArgument);
  // 48 pairs do not fit 512 tokens.
  EXPECT_EQ(MakeSample(h, *tokenizer_, bos_, RetrievalTask::kKvLookup48, 512, 1234, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RetrievalTasksTest, SampleStreamsAreIndependent) {
  const Haystack h = Haystack::Generated();
  // The same (task, context, index) gives the same prompt whatever else is generated.
  auto alone = MakeSample(h, *tokenizer_, bos_, RetrievalTask::kKvLookup, 1024, 1234, 5);
  ASSERT_TRUE(alone.ok());
  ASSERT_TRUE(MakeSample(h, *tokenizer_, bos_, RetrievalTask::kVariableTracking, 256, 1234, 0).ok());
  auto again = MakeSample(h, *tokenizer_, bos_, RetrievalTask::kKvLookup, 1024, 1234, 5);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(alone->prompt, again->prompt);
  EXPECT_EQ(alone->seed, SampleSeed(1234, RetrievalTask::kKvLookup, 1024, 5));
  // The haystack start is seeded per sample.
  std::set<int64_t> starts;
  for (int32_t i = 0; i < 10; ++i) {
    starts.insert(MakeSample(h, *tokenizer_, bos_, RetrievalTask::kNiahSingle, 256, 1234, i)->haystack_start);
  }
  EXPECT_GE(starts.size(), 3u);
}

TEST_F(RetrievalTasksTest, ExactDepthsKeepTheSampleAndMoveTheNeedle) {
  const Haystack h = Haystack::Generated();
  auto first = MakeSample(h, *tokenizer_, bos_, RetrievalTask::kNiahSingle, 448, 1234, 0, 0.0);
  auto last = MakeSample(h, *tokenizer_, bos_, RetrievalTask::kNiahSingle, 448, 1234, 0, 1.0);
  ASSERT_TRUE(first.ok() && last.ok());
  EXPECT_EQ(first->content.inserted, last->content.inserted);
  EXPECT_TRUE(absl::StartsWith(first->prompt, first->content.inserted[0] + " " + h.At(first->haystack_start, 0)))
      << first->prompt;
  EXPECT_TRUE(absl::EndsWith(last->prompt, " " + last->content.inserted[0] + last->content.question)) << last->prompt;
  EXPECT_EQ(MakeSample(h, *tokenizer_, bos_, RetrievalTask::kNiahSingle, 448, 1234, 0, 1.5).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MakeSample(h, *tokenizer_, bos_, RetrievalTask::kVariableTracking, 448, 1234, 0, 0.5).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(RetrievalTasksTest, TooSmallAContextIsAnError) {
  // kv_lookup's 24 pairs alone take more than 256 tokens.
  auto sample = MakeSample(Haystack::Generated(), *tokenizer_, bos_, RetrievalTask::kKvLookup, 256, 1234, 0);
  EXPECT_EQ(sample.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(sample.status().message(), "too small for kv_lookup")) << sample.status();
}

TEST(ScoringTest, ExactMatchAfterTrimming) {
  EXPECT_TRUE(IsExactMatch(" 5821934", " 5821934"));
  EXPECT_TRUE(IsExactMatch("5821934 \t", " 5821934"));
  EXPECT_TRUE(IsExactMatch(" 5821934\nQuestion: more", " 5821934"));
  EXPECT_TRUE(IsExactMatch(" a-100 b-200 c-300 d-400", " a-100 b-200 c-300 d-400"));
  EXPECT_FALSE(IsExactMatch(" 5821934.", " 5821934"));
  EXPECT_FALSE(IsExactMatch(" 582193", " 5821934"));
  EXPECT_FALSE(IsExactMatch("", " 5821934"));
  EXPECT_FALSE(IsExactMatch("\n5821934", " 5821934"));
  EXPECT_EQ(NormalizeAnswer("  1, 2 \nx"), "1, 2");
}

}  // namespace
}  // namespace kvgate::bench
