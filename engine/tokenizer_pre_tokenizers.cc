// Pre-tokenizers of tokenizer.json (HF tokenizers/src/pre_tokenizers/*.rs semantics).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "engine/tokenizer_components.h"

namespace kvgate::engine::tok {
namespace {

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// HF NormalizedString::split: turns find_matches output into the kept ranges.
std::vector<ByteRange> ApplyBehavior(const std::vector<std::pair<ByteRange, bool>>& matches,
                                     Behavior behavior) {
  std::vector<ByteRange> out;
  switch (behavior) {
    case Behavior::kIsolated:
      for (const auto& m : matches) out.push_back(m.first);
      break;
    case Behavior::kRemoved:
      for (const auto& m : matches) {
        if (!m.second) out.push_back(m.first);
      }
      break;
    case Behavior::kContiguous: {
      bool previous_match = false;
      for (const auto& [range, is_match] : matches) {
        if (is_match == previous_match && !out.empty()) {
          out.back().second = range.second;
        } else {
          out.push_back(range);
        }
        previous_match = is_match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& [range, is_match] : matches) {
        if (is_match && !previous_match && !out.empty()) {
          out.back().second = range.second;
        } else {
          out.push_back(range);
        }
        previous_match = is_match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = matches.rbegin(); it != matches.rend(); ++it) {
        const auto& [range, is_match] = *it;
        if (is_match && !previous_match && !out.empty()) {
          out.back().first = range.first;
        } else {
          out.push_back(range);
        }
        previous_match = is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
  return out;
}

// Replaces piece `p` by its sub-ranges, dropping empty ones (HF PreTokenizedString::split).
void EmitRanges(const Piece& p, const std::vector<ByteRange>& ranges, std::vector<Piece>& out) {
  for (const auto& [s, e] : ranges) {
    if (e <= s) continue;
    out.push_back(Piece{p.text.substr(s, e - s), p.orig_start + s, -1});
  }
}

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts_) {
      if (absl::Status s = p->PreTokenize(pieces); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Regex> re, Behavior behavior, bool invert)
      : re_(std::move(re)), behavior_(behavior), invert_(invert) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size());
    std::vector<std::pair<ByteRange, bool>> matches;
    for (Piece& p : pieces) {
      if (p.id >= 0) {
        out.push_back(std::move(p));
        continue;
      }
      if (absl::Status s = FindMatches(*re_, p.text, invert_, matches); !s.ok()) return s;
      EmitRanges(p, ApplyBehavior(matches, behavior_), out);
    }
    pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Regex> re_;
  Behavior behavior_;
  bool invert_;
};

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<Regex> re)
      : add_prefix_space_(add_prefix_space), re_(std::move(re)) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size());
    std::vector<std::pair<ByteRange, bool>> matches;
    for (Piece& p : pieces) {
      if (p.id >= 0) {
        out.push_back(std::move(p));
        continue;
      }
      // NormalizedString::prepend is a no-op on an empty string.
      if (add_prefix_space_ && !p.text.empty() && p.text[0] != ' ') p.text.insert(0, " ");
      if (re_ == nullptr) {
        if (!p.text.empty()) out.push_back(std::move(p));
        continue;
      }
      if (absl::Status s = FindMatches(*re_, p.text, false, matches); !s.ok()) return s;
      EmitRanges(p, ApplyBehavior(matches, Behavior::kIsolated), out);
    }
    // Every byte of every remaining piece becomes its printable stand-in.
    for (Piece& p : out) {
      if (p.id >= 0) continue;
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (char c : p.text) mapped += ByteToUnicode(static_cast<uint8_t>(c));
      p.text = std::move(mapped);
    }
    pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Regex> re_;  // null when use_regex is false
};

