// Normalizers of tokenizer.json (HF tokenizers/src/normalizers/*.rs semantics).
#include <utf8proc.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer_components.h"

namespace kvgate::engine::tok {
namespace {

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Normalize(std::string& s) const override {
    for (const auto& p : parts_) {
      if (absl::Status st = p->Normalize(s); !st.ok()) return st;
    }
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

// HF Prepend leaves an empty string empty.
class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  absl::Status Normalize(std::string& s) const override {
    if (!s.empty()) s.insert(0, prefix_);
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(std::unique_ptr<Regex> re, std::string content)
      : re_(std::move(re)), content_(std::move(content)) {}
  absl::Status Normalize(std::string& s) const override {
    auto r = ReplaceAll(*re_, s, content_);
    if (!r.ok()) return r.status();
    s = std::move(*r);
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Regex> re_;
  std::string content_;
};

// HF normalizes with Unicode 9.0 tables (unicode-normalization-alignments 0.1.12), utf8proc
// with newer ones. Normalization is stable for code points assigned in 9.0, and one
// assigned later is, to HF, an unassigned starter that nothing reorders or composes
// across. So the text is cut at such code points, which are kept as they are, and every
// run between them is normalized by utf8proc.
class UnicodeNormalizer : public Normalizer {
 public:
  explicit UnicodeNormalizer(int options) : options_(options) {}
  absl::Status Normalize(std::string& s) const override {
    if (s.empty()) return absl::OkStatus();
    std::string out;
    out.reserve(s.size() + s.size() / 4);
    size_t run_start = 0, i = 0;
    while (i < s.size()) {
      const size_t at = i;
      const char32_t cp = DecodeUtf8(s, i);
      if (!IsNewSinceUnicode9(cp)) continue;
      if (absl::Status st = MapRun(std::string_view(s).substr(run_start, at - run_start), out);
          !st.ok()) {
        return st;
      }
      out.append(s, at, i - at);
      run_start = i;
    }
    if (run_start == 0) {  // the common case: one run, the whole text
      out.clear();
      if (absl::Status st = MapRun(s, out); !st.ok()) return st;
    } else if (absl::Status st = MapRun(std::string_view(s).substr(run_start), out); !st.ok()) {
      return st;
    }
    s = std::move(out);
    return absl::OkStatus();
  }

 private:
  absl::Status MapRun(std::string_view run, std::string& out) const {
    if (run.empty()) return absl::OkStatus();
    utf8proc_uint8_t* mapped = nullptr;
    const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(run.data()),
                                            static_cast<utf8proc_ssize_t>(run.size()), &mapped,
                                            static_cast<utf8proc_option_t>(options_));
    if (n < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unicode normalization failed: ", utf8proc_errmsg(n)));
    }
    out.append(reinterpret_cast<const char*>(mapped), static_cast<size_t>(n));
    std::free(mapped);
    return absl::OkStatus();
  }

  int options_;
};

// Rust char::to_lowercase, char by char (no final-sigma context, as HF).
class LowercaseNormalizer : public Normalizer {
 public:
  absl::Status Normalize(std::string& s) const override {
    std::string out;
    out.reserve(s.size());
    size_t i = 0;
    while (i < s.size()) {
      const char32_t cp = DecodeUtf8(s, i);
      if (cp == 0x130) {  // the one unconditional multi-char lowercase mapping
        out += "i\xCC\x87";
        continue;
      }
      AppendUtf8(ToLowerSimple(cp), out);
    }
    s = std::move(out);
    return absl::OkStatus();
  }
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  absl::Status Normalize(std::string& s) const override {
    size_t begin = 0, end = s.size();
    if (left_) {
      while (begin < end) {
        size_t i = begin;
        if (!IsUnicodeWhitespace(DecodeUtf8(s, i))) break;
        begin = i;
      }
    }
    if (right_) {
      while (end > begin) {
        size_t start = end - 1;
        while (start > begin && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
        size_t i = start;
        if (!IsUnicodeWhitespace(DecodeUtf8(s, i))) break;
        end = start;
      }
    }
    s = s.substr(begin, end - begin);
    return absl::OkStatus();
  }

 private:
  bool left_, right_;
};

}  // namespace

absl::StatusOr<std::string> ReplaceAll(const Regex& re, std::string_view s,
                                       std::string_view content) {
  std::vector<ByteRange> matches;
  if (absl::Status st = re.FindAll(s, matches); !st.ok()) return st;
  std::string out;
  out.reserve(s.size());
  size_t prev = 0;
  for (const auto& [start, end] : matches) {
    out.append(s.substr(prev, start - prev));
    out.append(content);
    prev = end;
  }
  out.append(s.substr(prev));
  return out;
}

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const Json& j,
                                                            const std::string& path) {
  if (j.is_null()) return std::unique_ptr<Normalizer>();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return Malformed(path, "must be null or an object with a string \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    const Json& list = j.contains("normalizers") ? j["normalizers"] : Json();
    if (!list.is_array()) return Malformed(path + ".normalizers", "must be an array");
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (size_t i = 0; i < list.size(); ++i) {
      auto p = ParseNormalizer(list[i], absl::StrCat(path, ".normalizers[", i, "]"));
      if (!p.ok()) return p.status();
      if (*p != nullptr) parts.push_back(std::move(*p));
    }
    return std::unique_ptr<Normalizer>(new SequenceNormalizer(std::move(parts)));
  }
  if (type == "Prepend") {
    auto prefix = GetString(j, "prepend", path);
    if (!prefix.ok()) return prefix.status();
    return std::unique_ptr<Normalizer>(new PrependNormalizer(std::move(*prefix)));
  }
  if (type == "Replace") {
    auto re = GetPattern(j, "pattern", path);
    if (!re.ok()) return re.status();
    auto content = GetString(j, "content", path);
    if (!content.ok()) return content.status();
    return std::unique_ptr<Normalizer>(new ReplaceNormalizer(std::move(*re), std::move(*content)));
  }
  if (type == "NFC") {
    return std::unique_ptr<Normalizer>(new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  }
  if (type == "NFD") {
    return std::unique_ptr<Normalizer>(new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE));
  }
  if (type == "NFKC") {
    return std::unique_ptr<Normalizer>(
        new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT));
  }
  if (type == "NFKD") {
    return std::unique_ptr<Normalizer>(
        new UnicodeNormalizer(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT));
  }
  if (type == "Lowercase") return std::unique_ptr<Normalizer>(new LowercaseNormalizer());
  if (type == "Strip") {
    auto left = GetBool(j, "strip_left", path, true);
    if (!left.ok()) return left.status();
    auto right = GetBool(j, "strip_right", path, true);
    if (!right.ok()) return right.status();
    return std::unique_ptr<Normalizer>(new StripNormalizer(*left, *right));
  }
  return Unsupported(path, type);
}

}  // namespace kvgate::engine::tok
