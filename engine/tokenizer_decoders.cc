// Decoders and post-processors of tokenizer.json (HF tokenizers/src/decoders/*.rs,
// processors/*.rs).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/tokenizer_components.h"

namespace kvgate::engine::tok {
namespace {

// ---- Decoders --------------------------------------------------------------------

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (const auto& p : parts_) {
      if (absl::Status s = p->DecodeChain(tokens); !s.ok()) return s;
    }
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(std::unique_ptr<Regex> re, std::string content)
      : re_(std::move(re)), content_(std::move(content)) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) {
      auto r = ReplaceAll(*re_, t, content_);
      if (!r.ok()) return r.status();
      t = std::move(*r);
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Regex> re_;
  std::string content_;
};

// Runs of <0xXX> tokens become the bytes they name; a run that is not valid UTF-8
// becomes one U+FFFD per byte (HF byte_fallback.rs).
class ByteFallbackDecoder : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string bytes;
    const auto flush = [&]() {
      if (bytes.empty()) return;
      if (FindInvalidUtf8(bytes) == std::string_view::npos) {
        out.push_back(bytes);
      } else {
        for (size_t i = 0; i < bytes.size(); ++i) out.push_back("\xEF\xBF\xBD");
      }
      bytes.clear();
    };
    for (std::string& t : tokens) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>')
        byte = ParseHexByte(t[3], t[4]);
      if (byte >= 0) {
        bytes.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens = std::move(out);
    return absl::OkStatus();
  }

 private:
  static int HexDigit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  }
  // Rust u8::from_str_radix(s, 16) on two chars: a leading '+' is accepted.
  static int ParseHexByte(char a, char b) {
    const int lo = HexDigit(b);
    if (lo < 0) return -1;
    if (a == '+') return lo;
    const int hi = HexDigit(a);
    return hi < 0 ? -1 : hi * 16 + lo;
  }
};

class FuseDecoder : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::string all = absl::StrJoin(tokens, "");
    tokens.assign(1, std::move(all));
    return absl::OkStatus();
  }
};

// Removes up to `start` leading and `stop` trailing `content` chars from each token.
class StripDecoder : public Decoder {
 public:
  StripDecoder(char32_t content, size_t start, size_t stop)
      : content_(content), start_(start), stop_(stop) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) {
      std::vector<size_t> starts;  // byte offset of each char
      for (size_t i = 0; i < t.size(); i += Utf8Len(static_cast<unsigned char>(t[i]))) {
        starts.push_back(i);
      }
      const size_t n = starts.size();
      const auto char_at = [&](size_t k) {
        size_t i = starts[k];
        return DecodeUtf8(t, i);
      };
      size_t start_cut = 0;
      for (size_t k = 0; k < std::min(start_, n); ++k) {
        if (char_at(k) != content_) break;
        start_cut = k + 1;
      }
      size_t stop_cut = n;
      for (size_t k = 0; k < std::min(stop_, n); ++k) {
        const size_t index = n - k - 1;
        if (char_at(index) != content_) break;
        stop_cut = index;
      }
      if (stop_cut <= start_cut) {
        t.clear();
        continue;
      }
      const size_t b = start_cut < n ? starts[start_cut] : t.size();
      const size_t e = stop_cut < n ? starts[stop_cut] : t.size();
      t = t.substr(b, e - b);
    }
    return absl::OkStatus();
  }

 private:
  char32_t content_;
  size_t start_, stop_;
};

// Maps the GPT-2 alphabet back to bytes over all tokens at once, then decodes them
// lossily; a token holding any char outside the alphabet contributes its own bytes.
class ByteLevelDecoder : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const std::string& t : tokens) {
      std::string mapped;
      bool ok = true;
      size_t i = 0;
      while (i < t.size()) {
        const int b = UnicodeToByte(DecodeUtf8(t, i));
        if (b < 0) {
          ok = false;
          break;
        }
        mapped.push_back(static_cast<char>(b));
      }
      bytes += ok ? mapped : t;
    }
    tokens.assign(1, Utf8Lossy(bytes));
    return absl::OkStatus();
  }
};

