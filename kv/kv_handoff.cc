#include "kv/kv_handoff.h"

#include <array>
#include <bit>
#include <cstring>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::kv {
namespace {

static_assert(std::endian::native == std::endian::little,
              "the transfer wire format is little-endian; a big-endian host needs byte swaps here");

template <typename T>
void Append(const std::vector<T>& values, char** out) {
  const size_t bytes = values.size() * sizeof(T);
  if (bytes > 0) std::memcpy(*out, values.data(), bytes);
  *out += bytes;
}

template <typename T>
void Take(size_t count, const char** in, std::vector<T>* values) {
  values->resize(count);
  if (count > 0) std::memcpy(values->data(), *in, count * sizeof(T));
  *in += count * sizeof(T);
}

int64_t BitmaskBytes(int32_t next_pos) { return (int64_t{next_pos} + 7) / 8; }

// Positions are strictly ascending within [0, next_pos) (Validate).
void AppendPositions(const std::vector<int32_t>& positions, int32_t next_pos, char** out) {
  if (!PositionsAsBitmask(static_cast<int64_t>(positions.size()), next_pos)) {
    Append(positions, out);
    return;
  }
  auto* bits = reinterpret_cast<uint8_t*>(*out);
  const size_t n = positions.size();
  std::memset(bits, 0, static_cast<size_t>(BitmaskBytes(next_pos)));
  if (positions.front() == 0 && positions.back() == static_cast<int32_t>(n) - 1) {
    // Ascending and distinct, so exactly 0..n-1: a head that kept its whole prompt.
    std::memset(bits, 0xFF, n / 8);
    if (n % 8 != 0) bits[n / 8] = static_cast<uint8_t>((1u << (n % 8)) - 1);
  } else {
    for (const int32_t p : positions) bits[p >> 3] |= static_cast<uint8_t>(1u << (p & 7));
  }
  *out += BitmaskBytes(next_pos);
}

// Whether `bits` (of `bytes` bytes) holds exactly bits 0..count-1.
bool IsPrefixMask(const uint8_t* bits, int64_t bytes, size_t count) {
  const size_t full = count / 8;
  if (static_cast<int64_t>(full) > bytes) return false;
  for (size_t b = 0; b < full; ++b) {
    if (bits[b] != 0xFF) return false;
  }
  size_t at = full;
  if (count % 8 != 0) {
    if (static_cast<int64_t>(at) >= bytes || bits[at] != static_cast<uint8_t>((1u << (count % 8)) - 1)) return false;
    ++at;
  }
  for (; static_cast<int64_t>(at) < bytes; ++at) {
    if (bits[at] != 0) return false;
  }
  return true;
}

absl::Status TakePositions(size_t count, int32_t next_pos, const char** in, std::vector<int32_t>* positions) {
  if (!PositionsAsBitmask(static_cast<int64_t>(count), next_pos)) {
    Take(count, in, positions);
    return absl::OkStatus();
  }
  const auto* bits = reinterpret_cast<const uint8_t*>(*in);
  const int64_t bytes = BitmaskBytes(next_pos);
  *in += bytes;
  if (static_cast<int64_t>(count) <= next_pos && IsPrefixMask(bits, bytes, count)) {
    positions->resize(count);
    std::iota(positions->begin(), positions->end(), 0);
    return absl::OkStatus();
  }
  positions->clear();
  positions->reserve(count);
  for (int64_t b = 0; b < bytes; ++b) {
    for (uint32_t byte = bits[b]; byte != 0; byte &= byte - 1) {
      const int64_t p = b * 8 + std::countr_zero(byte);
      if (p >= next_pos || positions->size() == count) {
        return absl::InvalidArgumentError(absl::StrCat("a positions bitmask with more than its ", count,
                                                       " rows, or a bit at or past next_pos ", next_pos));
      }
      positions->push_back(static_cast<int32_t>(p));
    }
  }
  if (positions->size() != count) {
    return absl::InvalidArgumentError(
        absl::StrCat("a positions bitmask of ", positions->size(), " rows where the header has ", count));
  }
  return absl::OkStatus();
}

}  // namespace

