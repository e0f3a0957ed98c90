// The BPE model of tokenizer.json (HF tokenizers/src/models/bpe/{model,word}.rs).
#include <queue>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/tokenizer_components.h"

namespace kvgate::engine::tok {
namespace {

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

absl::StatusOr<std::optional<std::string>> OptionalString(const Json& j, const char* key,
                                                          const std::string& path) {
  if (!j.contains(key) || j[key].is_null()) return std::optional<std::string>();
  if (!j[key].is_string()) return Malformed(path + "." + key, "must be a string or null");
  return std::optional<std::string>(j[key].get<std::string>());
}

struct Symbol {
  int32_t id;
  int32_t prev;
  int32_t next;
  size_t len;  // bytes covered; 0 marks a symbol merged into its left neighbour
};

struct Merge {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
};

// Min-heap on (rank, pos): the lowest-ranked merge first, leftmost on ties.
struct MergeAfter {
  bool operator()(const Merge& a, const Merge& b) const {
    if (a.rank != b.rank) return a.rank > b.rank;
    return a.pos > b.pos;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Parse(const Json& j, const std::string& path) {
  std::unique_ptr<BpeModel> m(new BpeModel());
  if (j.contains("dropout") && !j["dropout"].is_null()) {
    if (!j["dropout"].is_number() || j["dropout"].get<double>() != 0.0) {
      return Malformed(path + ".dropout", "must be null or 0 (dropout is not deterministic)");
    }
  }
  if (!j.contains("vocab") || !j["vocab"].is_object()) {
    return Malformed(path + ".vocab", "must be an object of token -> id");
  }
  int32_t max_id = -1;
  for (const auto& [token, id] : j["vocab"].items()) {
    // Ids index a dense table; 2^26 is far beyond any real vocabulary.
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (1 << 26)) {
      return Malformed(absl::StrCat(path, ".vocab[\"", token, "\"]"),
                       "must be an integer id in [0, 2^26)");
    }
    const int32_t v = static_cast<int32_t>(id.get<int64_t>());
    m->vocab_[token] = v;
    max_id = std::max(max_id, v);
  }
  m->vocab_r_.resize(static_cast<size_t>(max_id + 1));
  for (const auto& [token, id] : m->vocab_) m->vocab_r_[id] = token;

  auto unk = OptionalString(j, "unk_token", path);
  if (!unk.ok()) return unk.status();
  m->unk_token_ = std::move(*unk);
  auto prefix = OptionalString(j, "continuing_subword_prefix", path);
  if (!prefix.ok()) return prefix.status();
  m->prefix_ = std::move(*prefix);
  auto suffix = OptionalString(j, "end_of_word_suffix", path);
  if (!suffix.ok()) return suffix.status();
  m->suffix_ = std::move(*suffix);
  for (auto [key, field] :
       {std::pair{"fuse_unk", &m->fuse_unk_}, std::pair{"byte_fallback", &m->byte_fallback_},
        std::pair{"ignore_merges", &m->ignore_merges_}}) {
    auto v = GetBool(j, key, path, false);
    if (!v.ok()) return v.status();
    *field = *v;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = m->vocab_.find(absl::StrFormat("<0x%02X>", b));
    m->byte_ids_[b] = it == m->vocab_.end() ? -1 : it->second;
  }

  if (!j.contains("merges") || !j["merges"].is_array()) {
    return Malformed(path + ".merges", "must be an array");
  }
  const size_t prefix_len = m->prefix_.has_value() ? m->prefix_->size() : 0;
  int32_t rank = 0;
  const Json& merges = j["merges"];
  for (size_t i = 0; i < merges.size(); ++i) {
    const Json& e = merges[i];
    const std::string where = absl::StrCat(path, ".merges[", i, "]");
    std::string a, b;
    if (e.is_string()) {
      const std::string line = e.get<std::string>();
      if (line.rfind("#version", 0) == 0) continue;
      const size_t sp = line.find(' ');
      if (sp == std::string::npos || line.find(' ', sp + 1) != std::string::npos) {
        return Malformed(where, "must be two tokens separated by one space");
      }
      a = line.substr(0, sp);
      b = line.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      return Malformed(where, "must be \"a b\" or [\"a\", \"b\"]");
    }
    auto ia = m->vocab_.find(a);
    auto ib = m->vocab_.find(b);
    if (ia == m->vocab_.end() || ib == m->vocab_.end()) {
      return Malformed(where, absl::StrCat("names token '", ia == m->vocab_.end() ? a : b,
                                           "' that is not in the vocab"));
    }
    if (b.size() < prefix_len) {
      return Malformed(where, "right token is shorter than continuing_subword_prefix");
    }
    const std::string merged = a + b.substr(prefix_len);
    auto im = m->vocab_.find(merged);
    if (im == m->vocab_.end()) {
      return Malformed(where, absl::StrCat("merged token '", merged, "' is not in the vocab"));
    }
    // Later duplicates replace earlier ones, as a Rust HashMap collect does.
    m->merges_[PairKey(ia->second, ib->second)] = {rank, im->second};
    ++rank;
  }
  // An unk_token missing from the vocab is only an error once a char needs it (HF).
  return m;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(AbslView(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= vocab_r_.size() || !vocab_r_[id].has_value()) {
    return nullptr;
  }
  return &*vocab_r_[id];
}

absl::Status BpeModel::Tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return absl::OkStatus();
  if (ignore_merges_) {
    if (auto it = vocab_.find(AbslView(word)); it != vocab_.end()) {
      out.push_back(it->second);
      return absl::OkStatus();
    }
  }
  return MergeWord(word, out);
}

absl::Status BpeModel::MergeWord(std::string_view w, std::vector<int32_t>& out) const {
  std::vector<Symbol> symbols;
  symbols.reserve(w.size());
  const auto add = [&symbols](int32_t id, size_t len) {
    const int32_t n = static_cast<int32_t>(symbols.size());
    if (n > 0) symbols.back().next = n;
    symbols.push_back(Symbol{id, n - 1, -1, len});
  };
  // A pending run of unknown chars (id, bytes), emitted when a known char comes. Plain
  // fields rather than std::optional keep GCC's maybe-uninitialized check quiet.
  bool has_unk = false;
  int32_t unk_tok = 0;
  size_t unk_len = 0;
  const auto unk_id = [this]() -> absl::StatusOr<int32_t> {
    auto it = vocab_.find(*unk_token_);
    if (it == vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer.json: model.unk_token '", *unk_token_, "' is not in the vocab"));
    }
    return it->second;
  };
  std::string s;
  size_t i = 0;
  while (i < w.size()) {
    const size_t len = Utf8Len(static_cast<unsigned char>(w[i]));
    const bool is_first = i == 0;
    const bool is_last = i + len >= w.size();
    s.clear();
    if (!is_first && prefix_.has_value()) s += *prefix_;
    s.append(w.substr(i, len));
    if (is_last && suffix_.has_value()) s += *suffix_;
    i += len;

    if (auto it = vocab_.find(s); it != vocab_.end()) {
      if (has_unk) {
        add(unk_tok, unk_len);
        has_unk = false;
      }
      add(it->second, len);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : s) all = all && byte_ids_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        // HF leaves a pending unk run in place here, so it lands after these bytes.
        for (char c : s) add(byte_ids_[static_cast<uint8_t>(c)], 1);
        continue;
      }
    }
    if (unk_token_.has_value()) {
      if (has_unk && fuse_unk_) {
        unk_len += len;
      } else {
        if (has_unk) add(unk_tok, unk_len);
        auto id = unk_id();
        if (!id.ok()) return id.status();
        has_unk = true;
        unk_tok = *id;
        unk_len = len;
      }
    }
  }
  if (has_unk) add(unk_tok, unk_len);