class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(char32_t replacement, bool strip_first)
      : replacement_(replacement), strip_first_(strip_first) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (size_t k = 0; k < tokens.size(); ++k) {
      const std::string& t = tokens[k];
      std::string out;
      out.reserve(t.size());
      size_t i = 0;
      while (i < t.size()) {
        const size_t at = i;
        const char32_t c = DecodeUtf8(t, i);
        if (c == replacement_) {
          // HF drops every replacement char of the first token when it prepends one.
          if (!(k == 0 && strip_first_)) out.push_back(' ');
        } else {
          out.append(t, at, i - at);
        }
      }
      tokens[k] = std::move(out);
    }
    return absl::OkStatus();
  }

 private:
  char32_t replacement_;
  bool strip_first_;
};

char32_t FirstChar(const std::string& s) {
  size_t i = 0;
  return DecodeUtf8(s, i);
}

// ---- Post-processors -------------------------------------------------------------

// Ids before and after the sequence (Template/Bert/Roberta single-sequence forms).
class WrapProcessor : public PostProcessor {
 public:
  WrapProcessor(std::vector<int32_t> before, std::vector<int32_t> after)
      : before_(std::move(before)), after_(std::move(after)) {}
  void Process(std::vector<int32_t>& ids) const override {
    ids.insert(ids.begin(), before_.begin(), before_.end());
    ids.insert(ids.end(), after_.begin(), after_.end());
  }

 private:
  std::vector<int32_t> before_, after_;
};

