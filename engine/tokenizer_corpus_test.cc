// Large-corpus equality with Hugging Face tokenizers: every corpus in
// tests/golden/tokenizers/<name>/corpus.jsonl (made by tests/golden/make_tokenizer_corpus.py)
// must be encoded and decoded exactly as HF did, and every tokenizer.json under tests/golden/
// and models/ must have a corpus.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/tokenizer.h"
#include "gtest/gtest.h"

namespace kvgate::engine {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

constexpr int kMaxReported = 12;  // mismatches printed in full per corpus

// Named here, not listed from the directory: ctest discovers test names at build time.
const std::vector<std::string>& KnownCorpora() {
  static const auto* names = new std::vector<std::string>{
      "edge_added_flags",           "edge_gpt2_bytelevel",
      "edge_metaspace_always",      "edge_metaspace_nfkc_lower",
      "edge_missing_bytes",         "edge_unk_fused",
      "edge_unk_unfused",           "kvgate_tiny",
      "llama3_bytelevel",           "qwen2_bytelevel",
      "sentencepiece_bytefallback", "tinystories",
  };
  return *names;
}

fs::path SourceDir() {
  const char* dir = std::getenv("KVGATE_SOURCE_DIR");
  return dir != nullptr && *dir != '\0' ? fs::path(dir) : fs::current_path();
}

fs::path CorpusPath(const std::string& name) {
  return SourceDir() / "tests" / "golden" / "tokenizers" / name / "corpus.jsonl";
}

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

// The hash the generator records (FNV-1a, 64 bit, lower-case hex).
std::string Fnv1a64(std::string_view data) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : data) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// The text in quotes with every non-printable-ASCII code point as \u{XXXX}, so control
// characters, spaces other than U+0020 and invisible code points show.
std::string Escaped(const std::string& s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : 4;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; k < len && i + k < s.size(); ++k) {
      cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    }
    i += len;
    if (cp >= 0x20 && cp < 0x7F && cp != '"' && cp != '\\') {
      out.push_back(static_cast<char>(cp));
    } else {
      char buf[16];
      std::snprintf(buf, sizeof(buf), "\\u{%X}", cp);
      out += buf;
    }
  }
  return out + "\"";
}

std::string Ids(const std::vector<int32_t>& ids) {
  return absl::StrCat("[", absl::StrJoin(ids, ","), "]");
}

struct Header {
  std::string tokenizer;  // repo-relative path
  std::string fnv;
  std::string oracle;
  std::vector<int32_t> prefix, suffix;
};

// Reads the header line of a corpus; empty tokenizer on a malformed header.
Header ReadHeader(const std::string& first_line) {
  Header h;
  const Json j = Json::parse(first_line, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || j.value("format", "") != "kvgate-tokenizer-corpus/1") {
    return h;
  }
  h.tokenizer = j.value("tokenizer", "");
  h.fnv = j.value("tokenizer_fnv1a64", "");
  h.oracle = j.value("oracle", "?");
  h.prefix = j.value("special_prefix", std::vector<int32_t>{});
  h.suffix = j.value("special_suffix", std::vector<int32_t>{});
  return h;
}

class TokenizerCorpusTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TokenizerCorpusTest, EqualsHuggingFace) {
  const std::string name = GetParam();
  const fs::path path = CorpusPath(name);
  ASSERT_TRUE(fs::exists(path)) << "corpus missing: " << path
                                << " (regenerate with tests/golden/make_tokenizer_corpus.py)";
  std::ifstream in(path, std::ios::binary);
  std::string line;
  ASSERT_TRUE(std::getline(in, line)) << path << " is empty";
  const Header h = ReadHeader(line);
  ASSERT_FALSE(h.tokenizer.empty()) << path << ": bad header line";
  const fs::path tok_path = SourceDir() / h.tokenizer;
  ASSERT_TRUE(fs::exists(tok_path)) << "tokenizer missing: " << tok_path;
  ASSERT_EQ(Fnv1a64(ReadFile(tok_path)), h.fnv)
      << tok_path << " changed since " << path << " was made: regenerate the corpus";
  auto tok = Tokenizer::FromFile(tok_path.string());
  ASSERT_TRUE(tok.ok()) << tok.status();
  const Tokenizer& t = **tok;