  // word.rs merge_all: repeatedly apply the lowest-ranked merge present, leftmost
  // first, through a heap of candidate pairs; stale entries are detected on pop.
  std::priority_queue<Merge, std::vector<Merge>, MergeAfter> queue;
  const auto lookup = [this](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    auto it = merges_.find(PairKey(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (size_t k = 0; k + 1 < symbols.size(); ++k) {
    if (const auto* m = lookup(symbols[k].id, symbols[k + 1].id)) {
      queue.push(Merge{m->first, static_cast<int32_t>(k), m->second});
    }
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& cur = symbols[top.pos];
    if (cur.len == 0 || cur.next == -1) continue;
    const int32_t next_pos = cur.next;
    const Symbol right = symbols[next_pos];
    const auto* m = lookup(cur.id, right.id);
    if (m == nullptr || m->second != top.new_id) continue;  // expired entry

    cur.id = top.new_id;
    cur.len += right.len;
    cur.next = right.next;
    symbols[next_pos].len = 0;
    if (right.next > -1 && static_cast<size_t>(right.next) < symbols.size()) {
      symbols[right.next].prev = top.pos;
    }
    if (cur.prev >= 0) {
      if (const auto* pm = lookup(symbols[cur.prev].id, cur.id)) {
        queue.push(Merge{pm->first, cur.prev, pm->second});
      }
    }
    if (cur.next >= 0 && static_cast<size_t>(cur.next) < symbols.size()) {
      if (const auto* nm = lookup(cur.id, symbols[cur.next].id)) {
        queue.push(Merge{nm->first, top.pos, nm->second});
      }
    }
  }
  for (const Symbol& sym : symbols) {
    if (sym.len != 0) out.push_back(sym.id);
  }
  return absl::OkStatus();
}

}  // namespace kvgate::engine::tok