bool PositionsAsBitmask(int64_t rows, int32_t next_pos) {
  return BitmaskBytes(next_pos) < rows * int64_t{sizeof(int32_t)};
}

int64_t HeadPayloadBytes(int64_t rows, int32_t next_pos, int32_t head_dim, bool has_query_masks, bool has_scores,
                         bool with_kv) {
  const int64_t positions = PositionsAsBitmask(rows, next_pos) ? BitmaskBytes(next_pos) : rows * int64_t{sizeof(int32_t)};
  return positions + rows * ((with_kv ? 2 * int64_t{head_dim} * int64_t{sizeof(float)} : 0) +
                             (has_query_masks ? 1 : 0) + (has_scores ? int64_t{sizeof(float)} : 0));
}

void CarryDecodeEviction(const gates::DecodeEvictor* evictor, KvHandoff* handoff) {
  handoff->eviction_policy = evictor != nullptr ? std::string(evictor->policy()) : std::string();
  handoff->eviction_state = evictor != nullptr ? evictor->SaveState() : std::string();
}

std::vector<int32_t> KvHandoff::Lengths() const {
  std::vector<int32_t> lengths;
  lengths.reserve(heads.size());
  for (const HeadRows& head : heads) lengths.push_back(static_cast<int32_t>(head.positions.size()));
  return lengths;
}

int64_t KvHandoff::LayerPayloadBytes(int32_t layer) const {
  int64_t bytes = 0;
  for (int32_t h = 0; h < num_kv_heads; ++h) {
    bytes += HeadPayloadBytes(static_cast<int64_t>(at(layer, h).positions.size()), next_pos, head_dim,
                              has_query_masks, has_scores, /*with_kv=*/backend_rows == nullptr);
  }
  return bytes;
}

int64_t KvHandoff::HeldBytes() const {
  int64_t bytes = PayloadBytes();
  if (backend_rows != nullptr) bytes += static_cast<int64_t>(backend_rows->k.bytes() + backend_rows->v.bytes());
  return bytes;
}

int64_t KvHandoff::PayloadBytes() const {
  int64_t bytes = 0;
  for (int32_t l = 0; l < num_layers; ++l) bytes += LayerPayloadBytes(l);
  return bytes;
}