class SequenceProcessor : public PostProcessor {
 public:
  explicit SequenceProcessor(std::vector<std::unique_ptr<PostProcessor>> parts)
      : parts_(std::move(parts)) {}
  void Process(std::vector<int32_t>& ids) const override {
    for (const auto& p : parts_) p->Process(ids);
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> parts_;
};

class NoopProcessor : public PostProcessor {
 public:
  void Process(std::vector<int32_t>&) const override {}
};

absl::StatusOr<int32_t> TokenPairId(const Json& j, const char* key, const std::string& path) {
  if (!j.contains(key) || !j[key].is_array() || j[key].size() != 2 || !j[key][0].is_string() ||
      !j[key][1].is_number_integer()) {
    return Malformed(path + "." + key, "must be [token, id]");
  }
  return static_cast<int32_t>(j[key][1].get<int64_t>());
}

absl::StatusOr<std::unique_ptr<PostProcessor>> ParseTemplate(const Json& j,
                                                             const std::string& path) {
  const Json& single = j.contains("single") ? j["single"] : Json();
  if (!single.is_array()) return Malformed(path + ".single", "must be an array of pieces");
  const Json& specials = j.contains("special_tokens") ? j["special_tokens"] : Json::object();
  if (!specials.is_object()) return Malformed(path + ".special_tokens", "must be an object");
  std::vector<int32_t> before, after;
  bool seen_sequence = false;
  for (size_t i = 0; i < single.size(); ++i) {
    const Json& piece = single[i];
    const std::string where = absl::StrCat(path, ".single[", i, "]");
    if (piece.is_object() && piece.contains("Sequence")) {
      const Json& seq = piece["Sequence"];
      if (!seq.is_object() || !seq.contains("id") || seq["id"] != "A" || seen_sequence) {
        return Malformed(where, "a single template holds exactly one Sequence A");
      }
      seen_sequence = true;
      continue;
    }
    if (piece.is_object() && piece.contains("SpecialToken")) {
      const Json& st = piece["SpecialToken"];
      if (!st.is_object() || !st.contains("id") || !st["id"].is_string()) {
        return Malformed(where, "SpecialToken needs a string id");
      }
      const std::string name = st["id"].get<std::string>();
      if (!specials.contains(name) || !specials[name].is_object() ||
          !specials[name].contains("ids") || !specials[name]["ids"].is_array()) {
        return Malformed(where,
                         absl::StrCat("special token '", name, "' is missing from special_tokens"));
      }
      for (const Json& id : specials[name]["ids"]) {
        if (!id.is_number_integer()) return Malformed(where, "special token ids must be integers");
        (seen_sequence ? after : before).push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
      continue;
    }
    return Malformed(where, "must be {\"SpecialToken\": ...} or {\"Sequence\": ...}");
  }
  if (!seen_sequence) return Malformed(path + ".single", "has no Sequence A");
  return std::unique_ptr<PostProcessor>(new WrapProcessor(std::move(before), std::move(after)));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const Json& j, const std::string& path) {
  if (j.is_null()) return std::unique_ptr<Decoder>();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return Malformed(path, "must be null or an object with a string \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    const Json& list = j.contains("decoders") ? j["decoders"] : Json();
    if (!list.is_array()) return Malformed(path + ".decoders", "must be an array");
    std::vector<std::unique_ptr<Decoder>> parts;
    for (size_t i = 0; i < list.size(); ++i) {
      auto p = ParseDecoder(list[i], absl::StrCat(path, ".decoders[", i, "]"));
      if (!p.ok()) return p.status();
      if (*p != nullptr) parts.push_back(std::move(*p));
    }
    return std::unique_ptr<Decoder>(new SequenceDecoder(std::move(parts)));
  }
  if (type == "Replace") {
    auto re = GetPattern(j, "pattern", path);
    if (!re.ok()) return re.status();
    auto content = GetString(j, "content", path);
    if (!content.ok()) return content.status();
    return std::unique_ptr<Decoder>(new ReplaceDecoder(std::move(*re), std::move(*content)));
  }
  if (type == "ByteFallback") return std::unique_ptr<Decoder>(new ByteFallbackDecoder());
  if (type == "Fuse") return std::unique_ptr<Decoder>(new FuseDecoder());
  if (type == "Strip") {
    auto content = GetChar(j, "content", path);
    if (!content.ok()) return content.status();
    auto start = GetInt(j, "start", path, 0);
    if (!start.ok()) return start.status();
    auto stop = GetInt(j, "stop", path, 0);
    if (!stop.ok()) return stop.status();
    if (*start < 0 || *stop < 0) return Malformed(path, "start/stop must be >= 0");
    return std::unique_ptr<Decoder>(new StripDecoder(
        FirstChar(*content), static_cast<size_t>(*start), static_cast<size_t>(*stop)));
  }
  if (type == "ByteLevel") return std::unique_ptr<Decoder>(new ByteLevelDecoder());
  if (type == "Metaspace") {
    auto replacement = GetChar(j, "replacement", path);
    if (!replacement.ok()) return replacement.status();
    bool strip_first = true;
    if (j.contains("prepend_scheme") && !j["prepend_scheme"].is_null()) {
      if (!j["prepend_scheme"].is_string()) {
        return Malformed(path + ".prepend_scheme", "must be a string");
      }
      const std::string s = j["prepend_scheme"].get<std::string>();
      if (s != "always" && s != "first" && s != "never") {
        return Malformed(path + ".prepend_scheme", absl::StrCat("'", s, "' is not supported"));
      }
      strip_first = s != "never";
    } else {
      auto add = GetBool(j, "add_prefix_space", path, true);
      if (!add.ok()) return add.status();
      strip_first = *add;
    }
    return std::unique_ptr<Decoder>(new MetaspaceDecoder(FirstChar(*replacement), strip_first));
  }
  return Unsupported(path, type);
}

absl::StatusOr<std::unique_ptr<PostProcessor>> ParsePostProcessor(const Json& j,
                                                                  const std::string& path) {
  if (j.is_null()) return std::unique_ptr<PostProcessor>();
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) {
    return Malformed(path, "must be null or an object with a string \"type\"");
  }
  const std::string type = j["type"].get<std::string>();
  if (type == "TemplateProcessing") return ParseTemplate(j, path);
  if (type == "ByteLevel") return std::unique_ptr<PostProcessor>(new NoopProcessor());
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    auto cls = TokenPairId(j, "cls", path);
    if (!cls.ok()) return cls.status();
    auto sep = TokenPairId(j, "sep", path);
    if (!sep.ok()) return sep.status();
    return std::unique_ptr<PostProcessor>(
        new WrapProcessor(std::vector<int32_t>{*cls}, std::vector<int32_t>{*sep}));
  }
  if (type == "Sequence") {
    const Json& list = j.contains("processors") ? j["processors"] : Json();
    if (!list.is_array()) return Malformed(path + ".processors", "must be an array");
    std::vector<std::unique_ptr<PostProcessor>> parts;
    for (size_t i = 0; i < list.size(); ++i) {
      auto p = ParsePostProcessor(list[i], absl::StrCat(path, ".processors[", i, "]"));
      if (!p.ok()) return p.status();
      if (*p != nullptr) parts.push_back(std::move(*p));
    }
    return std::unique_ptr<PostProcessor>(new SequenceProcessor(std::move(parts)));
  }
  return Unsupported(path, type);
}

}  // namespace kvgate::engine::tok