  int cases = 0, encode_bad = 0, decode_bad = 0, reported = 0;
  const auto report = [&](const std::string& what) {
    if (reported++ < kMaxReported) ADD_FAILURE() << name << " (" << h.oracle << ") " << what;
  };
  for (int line_no = 2; std::getline(in, line); ++line_no) {
    const Json c = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    ASSERT_FALSE(c.is_discarded()) << path << ":" << line_no << " is not JSON";
    ++cases;
    std::vector<int32_t> ids;  // what is decoded
    std::string where;
    if (c.contains("t")) {
      const std::string text = c["t"].get<std::string>();
      const auto want_plain = c["n"].get<std::vector<int32_t>>();
      std::vector<int32_t> want_sp;
      if (c.contains("s")) {
        want_sp = c["s"].get<std::vector<int32_t>>();
      } else {
        want_sp = h.prefix;
        want_sp.insert(want_sp.end(), want_plain.begin(), want_plain.end());
        want_sp.insert(want_sp.end(), h.suffix.begin(), h.suffix.end());
      }
      auto got_plain = t.Encode(text, false);
      auto got_sp = t.Encode(text, true);
      const bool ok =
          got_plain.ok() && got_sp.ok() && *got_plain == want_plain && *got_sp == want_sp;
      if (!ok) {
        ++encode_bad;
        report(absl::StrCat("line ", line_no, " encode text=", Escaped(text), "\n  want ",
                            Ids(want_plain), "\n  got  ",
                            got_plain.ok() ? Ids(*got_plain) : got_plain.status().ToString(),
                            "\n  want (special) ", Ids(want_sp), "\n  got  (special) ",
                            got_sp.ok() ? Ids(*got_sp) : got_sp.status().ToString()));
      }
      ids = std::move(want_sp);  // decode HF's ids, so decode checks stand alone
      where = absl::StrCat("line ", line_no, " decode of text=", Escaped(text));
    } else {
      ids = c["i"].get<std::vector<int32_t>>();
      where = absl::StrCat("line ", line_no, " decode");
    }
    const std::string want_d = c["d"].get<std::string>();
    const std::string want_k = c.contains("k") ? c["k"].get<std::string>() : want_d;
    auto got_d = t.Decode(ids, false);
    auto got_k = t.Decode(ids, true);
    if (!got_d.ok() || !got_k.ok() || *got_d != want_d || *got_k != want_k) {
      ++decode_bad;
      report(absl::StrCat(where, " ids=", Ids(ids), "\n  want ", Escaped(want_d), "\n  got  ",
                          got_d.ok() ? Escaped(*got_d) : got_d.status().ToString(),
                          "\n  want (skip special) ", Escaped(want_k), "\n  got  (skip special) ",
                          got_k.ok() ? Escaped(*got_k) : got_k.status().ToString()));
    }
  }
  EXPECT_GT(cases, 1000) << path << " holds too few cases";
  EXPECT_EQ(encode_bad + decode_bad, 0)
      << name << ": " << encode_bad << " encode and " << decode_bad << " decode mismatches in "
      << cases << " cases (first " << kMaxReported << " shown above)";
}

INSTANTIATE_TEST_SUITE_P(Corpora, TokenizerCorpusTest, ::testing::ValuesIn(KnownCorpora()),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           return info.param;
                         });

// Every tokenizer.json in the repository is covered by some corpus, byte for byte.
TEST(TokenizerCorpusCoverageTest, EveryTokenizerHasACorpus) {
  std::set<std::string> covered;
  for (const std::string& name : KnownCorpora()) {
    std::ifstream in(CorpusPath(name), std::ios::binary);
    std::string line;
    if (std::getline(in, line)) covered.insert(ReadHeader(line).fnv);
  }
  int found = 0;
  for (const char* top : {"tests/golden", "models"}) {
    const fs::path root = SourceDir() / top;
    ASSERT_TRUE(fs::is_directory(root)) << "missing " << root;
    for (const auto& e : fs::recursive_directory_iterator(root)) {
      if (e.path().filename() != "tokenizer.json") continue;
      ++found;
      EXPECT_TRUE(covered.contains(Fnv1a64(ReadFile(e.path()))))
          << e.path() << " has no corpus in tests/golden/tokenizers/*/corpus.jsonl: run "
          << "tests/golden/make_tokenizer_corpus.py and add the new name to KnownCorpora()";
    }
  }
  EXPECT_GE(found, 10);
}

}  // namespace
}  // namespace kvgate::engine