absl::Status KvHandoff::Validate() const {
  const std::string what = absl::StrCat("kv handoff ", transfer_id, ": ");
  if (num_layers <= 0 || num_kv_heads <= 0 || head_dim <= 0 || next_pos < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, num_layers, " layers x ", num_kv_heads, " kv heads x ",
                                                   head_dim, " head_dim, next_pos ", next_pos));
  }
  if (static_cast<int64_t>(heads.size()) != int64_t{num_layers} * num_kv_heads) {
    return absl::InvalidArgumentError(absl::StrCat(what, heads.size(), " heads for ", num_layers, " layers x ",
                                                   num_kv_heads, " kv heads"));
  }
  for (int32_t l = 0; l < num_layers; ++l) {
    for (int32_t h = 0; h < num_kv_heads; ++h) {
      const HeadRows& head = at(l, h);
      const std::string where = absl::StrCat(what, "layer ", l, " kv head ", h, ": ");
      const size_t n = head.positions.size();
      const size_t floats = backend_rows != nullptr ? 0 : n * static_cast<size_t>(head_dim);
      if (head.k.size() != floats || head.v.size() != floats) {
        return absl::InvalidArgumentError(absl::StrCat(where, head.k.size(), " K and ", head.v.size(),
                                                       " V floats for ", n, " rows of ", head_dim));
      }
      if (head.query_mask.size() != (has_query_masks ? n : 0)) {
        return absl::InvalidArgumentError(absl::StrCat(where, head.query_mask.size(), " query mask bytes for ", n,
                                                       " rows (has_query_masks ", has_query_masks, ")"));
      }
      if (head.scores.size() != (has_scores ? n : 0)) {
        return absl::InvalidArgumentError(absl::StrCat(where, head.scores.size(), " scores for ", n,
                                                       " rows (has_scores ", has_scores, ")"));
      }
      for (size_t i = 0; i < n; ++i) {
        const int32_t p = head.positions[i];
        if (p < 0 || p >= next_pos || (i > 0 && p <= head.positions[i - 1])) {
          return absl::InvalidArgumentError(absl::StrCat(where, "position ", p, " at row ", i,
                                                         " is not strictly ascending within [0, next_pos ",
                                                         next_pos, ")"));
        }
      }
    }
  }
  if (backend_rows != nullptr) {
    int64_t total = 0;
    for (const HeadRows& head : heads) total += static_cast<int64_t>(head.positions.size());
    if (backend_rows->dtype != ops::KvDtype::kFloat32 && backend_rows->dtype != ops::KvDtype::kBf16) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, "backend rows of unknown dtype ", static_cast<int>(backend_rows->dtype)));
    }
    const size_t need = static_cast<size_t>(total) * head_dim * ops::KvDtypeBytes(backend_rows->dtype);
    if (backend_rows->rows != total || backend_rows->head_dim != head_dim || backend_rows->k.bytes() < need ||
        backend_rows->v.bytes() < need) {
      return absl::InvalidArgumentError(absl::StrCat(what, backend_rows->rows, " ",
                                                     ops::KvDtypeName(backend_rows->dtype), " backend rows of ",
                                                     backend_rows->head_dim, " (", backend_rows->k.bytes(), " / ",
                                                     backend_rows->v.bytes(), " bytes) for ", total, " rows of ",
                                                     head_dim));
    }
  }
  if (eviction_policy.empty() && !eviction_state.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, "a decode eviction state of ", eviction_state.size(),
                                                   " bytes without its policy"));
  }
  return absl::OkStatus();
}

std::string SerializeLayer(const KvHandoff& handoff, int32_t layer) {
  std::string out(static_cast<size_t>(handoff.LayerPayloadBytes(layer)), '\0');
  char* at = out.data();
  for (int32_t h = 0; h < handoff.num_kv_heads; ++h) {
    const HeadRows& head = handoff.at(layer, h);
    Append(head.k, &at);
    Append(head.v, &at);
    AppendPositions(head.positions, handoff.next_pos, &at);
    if (handoff.has_query_masks) Append(head.query_mask, &at);
    if (handoff.has_scores) Append(head.scores, &at);
  }
  return out;
}

