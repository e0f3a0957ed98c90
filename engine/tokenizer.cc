// Loading, added-token extraction and the encode/decode pipelines of engine::Tokenizer,
// following HF tokenizers/src/tokenizer/{mod,added_vocabulary,serialization}.rs.
#include "engine/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "engine/tokenizer_components.h"

namespace kvgate::engine {
namespace tok {

struct AddedToken {
  int32_t id = -1;
  std::string content;
  // What decode hands the decoder: HF (>= 0.23) keeps the normalizer's output for
  // tokens with normalized=true, so e.g. a Prepend('▁') normalizer yields "▁<s>".
  std::string decode_form;
  bool special = false;
  bool normalized = true;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

// Leftmost-longest matcher over the added tokens' patterns (what HF builds with
// aho-corasick MatchKind::LeftmostLongest).
class TokenTrie {
 public:
  void Add(std::string_view pattern, int token_index) {
    if (pattern.empty()) return;
    if (nodes_.empty()) nodes_.push_back(-1);
    int node = 0;
    for (unsigned char c : pattern) {
      const uint64_t key = (static_cast<uint64_t>(node) << 8) | c;
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        nodes_.push_back(-1);
        it = edges_.emplace(key, static_cast<int>(nodes_.size()) - 1).first;
      }
      node = it->second;
    }
    // The first pattern wins among identical ones, as aho-corasick's pattern order.
    if (nodes_[node] < 0) nodes_[node] = token_index;
    first_byte_[static_cast<unsigned char>(pattern[0])] = true;
  }
  bool empty() const { return nodes_.empty(); }

  struct Match {
    size_t start, end;
    int token_index;
  };
  std::vector<Match> FindAll(std::string_view s) const {
    std::vector<Match> out;
    if (nodes_.empty()) return out;
    size_t i = 0;
    while (i < s.size()) {
      if (!first_byte_[static_cast<unsigned char>(s[i])]) {
        ++i;
        continue;
      }
      int node = 0;
      int best = -1;
      size_t best_end = 0;
      for (size_t k = i; k < s.size(); ++k) {
        auto it =
            edges_.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(s[k]));
        if (it == edges_.end()) break;
        node = it->second;
        if (nodes_[node] >= 0) {
          best = nodes_[node];
          best_end = k + 1;
        }
      }
      if (best >= 0) {
        out.push_back(Match{i, best_end, best});
        i = best_end;
      } else {
        ++i;
      }
    }
    return out;
  }

 private:
  std::vector<int> nodes_;  // token index ending at this node, or -1
  absl::flat_hash_map<uint64_t, int> edges_;
  bool first_byte_[256] = {};
};

struct TokenizerState {
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<BpeModel> model;
  std::unique_ptr<PostProcessor> post_processor;
  std::unique_ptr<Decoder> decoder;

  std::vector<AddedToken> added;                  // in file order
  absl::flat_hash_map<int32_t, int> added_by_id;  // id -> index into `added`
  absl::flat_hash_map<std::string, int32_t> added_by_content;
  absl::flat_hash_set<std::string> special_contents;  // HF special_tokens_set
  TokenTrie raw_trie;         // tokens with normalized=false, matched on raw text
  TokenTrie normalized_trie;  // tokens with normalized=true, matched on normalized text
  int32_t vocab_size = 0;

