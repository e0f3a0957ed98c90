#include "engine/tokenizer_util.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <cctype>

#include "absl/strings/str_cat.h"

namespace kvgate::engine::tok {
namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 with `bad_len` set to the length
// of the maximal invalid subpart (the unit Rust's from_utf8_lossy replaces).
size_t ValidSeqLen(std::string_view s, size_t i, size_t& bad_len) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  const size_t n = s.size();
  bad_len = 1;
  if (c < 0x80) return 1;
  const auto cont = [&](size_t k) { return k < n && (b(k) & 0xC0) == 0x80; };
  if (c >= 0xC2 && c <= 0xDF) return cont(i + 1) ? 2 : 0;
  if (c >= 0xE0 && c <= 0xEF) {
    if (i + 1 >= n) return 0;
    const unsigned char d = b(i + 1);
    const bool ok = (c == 0xE0 && d >= 0xA0 && d <= 0xBF) ||
                    (c >= 0xE1 && c <= 0xEC && d >= 0x80 && d <= 0xBF) ||
                    (c == 0xED && d >= 0x80 && d <= 0x9F) ||
                    (c >= 0xEE && c <= 0xEF && d >= 0x80 && d <= 0xBF);
    if (!ok) return 0;
    bad_len = 2;
    return cont(i + 2) ? 3 : 0;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (i + 1 >= n) return 0;
    const unsigned char d = b(i + 1);
    const bool ok = (c == 0xF0 && d >= 0x90 && d <= 0xBF) ||
                    (c >= 0xF1 && c <= 0xF3 && d >= 0x80 && d <= 0xBF) ||
                    (c == 0xF4 && d >= 0x80 && d <= 0x8F);
    if (!ok) return 0;
    bad_len = 2;
    if (!cont(i + 2)) return 0;
    bad_len = 3;
    return cont(i + 3) ? 4 : 0;
  }
  return 0;
}

pcre2_code* Code(void* p) { return static_cast<pcre2_code*>(p); }

std::string PcreError(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return std::string(reinterpret_cast<const char*>(buf));
}

}  // namespace

size_t FindInvalidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t bad = 0;
    const size_t len = ValidSeqLen(s, i, bad);
    if (len == 0) return i;
    i += len;
  }
  return std::string_view::npos;
}

char32_t DecodeUtf8(std::string_view s, size_t& i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  const size_t len = Utf8Len(c);
  char32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < len && i + k < s.size(); ++k) {
    cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  }
  i += len;
  return cp;
}

void AppendUtf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::string EncodeUtf8(char32_t cp) {
  std::string s;
  AppendUtf8(cp, s);
  return s;
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t i = 0;
  while (i < bytes.size()) {
    size_t bad = 0;
    const size_t len = ValidSeqLen(bytes, i, bad);
    if (len == 0) {
      out += "\xEF\xBF\xBD";
      i += bad;
    } else {
      out.append(bytes.substr(i, len));
      i += len;
    }
  }
  return out;
}

bool IsUnicodeWhitespace(char32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

bool IsWordChar(char32_t cp) {
  if (cp < 0x80) {
    return (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') ||
           cp == '_';
  }
  if (cp == 0x200C || cp == 0x200D) return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_PC:
      return true;
    case UTF8PROC_CATEGORY_CN: {
      // utf8proc's tables are older than Rust's; fall back to the newer data.
      for (size_t i = 0; i < kNumUnicodeAdditions; ++i) {
        const UnicodeAddition& a = kUnicodeAdditions[i];
        if (cp >= a.first && cp <= a.last) {
          const char major = a.category[0];
          const std::string_view cat = a.category;
          return major == 'L' || major == 'M' || cat == "Nd" || cat == "Nl" || cat == "Pc";
        }
      }
      return false;
    }
    default:
      return false;
  }
}

bool IsNewSinceUnicode9(char32_t cp) {
  if (cp < 0x560) return false;
  // Binary search in the sorted, disjoint ranges.
  size_t lo = 0, hi = kNumNewSinceUnicode9;
  while (lo < hi) {
    const size_t mid = (lo + hi) / 2;
    if (kNewSinceUnicode9[mid].last < cp) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  if (lo < kNumNewSinceUnicode9 && kNewSinceUnicode9[lo].first <= cp) return true;
  for (size_t i = 0; i < kNumUnicodeAdditions; ++i) {
    if (cp >= kUnicodeAdditions[i].first && cp <= kUnicodeAdditions[i].last) return true;
  }
  return false;
}

char32_t ToLowerSimple(char32_t cp) {
  for (size_t i = 0; i < kNumLowercaseAdditions; ++i) {
    const LowercaseAddition& a = kLowercaseAdditions[i];
    if (cp >= a.first && cp <= a.last) return static_cast<char32_t>(cp + a.delta);
  }
  return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp)));
}