absl::Status ParseLayer(std::string_view bytes, absl::Span<const int32_t> lengths, int32_t layer,
                        KvHandoff* handoff) {
  const int32_t L = handoff->num_layers, H = handoff->num_kv_heads;
  if (L <= 0 || H <= 0 || handoff->head_dim <= 0 || static_cast<int64_t>(lengths.size()) != int64_t{L} * H) {
    return absl::InvalidArgumentError(absl::StrCat("layer payload for ", L, " layers x ", H, " kv heads x ",
                                                   handoff->head_dim, " head_dim with ", lengths.size(), " lengths"));
  }
  if (layer < 0 || layer >= L) {
    return absl::InvalidArgumentError(absl::StrCat("layer payload of layer ", layer, " outside [0, ", L, ")"));
  }
  const bool with_kv = handoff->backend_rows == nullptr;
  int64_t expected = 0;
  for (int32_t h = 0; h < H; ++h) {
    const int32_t n = lengths[static_cast<size_t>(layer) * H + h];
    if (n < 0) return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " kv head ", h, ": length ", n));
    expected += HeadPayloadBytes(n, handoff->next_pos, handoff->head_dim, handoff->has_query_masks,
                                 handoff->has_scores, with_kv);
  }
  if (static_cast<int64_t>(bytes.size()) != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " payload of ", bytes.size(), " bytes, its lengths need ", expected));
  }
  if (static_cast<int64_t>(handoff->heads.size()) != int64_t{L} * H) handoff->heads.resize(static_cast<size_t>(L) * H);
  const char* in = bytes.data();
  for (int32_t h = 0; h < H; ++h) {
    const size_t n = static_cast<size_t>(lengths[static_cast<size_t>(layer) * H + h]);
    HeadRows& head = handoff->at(layer, h);
    Take(with_kv ? n * handoff->head_dim : 0, &in, &head.k);
    Take(with_kv ? n * handoff->head_dim : 0, &in, &head.v);
    if (absl::Status s = TakePositions(n, handoff->next_pos, &in, &head.positions); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " kv head ", h, ": ", s.message()));
    }
    if (handoff->has_query_masks) {
      Take(n, &in, &head.query_mask);
    } else {
      head.query_mask.clear();
    }
    if (handoff->has_scores) {
      Take(n, &in, &head.scores);
    } else {
      head.scores.clear();
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<KvHandoff> ExportSequence(KvPool* pool, const SequenceLayout& layout, RowsIn rows_in) {
  if (layout.heads.empty()) return absl::InvalidArgumentError("export of an empty sequence");
  KvHandoff handoff;
  handoff.num_layers = layout.num_layers;
  handoff.num_kv_heads = layout.num_kv_heads;
  handoff.head_dim = pool->head_dim();
  handoff.next_pos = layout.next_pos;
  handoff.has_query_masks = layout.has_query_masks;
  handoff.has_scores = layout.has_scores;
  handoff.heads.reserve(layout.heads.size());
  if (rows_in == RowsIn::kBackend) {
    KVGATE_ASSIGN_OR_RETURN(BackendRows rows, pool->GatherRows(layout));
    handoff.backend_rows = std::make_shared<const BackendRows>(std::move(rows));
    // The layout's host copies of positions, masks and scores are what the pool holds.
    for (const HeadPages& hp : layout.heads) {
      HeadRows head;
      head.positions = hp.positions;
      if (layout.has_query_masks) head.query_mask = hp.query_mask;
      head.scores = hp.scores;
      handoff.heads.push_back(std::move(head));
    }
    return handoff;
  }
  for (int32_t l = 0; l < layout.num_layers; ++l) {
    for (int32_t h = 0; h < layout.num_kv_heads; ++h) {
      KVGATE_ASSIGN_OR_RETURN(HeadRows rows, pool->ReadRows(layout, l, h));
      // The pool keeps 0xFF mask bytes for a layout without masks; they do not travel.
      if (!layout.has_query_masks) rows.query_mask.clear();
      handoff.heads.push_back(std::move(rows));
    }
  }
  return handoff;
}

absl::StatusOr<SequenceLayout> ImportSequence(KvPool* pool, const KvHandoff& handoff) {
  KVGATE_RETURN_IF_ERROR(handoff.Validate());
  if (handoff.head_dim != pool->head_dim()) {
    return absl::InvalidArgumentError(absl::StrCat("kv handoff ", handoff.transfer_id, " has head_dim ",
                                                   handoff.head_dim, ", the pool's rows are ", pool->head_dim()));
  }
  gates::KeepPlan plan{handoff.num_layers, handoff.num_kv_heads, handoff.next_pos, {}};
  plan.heads.resize(handoff.heads.size());
  for (size_t i = 0; i < handoff.heads.size(); ++i) {
    plan.heads[i].positions = handoff.heads[i].positions;
    plan.heads[i].query_mask = handoff.heads[i].query_mask;
    plan.heads[i].scores = handoff.heads[i].scores;
  }
  SequenceLayout layout;
  absl::Status s = handoff.backend_rows != nullptr ? pool->CommitBackendRows(plan, *handoff.backend_rows, &layout)
                                                   : pool->CommitHostRows(plan, handoff.heads, &layout);
  if (!s.ok()) return absl::Status(s.code(), absl::StrCat("kv handoff ", handoff.transfer_id, ": ", s.message()));
  // PlanCommit derives the flags from the rows; a sequence whose heads are all empty
  // keeps the handoff's.
  layout.has_query_masks = handoff.has_query_masks;
  layout.has_scores = handoff.has_scores;
  return layout;
}

}  // namespace kvgate::kv
