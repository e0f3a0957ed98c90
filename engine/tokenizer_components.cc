// JSON field helpers and the GPT-2 byte alphabet shared by the tokenizer stages.
#include "engine/tokenizer_components.h"

#include <array>

#include "absl/strings/str_cat.h"

namespace kvgate::engine::tok {

absl::Status Unsupported(std::string_view path, std::string_view type) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", AbslView(path), ".type '",
                                                 AbslView(type), "' is not supported"));
}

absl::Status Malformed(std::string_view path, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer.json: ", AbslView(path), " ", AbslView(what)));
}

absl::StatusOr<std::string> GetString(const Json& j, std::string_view key, std::string_view path) {
  const std::string k(key);
  if (!j.is_object() || !j.contains(k) || !j[k].is_string()) {
    return Malformed(absl::StrCat(AbslView(path), ".", AbslView(key)), "must be a string");
  }
  return j[k].get<std::string>();
}

absl::StatusOr<bool> GetBool(const Json& j, std::string_view key, std::string_view path,
                             std::optional<bool> dflt) {
  const std::string k(key);
  if (!j.is_object() || !j.contains(k) || j[k].is_null()) {
    if (dflt.has_value()) return *dflt;
    return Malformed(absl::StrCat(AbslView(path), ".", AbslView(key)), "is missing");
  }
  if (!j[k].is_boolean())
    return Malformed(absl::StrCat(AbslView(path), ".", AbslView(key)), "must be a boolean");
  return j[k].get<bool>();
}

absl::StatusOr<int64_t> GetInt(const Json& j, std::string_view key, std::string_view path,
                               std::optional<int64_t> dflt) {
  const std::string k(key);
  if (!j.is_object() || !j.contains(k) || j[k].is_null()) {
    if (dflt.has_value()) return *dflt;
    return Malformed(absl::StrCat(AbslView(path), ".", AbslView(key)), "is missing");
  }
  if (!j[k].is_number_integer()) {
    return Malformed(absl::StrCat(AbslView(path), ".", AbslView(key)), "must be an integer");
  }
  return j[k].get<int64_t>();
}

absl::StatusOr<std::string> GetChar(const Json& j, std::string_view key, std::string_view path) {
  auto s = GetString(j, key, path);
  if (!s.ok()) return s.status();
  const size_t bad = FindInvalidUtf8(*s);
  if (s->empty() || bad != std::string_view::npos ||
      Utf8Len(static_cast<unsigned char>((*s)[0])) != s->size()) {
    return Malformed(absl::StrCat(AbslView(path), ".", AbslView(key)),
                     "must be exactly one character");
  }
  return s;
}

absl::StatusOr<std::unique_ptr<Regex>> GetPattern(const Json& j, std::string_view key,
                                                  std::string_view path) {
  const std::string k(key);
  const std::string p = absl::StrCat(AbslView(path), ".", AbslView(key));
  if (!j.is_object() || !j.contains(k) || !j[k].is_object() || j[k].size() != 1) {
    return Malformed(p, "must be {\"String\": ...} or {\"Regex\": ...}");
  }
  const Json& pat = j[k];
  if (pat.contains("String") && pat["String"].is_string()) {
    return Regex::Compile(RegexEscape(pat["String"].get<std::string>()));
  }
  if (pat.contains("Regex") && pat["Regex"].is_string()) {
    auto re = Regex::Compile(pat["Regex"].get<std::string>());
    if (!re.ok()) return Malformed(p, std::string(re.status().message()));
    return re;
  }
  return Malformed(p, "must be {\"String\": ...} or {\"Regex\": ...}");
}

namespace {

struct ByteTables {
  std::array<std::string, 256> to_unicode;
  std::array<int, 512> from_unicode;  // all code points used are < 512
  ByteTables() {
    from_unicode.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      to_unicode[b] = EncodeUtf8(cp);
      from_unicode[cp] = b;
    }
  }
};

const ByteTables& Tables() {
  static const ByteTables* t = new ByteTables();
  return *t;
}

}  // namespace

const std::string& ByteToUnicode(uint8_t b) { return Tables().to_unicode[b]; }

int UnicodeToByte(char32_t cp) { return cp < 512 ? Tables().from_unicode[cp] : -1; }

}  // namespace kvgate::engine::tok