enum class PrependScheme { kAlways, kFirst, kNever };

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  absl::Status PreTokenize(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    out.reserve(pieces.size());
    for (Piece& p : pieces) {
      if (p.id >= 0) {
        out.push_back(std::move(p));
        continue;
      }
      std::string s;
      s.reserve(p.text.size() + replacement_.size());
      for (char c : p.text) {
        if (c == ' ') {
          s += replacement_;
        } else {
          s.push_back(c);
        }
      }
      const bool starts = s.compare(0, replacement_.size(), replacement_) == 0;
      const bool prepend = scheme_ == PrependScheme::kAlways ||
                           (scheme_ == PrependScheme::kFirst && p.orig_start == 0);
      if (prepend && !starts && !s.empty()) s.insert(0, replacement_);
      Piece q{std::move(s), p.orig_start, -1};
      if (!split_) {
        if (!q.text.empty()) out.push_back(std::move(q));
        continue;
      }
      // Split on the replacement char, each one opening the following word.
      std::vector<std::pair<ByteRange, bool>> matches;
      size_t prev = 0, pos = 0;
      while ((pos = q.text.find(replacement_, pos)) != std::string::npos) {
        if (pos != prev) matches.push_back({{prev, pos}, false});
        matches.push_back({{pos, pos + replacement_.size()}, true});
        pos += replacement_.size();
        prev = pos;
      }
      if (prev != q.text.size()) matches.push_back({{prev, q.text.size()}, false});
      EmitRanges(q, ApplyBehavior(matches, Behavior::kMergedWithNext), out);
    }
    pieces = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

absl::StatusOr<PrependScheme> ParsePrependScheme(const Json& j, const std::string& path) {
  if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
    if (!j["prepend_scheme"].is_string()) {
      return Malformed(path + ".prepend_scheme", "must be a string");
    }
    const std::string s = j["prepend_scheme"].get<std::string>();
    if (s == "always") return PrependScheme::kAlways;
    if (s == "first") return PrependScheme::kFirst;
    if (s == "never") return PrependScheme::kNever;
    return Malformed(path + ".prepend_scheme", absl::StrCat("'", s, "' is not supported"));
  }
  // Files from before prepend_scheme carry add_prefix_space instead.
  auto add = GetBool(j, "add_prefix_space", path, true);
  if (!add.ok()) return add.status();
  return *add ? PrependScheme::kAlways : PrependScheme::kNever;
}

}  // namespace

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const Json& j,
                                                                const std::string& path) {
  if (j.is_null()) return std::unique_ptr<PreTokenizer>();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return Malformed(path, "must be null or an object with a string \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    const Json& list = j.contains("pretokenizers") ? j["pretokenizers"] : Json();
    if (!list.is_array()) return Malformed(path + ".pretokenizers", "must be an array");
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (size_t i = 0; i < list.size(); ++i) {
      auto p = ParsePreTokenizer(list[i], absl::StrCat(path, ".pretokenizers[", i, "]"));
      if (!p.ok()) return p.status();
      if (*p != nullptr) parts.push_back(std::move(*p));
    }
    return std::unique_ptr<PreTokenizer>(new SequencePreTokenizer(std::move(parts)));
  }
  if (type == "Split") {
    auto re = GetPattern(j, "pattern", path);
    if (!re.ok()) return re.status();
    auto b = GetString(j, "behavior", path);
    if (!b.ok()) return b.status();
    Behavior behavior;
    if (*b == "Removed") {
      behavior = Behavior::kRemoved;
    } else if (*b == "Isolated") {
      behavior = Behavior::kIsolated;
    } else if (*b == "MergedWithPrevious") {
      behavior = Behavior::kMergedWithPrevious;
    } else if (*b == "MergedWithNext") {
      behavior = Behavior::kMergedWithNext;
    } else if (*b == "Contiguous") {
      behavior = Behavior::kContiguous;
    } else {
      return Malformed(path + ".behavior", absl::StrCat("'", *b, "' is not supported"));
    }
    auto invert = GetBool(j, "invert", path, false);
    if (!invert.ok()) return invert.status();
    return std::unique_ptr<PreTokenizer>(new SplitPreTokenizer(std::move(*re), behavior, *invert));
  }
  if (type == "ByteLevel") {
    auto add = GetBool(j, "add_prefix_space", path, true);
    if (!add.ok()) return add.status();
    auto use_regex = GetBool(j, "use_regex", path, true);
    if (!use_regex.ok()) return use_regex.status();
    std::unique_ptr<Regex> re;
    if (*use_regex) {
      auto compiled = Regex::Compile(kGpt2Pattern);
      if (!compiled.ok()) return compiled.status();
      re = std::move(*compiled);
    }
    return std::unique_ptr<PreTokenizer>(new ByteLevelPreTokenizer(*add, std::move(re)));
  }
  if (type == "Metaspace") {
    auto replacement = GetChar(j, "replacement", path);
    if (!replacement.ok()) return replacement.status();
    auto scheme = ParsePrependScheme(j, path);
    if (!scheme.ok()) return scheme.status();
    auto split = GetBool(j, "split", path, true);
    if (!split.ok()) return split.status();
    return std::unique_ptr<PreTokenizer>(
        new MetaspacePreTokenizer(std::move(*replacement), *scheme, *split));
  }
  return Unsupported(path, type);
}

}  // namespace kvgate::engine::tok