  // HF AddedVocabulary::find_matches + split_with_indices for one piece.
  void SplitOnAdded(const Piece& p, const TokenTrie& trie, std::vector<Piece>& out) const;
};

namespace {

// Regex `\w$` on s[..end]: the char before `end` is a word char.
bool EndsWithWord(std::string_view s, size_t end) {
  if (end == 0) return false;
  size_t start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  size_t i = start;
  return IsWordChar(DecodeUtf8(s, i));
}

bool StartsWithWord(std::string_view s, size_t begin) {
  if (begin >= s.size()) return false;
  size_t i = begin;
  return IsWordChar(DecodeUtf8(s, i));
}

// Start of the whitespace run that ends at `end` (regex `\s*$` on s[..end]).
size_t WhitespaceRunStart(std::string_view s, size_t end) {
  size_t pos = end;
  while (pos > 0) {
    size_t start = pos - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    size_t i = start;
    if (!IsUnicodeWhitespace(DecodeUtf8(s, i))) break;
    pos = start;
  }
  return pos;
}

// End of the whitespace run that starts at `begin` (regex `^\s*` on s[begin..]).
size_t WhitespaceRunEnd(std::string_view s, size_t begin) {
  size_t pos = begin;
  while (pos < s.size()) {
    size_t i = pos;
    if (!IsUnicodeWhitespace(DecodeUtf8(s, i))) break;
    pos = i;
  }
  return pos;
}

absl::StatusOr<std::unique_ptr<TokenizerState>> Load(const Json& root) {
  if (!root.is_object()) return Malformed("(root)", "must be a JSON object");
  auto state = std::make_unique<TokenizerState>();
  const auto field = [&root](const char* key) -> const Json& {
    static const Json* null_json = new Json();
    return root.contains(key) ? root[key] : *null_json;
  };

  KVGATE_ASSIGN_OR_RETURN(state->normalizer, ParseNormalizer(field("normalizer"), "normalizer"));
  KVGATE_ASSIGN_OR_RETURN(state->pre_tokenizer,
                          ParsePreTokenizer(field("pre_tokenizer"), "pre_tokenizer"));
  KVGATE_ASSIGN_OR_RETURN(state->post_processor,
                          ParsePostProcessor(field("post_processor"), "post_processor"));
  KVGATE_ASSIGN_OR_RETURN(state->decoder, ParseDecoder(field("decoder"), "decoder"));

  const Json& model = field("model");
  if (!model.is_object()) return Malformed("model", "must be an object");
  if (model.contains("type")) {
    if (!model["type"].is_string()) return Malformed("model.type", "must be a string");
    const std::string type = model["type"].get<std::string>();
    if (type != "BPE") return Unsupported("model", type);
  } else if (!model.contains("merges")) {
    return Malformed("model", "has no type and is not a BPE model (no merges)");
  }
  KVGATE_ASSIGN_OR_RETURN(state->model, BpeModel::Parse(model, "model"));
  state->vocab_size = state->model->max_id() + 1;

  const Json& added = field("added_tokens");
  if (!added.is_null() && !added.is_array()) return Malformed("added_tokens", "must be an array");
  if (added.is_array()) {
    int32_t next_id = state->model->vocab_count();
    for (size_t i = 0; i < added.size(); ++i) {
      const std::string path = absl::StrCat("added_tokens[", i, "]");
      const Json& t = added[i];
      if (!t.is_object()) return Malformed(path, "must be an object");
      AddedToken tok;
      // The id must be present, but HF does not use it (see below).
      KVGATE_RETURN_IF_ERROR(GetInt(t, "id", path, std::nullopt).status());
      KVGATE_ASSIGN_OR_RETURN(tok.content, GetString(t, "content", path));
      KVGATE_ASSIGN_OR_RETURN(tok.special, GetBool(t, "special", path, false));
      KVGATE_ASSIGN_OR_RETURN(tok.normalized, GetBool(t, "normalized", path, !tok.special));
      KVGATE_ASSIGN_OR_RETURN(tok.lstrip, GetBool(t, "lstrip", path, false));
      KVGATE_ASSIGN_OR_RETURN(tok.rstrip, GetBool(t, "rstrip", path, false));
      KVGATE_ASSIGN_OR_RETURN(tok.single_word, GetBool(t, "single_word", path, false));
      if (tok.content.empty()) continue;  // HF ignores empty added tokens
      if (FindInvalidUtf8(tok.content) != std::string_view::npos) {
        return Malformed(path + ".content", "is not valid UTF-8");
      }
      // HF ignores the file's id (it only warns): an existing added/model token keeps
      // its id, a new one takes the next free id after the model vocab.
      if (auto it = state->added_by_content.find(tok.content);
          it != state->added_by_content.end()) {
        tok.id = it->second;
      } else if (auto mid = state->model->TokenToId(tok.content); mid.has_value()) {
        tok.id = *mid;
      } else {
        tok.id = next_id++;
      }
      tok.decode_form = tok.content;
      if (tok.normalized && state->normalizer != nullptr) {
        std::string normed = tok.content;
        KVGATE_RETURN_IF_ERROR(state->normalizer->Normalize(normed));
        tok.decode_form = normed;
      }
      if (tok.special) state->special_contents.insert(tok.content);
      state->added_by_content[tok.content] = tok.id;
      state->added.push_back(tok);
      state->added_by_id[tok.id] = static_cast<int>(state->added.size()) - 1;
      state->vocab_size = std::max(state->vocab_size, tok.id + 1);
    }
  }
  // Patterns go in HF's order (special tokens first), pointing at the entry that
  // finally owns each id.
  for (int pass = 0; pass < 2; ++pass) {
    for (const AddedToken& t : state->added) {
      if (t.special != (pass == 0)) continue;
      const int index = state->added_by_id.at(t.id);
      if (t.normalized) {
        state->normalized_trie.Add(t.decode_form, index);
      } else {
        state->raw_trie.Add(t.content, index);
      }
    }
  }
  return state;
}

}  // namespace

void TokenizerState::SplitOnAdded(const Piece& p, const TokenTrie& trie,
                                  std::vector<Piece>& out) const {
  const std::string& s = p.text;
  const auto emit = [&](size_t b, size_t e, int32_t id) {
    if (e <= b) return;  // HF drops empty pieces
    out.push_back(Piece{s.substr(b, e - b), p.orig_start + b, id});
  };
  size_t start_offset = 0;
  for (const TokenTrie::Match& m : trie.FindAll(s)) {
    const AddedToken& t = added[m.token_index];
    size_t start = m.start, stop = m.end;
    if (t.single_word) {
      const bool start_space = start == 0 || !EndsWithWord(s, start);
      const bool stop_space = stop == s.size() || !StartsWithWord(s, stop);
      if (!start_space || !stop_space) continue;
    }
    if (t.lstrip) start = std::max(WhitespaceRunStart(s, start), start_offset);
    if (t.rstrip) stop = WhitespaceRunEnd(s, stop);
    if (start_offset < start) emit(start_offset, start, -1);
    emit(start, stop, t.id);
    start_offset = stop;
  }
  if (start_offset < s.size()) emit(start_offset, s.size(), -1);
}

}  // namespace tok