std::string RegexEscape(std::string_view literal) {
  std::string out;
  out.reserve(literal.size() * 2);
  for (char c : literal) {
    const unsigned char u = static_cast<unsigned char>(c);
    // PCRE2 treats a backslash before any non-alphanumeric ASCII char as that char.
    if (u < 0x80 && !std::isalnum(u) && c != '_') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

namespace {

// Class body for general category `name` ("L", "Nd", ...): PCRE2's own property
// plus the code points its Unicode 14 tables leave unassigned.
std::string PropertyBody(std::string_view name) {
  std::string out = absl::StrCat("\\p{", AbslView(name), "}");
  for (size_t i = 0; i < kNumUnicodeAdditions; ++i) {
    const UnicodeAddition& a = kUnicodeAdditions[i];
    const bool hit = name.size() == 1 ? a.category[0] == name[0] : name == a.category;
    if (hit) absl::StrAppend(&out, "\\x{", absl::Hex(a.first), "}-\\x{", absl::Hex(a.last), "}");
  }
  return out;
}

// Rewrites `pattern` so PCRE2 (UTF + UCP) matches as HF's Oniguruma does:
//  - \s / \S: Unicode White_Space (PCRE2 also counts U+180E);
//  - \w / \W: letters, marks, numbers and connector punctuation (PCRE2 drops marks);
//  - \h / \H: hex digits (Ruby syntax; in PCRE2 it means horizontal space);
//  - \p{X}: general categories at Unicode 17 (Oniguruma's tables are newer).
// Negated forms inside a character class have no spelled-out equivalent and are left
// to PCRE2.
std::string OnigCompatible(std::string_view pattern) {
  static const std::string* const kSpaces = new std::string(
      "\\x{09}-\\x{0D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
      "\\x{202F}\\x{205F}\\x{3000}");
  static const std::string* const kWord = new std::string(
      absl::StrCat(PropertyBody("L"), PropertyBody("M"), PropertyBody("N"), PropertyBody("Pc")));
  static const std::string* const kDigit = new std::string(PropertyBody("Nd"));
  static const std::string* const kHex = new std::string("0-9a-fA-F");
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  size_t class_start = 0;  // index just past '[' or '[^' of the open class
  const auto emit = [&](const std::string& body, bool negated, std::string_view original) {
    if (in_class) {
      if (negated) {
        out.append(original);
      } else {
        out += body;
      }
    } else {
      absl::StrAppend(&out, negated ? "[^" : "[", body, "]");
    }
  };
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char n = pattern[i + 1];
      if (n == 'Q') {  // \Q...\E is literal text: copy it untouched
        const size_t end = pattern.find("\\E", i + 2);
        const size_t stop = end == std::string_view::npos ? pattern.size() : end + 2;
        out.append(pattern.substr(i, stop - i));
        i = stop - 1;
        continue;
      }
      const std::string_view two = pattern.substr(i, 2);
      switch (n) {
        case 's':
        case 'S':
          emit(*kSpaces, n == 'S', two);
          ++i;
          continue;
        case 'w':
        case 'W':
          emit(*kWord, n == 'W', two);
          ++i;
          continue;
        case 'd':
        case 'D':
          emit(*kDigit, n == 'D', two);
          ++i;
          continue;
        case 'h':
        case 'H':
          emit(*kHex, n == 'H', two);
          ++i;
          continue;
        default:
          break;
      }
      if (n == 'p' || n == 'P') {
        std::string_view name;
        size_t end = i + 2;  // one past the escape
        bool negated = n == 'P';
        if (end < pattern.size() && pattern[end] == '{') {
          const size_t close = pattern.find('}', end);
          if (close != std::string_view::npos) {
            name = pattern.substr(end + 1, close - end - 1);
            end = close + 1;
          }
        } else if (end < pattern.size()) {
          name = pattern.substr(end, 1);
          end += 1;
        }
        if (!name.empty() && name[0] == '^') {
          negated = !negated;
          name.remove_prefix(1);
        }
        const bool general_category =
            !name.empty() && name.size() <= 2 &&
            std::string_view("LMNPSZ").find(name[0]) != std::string_view::npos &&
            (name.size() == 1 || std::islower(static_cast<unsigned char>(name[1])));
        if (general_category) {
          emit(PropertyBody(name), negated, pattern.substr(i, end - i));
          i = end - 1;
          continue;
        }
      }
      out.push_back(c);
      out.push_back(n);
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') {
        out.push_back('^');
        ++i;
      }
      class_start = out.size();
      continue;
    }
    if (in_class && c == '[' && i + 1 < pattern.size() && pattern[i + 1] == ':') {
      const size_t end = pattern.find(":]", i + 2);  // POSIX class like [:alpha:]
      if (end != std::string_view::npos) {
        out.append(pattern.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']' && out.size() != class_start) in_class = false;
    out.push_back(c);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Regex>> Regex::Compile(std::string_view pattern) {
  int err = 0;
  PCRE2_SIZE err_off = 0;
  const std::string rewritten = OnigCompatible(pattern);
  // MULTILINE: Oniguruma's Ruby syntax (what HF uses) makes ^/$ line anchors.
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &err, &err_off, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "regex '", AbslView(pattern), "' does not compile at ", err_off, ": ", PcreError(err)));
  }
  std::unique_ptr<Regex> re(new Regex());
  re->pattern_ = std::string(pattern);
  re->code_ = code;
  re->jit_ = pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  return re;
}

Regex::~Regex() {
  if (code_ != nullptr) pcre2_code_free(Code(code_));
}

absl::Status Regex::FindAll(std::string_view text, std::vector<ByteRange>& out) const {
  out.clear();
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(Code(code_), nullptr);
  if (md == nullptr) return absl::ResourceExhaustedError("pcre2 match data allocation failed");
  // Text was validated once by the caller; skip PCRE2's per-call UTF check, which
  // would otherwise make the scan quadratic.
  const uint32_t base_opts = PCRE2_NO_UTF_CHECK;
  bool use_jit = jit_;
  const auto subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t search_from = 0;
  bool have_last = false;
  size_t last_end = 0;
  absl::Status status;
  while (search_from <= text.size()) {
    int rc = use_jit ? pcre2_jit_match(Code(code_), subject, text.size(), search_from, base_opts,
                                       md, nullptr)
                     : pcre2_match(Code(code_), subject, text.size(), search_from,
                                   base_opts | PCRE2_NO_JIT, md, nullptr);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && use_jit) {
      // The default JIT stack is small; the interpreter keeps its frames on the heap.
      use_jit = false;
      continue;
    }
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      status = absl::InternalError(absl::StrCat("regex '", pattern_, "' failed: ", PcreError(rc)));
      break;
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t s = ov[0], e = ov[1];
    if (s == e && have_last && last_end == e) {
      // onig find_iter: no empty match right after the previous match; step one char.
      if (search_from >= text.size()) break;
      search_from += Utf8Len(static_cast<unsigned char>(text[search_from]));
      continue;
    }
    out.push_back({s, e});
    have_last = true;
    last_end = e;
    search_from = e;
  }
  pcre2_match_data_free(md);
  return status;
}

absl::Status FindMatches(const Regex& re, std::string_view text, bool invert,
                         std::vector<std::pair<ByteRange, bool>>& out) {
  out.clear();
  if (text.empty()) {
    out.push_back({{0, 0}, invert});
    return absl::OkStatus();
  }
  std::vector<ByteRange> matches;
  if (absl::Status s = re.FindAll(text, matches); !s.ok()) return s;
  size_t prev = 0;
  for (const auto& [s, e] : matches) {
    if (prev != s) out.push_back({{prev, s}, invert});
    out.push_back({{s, e}, !invert});
    prev = e;
  }
  if (prev != text.size()) out.push_back({{prev, text.size()}, invert});
  return absl::OkStatus();
}

}  // namespace kvgate::engine::tok