using tok::Json;

Tokenizer::Tokenizer(std::unique_ptr<tok::TokenizerState> state) : state_(std::move(state)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file '", path, "'"));
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("cannot read tokenizer file '", path, "'"));
  auto t = FromJson(buf.str());
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat(path, ": ", t.status().message()));
  }
  return t;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json_text) {
  // nlohmann throws on parse errors and on mistyped access; nothing may escape.
  try {
    Json root = Json::parse(json_text.begin(), json_text.end());
    auto state = tok::Load(root);
    if (!state.ok()) return state.status();
    return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(*state)));
  } catch (const Json::parse_error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("tokenizer.json is not valid JSON (byte ", e.byte, "): ", e.what()));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json is malformed: ", e.what()));
  }
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text,
                                                       bool add_special_tokens) const {
  const tok::TokenizerState& st = *state_;
  if (const size_t bad = tok::FindInvalidUtf8(text); bad != std::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("Encode: input is not valid UTF-8 at byte offset ", bad));
  }
  // 1. Added tokens with normalized=false are cut out of the raw text.
  std::vector<tok::Piece> pieces;
  tok::Piece whole{std::string(text), 0, -1};
  if (st.raw_trie.empty()) {
    if (!whole.text.empty()) pieces.push_back(std::move(whole));
  } else {
    st.SplitOnAdded(whole, st.raw_trie, pieces);
  }
  // 2. The rest is normalized, then added tokens with normalized=true are cut out.
  std::vector<tok::Piece> normalized;
  normalized.reserve(pieces.size());
  for (tok::Piece& p : pieces) {
    if (p.id >= 0) {
      normalized.push_back(std::move(p));
      continue;
    }
    if (st.normalizer != nullptr) KVGATE_RETURN_IF_ERROR(st.normalizer->Normalize(p.text));
    if (st.normalized_trie.empty()) {
      if (!p.text.empty()) normalized.push_back(std::move(p));
    } else {
      st.SplitOnAdded(p, st.normalized_trie, normalized);
    }
  }
  // 3. Pre-tokenize, 4. run the model on every pre-token.
  if (st.pre_tokenizer != nullptr)
    KVGATE_RETURN_IF_ERROR(st.pre_tokenizer->PreTokenize(normalized));
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 8);
  for (const tok::Piece& p : normalized) {
    if (p.id >= 0) {
      ids.push_back(p.id);
    } else {
      KVGATE_RETURN_IF_ERROR(st.model->Tokenize(p.text, ids));
    }
  }
  // 5. Post-process (BOS/EOS) only when asked, as HF.
  if (add_special_tokens && st.post_processor != nullptr) st.post_processor->Process(ids);
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(absl::Span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  const tok::TokenizerState& st = *state_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int32_t id = ids[i];
    if (id < 0 || id >= st.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("Decode: id ", id, " at position ", i,
                                                     " is outside [0, ", st.vocab_size, ")"));
    }
    const std::string* token = nullptr;
    if (auto it = st.added_by_id.find(id); it != st.added_by_id.end()) {
      token = &st.added[it->second].decode_form;
    } else {
      token = st.model->IdToToken(id);
    }
    if (token == nullptr) continue;  // a hole in the vocab: HF drops it too
    if (skip_special_tokens && st.special_contents.contains(*token)) continue;
    tokens.push_back(*token);
  }
  if (st.decoder == nullptr) return absl::StrJoin(tokens, " ");
  KVGATE_RETURN_IF_ERROR(st.decoder->DecodeChain(tokens));
  return absl::StrJoin(tokens, "");
}

int32_t Tokenizer::vocab_size() const { return state_->vocab_size; }

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto it = state_->added_by_content.find(tok::AbslView(token));
      it != state_->added_by_content.end()) {
    return it->second;
  }
  return state_->model->TokenToId(token);
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (auto it = state_->added_by_id.find(id); it != state_->added_by_id.end()) {
    return state_->added[it->second].content;
  }
  const std::string* t = state_->model->IdToToken(id);
  if (t == nullptr) return std::nullopt;
  return *t;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  auto it = state_->added_by_id.find(id);
  return it != state_->added_by_id.end() && state_->added[it->second].special;
}

std::vector<int32_t> Tokenizer::SpecialIds() const {
  std::vector<int32_t> out;
  for (const auto& [id, index] : state_->added_by_id) {
    if (state_->added[index].special) out.push_back(id);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace kvgate::engine
