#include "kv/decode_batch.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::kv {
namespace {

absl::Status ForSequence(const absl::Status& s, size_t index) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("sequence ", index, " of the decode batch: ", s.message()));
}

// splitmix64's finaliser over a ^ b: a key word that changes with every input bit.
uint64_t MixKey(uint64_t a, uint64_t b) {
  uint64_t z = a ^ (b + 0x9e3779b97f4a7c15ull + (a << 6) + (a >> 2));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

void DecodeBatch::SetSequences(std::vector<SequenceBatch*> sequences) {
  sequences_ = std::move(sequences);
  tables_ = nullptr;
}

int32_t DecodeBatch::num_sequences() const { return static_cast<int32_t>(sequences_.size()); }

std::vector<int32_t> DecodeBatch::NextPositions() const {
  std::vector<int32_t> positions;
  positions.reserve(sequences_.size());
  for (const SequenceBatch* seq : sequences_) positions.push_back(seq->layout().next_pos);
  return positions;
}

absl::Status DecodeBatch::BeginStep() {
  for (size_t s = 0; s < sequences_.size(); ++s) {
    if (sequences_[s]->pool() != pool_) {
      return ForSequence(absl::InvalidArgumentError("the sequence lives in another KV pool"), s);
    }
  }
  tables_ = nullptr;
  for (size_t s = 0; s < sequences_.size(); ++s) KVGATE_RETURN_IF_ERROR(ForSequence(sequences_[s]->BeginStep(), s));
  std::vector<const SequenceLayout*> layouts;
  std::vector<const AppendPlan*> steps;
  layouts.reserve(sequences_.size());
  steps.reserve(sequences_.size());
  for (const SequenceBatch* seq : sequences_) {
    layouts.push_back(&seq->layout());
    steps.push_back(&seq->step());
  }
  KVGATE_ASSIGN_OR_RETURN(tables_, step_tables_.Update(layouts, steps));
  return PrepareScorers();
}

absl::Status DecodeBatch::PrepareScorers() {
  for (ScorerSlot& slot : scorers_) slot.members.clear();
  const int32_t rows = static_cast<int32_t>(sequences_.size());
  for (size_t s = 0; s < sequences_.size(); ++s) {
    const gates::DecodeLayerScorer* scorer = sequences_[s]->layer_scorer();
    if (scorer == nullptr) continue;
    auto slot = std::find_if(scorers_.begin(), scorers_.end(), [&](const ScorerSlot& x) { return x.scorer == scorer; });
    if (slot == scorers_.end()) slot = scorers_.insert(scorers_.end(), ScorerSlot{scorer, {}, 0, {}});
    slot->members.push_back(s);
  }
  // A scorer no sequence uses any more lets its buffer go.
  scorers_.erase(std::remove_if(scorers_.begin(), scorers_.end(), [](const ScorerSlot& x) { return x.members.empty(); }),
                 scorers_.end());
  ops::Backend& backend = *pool_->backend();
  for (ScorerSlot& slot : scorers_) {
    KVGATE_RETURN_IF_ERROR(slot.scorer->PrepareOn(backend));
    const size_t bytes = sizeof(float) * slot.scorer->scorer_layers() * slot.scorer->scorer_kv_heads() * rows;
    if (slot.scores.bytes() < bytes) {
      KVGATE_ASSIGN_OR_RETURN(slot.scores, backend.Alloc(bytes));
    }
    slot.rows = rows;
  }
  return absl::OkStatus();
}

bool DecodeBatch::scores_layer_inputs() const {
  return std::any_of(sequences_.begin(), sequences_.end(),
                     [](const SequenceBatch* seq) { return seq->layer_scorer() != nullptr; });
}

absl::Status DecodeBatch::ScoreLayerInput(int32_t layer, const float* hidden) {
  if (tables_ == nullptr) return absl::FailedPreconditionError("decode layer scores before BeginStep");
  for (const ScorerSlot& slot : scorers_) {
    const int32_t heads = slot.scorer->scorer_kv_heads();
    if (layer < 0 || layer >= slot.scorer->scorer_layers()) {
      return absl::InvalidArgumentError(absl::StrCat("decode layer scores of layer ", layer, " for a scorer of ",
                                                     slot.scorer->scorer_layers(), " layers"));
    }
    float* out = slot.scores.as<float>() + static_cast<size_t>(layer) * heads * slot.rows;
    KVGATE_RETURN_IF_ERROR(slot.scorer->ScoreOn(*pool_->backend(), layer, hidden, slot.rows, out, slot.rows));
  }
  return absl::OkStatus();
}

absl::Status DecodeBatch::DeliverScores() {
  for (const ScorerSlot& slot : scorers_) {
    const int32_t layers = slot.scorer->scorer_layers(), heads = slot.scorer->scorer_kv_heads();
    std::vector<float> scores(static_cast<size_t>(layers) * heads * slot.rows);
    KVGATE_RETURN_IF_ERROR(pool_->backend()->CopyToHost(scores.data(), slot.scores.data(), scores.size() * sizeof(float)));
    std::vector<float> mine(heads);
    for (const size_t s : slot.members) {
      for (int32_t l = 0; l < layers; ++l) {
        for (int32_t h = 0; h < heads; ++h) mine[h] = scores[(static_cast<size_t>(l) * heads + h) * slot.rows + s];
        KVGATE_RETURN_IF_ERROR(ForSequence(sequences_[s]->ObserveLayerScores(l, mine), s));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status DecodeBatch::AppendLayer(int32_t layer, const float* k_new, const float* v_new) {
  if (tables_ == nullptr) return absl::FailedPreconditionError("decode append before BeginStep");
  if (layer < 0 || layer >= static_cast<int32_t>(tables_->append_rows.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("decode append of layer ", layer, " in a batch of ", tables_->append_rows.size(), " layers"));
  }
  return pool_->AppendDecodeRowsAt(tables_->append_rows[layer], tables_->num_append_rows, k_new, v_new);
}

absl::StatusOr<ops::HeadPagedKvView> DecodeBatch::View(int32_t layer) {
  if (tables_ == nullptr) return absl::FailedPreconditionError("decode view before BeginStep");
  if (layer < 0 || layer >= static_cast<int32_t>(tables_->views.size())) {
    return absl::InvalidArgumentError(
        absl::StrCat("view of layer ", layer, " in a batch of ", tables_->views.size(), " layers"));
  }
  return tables_->views[layer];
}

std::optional<std::array<uint64_t, 4>> DecodeBatch::replay_key() const {
  if (tables_ == nullptr) return std::nullopt;
  std::array<uint64_t, 4> key = tables_->replay_key;
  // The scorers' launches: which scorer writes into which buffer.
  for (const ScorerSlot& slot : scorers_) {
    key[3] = MixKey(key[3], reinterpret_cast<uintptr_t>(slot.scorer));
    key[3] = MixKey(key[3], reinterpret_cast<uintptr_t>(slot.scores.data()));
  }
  return key;
}

absl::Status DecodeBatch::EndStep() {
  // Every sequence ends its step (next_pos already advanced at BeginStep); the first
  // failure is reported after all have run.
  tables_ = nullptr;  // decode-time eviction changes the layouts
  absl::Status first = DeliverScores();
  absl::Status ended = SequenceBatch::EndSteps(sequences_);
  if (!ended.ok() && first.ok()) first = absl::Status(ended.code(), absl::StrCat("decode batch: ", ended.message()));
  return first;
}

bool DecodeBatch::wants_layer_inputs() const {
  for (const SequenceBatch* seq : sequences_) {
    if (seq->wants_layer_inputs() && seq->layer_scorer() == nullptr) return true;
  }
  return false;
}

absl::Status DecodeBatch::ObserveLayerInput(int32_t layer, absl::Span<const float> hidden) {
  if (sequences_.empty()) return absl::OkStatus();
  if (hidden.size() % sequences_.size() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("layer input of ", hidden.size(), " floats for a batch of ",
                                                   sequences_.size(), " sequences"));
  }
  const size_t hidden_size = hidden.size() / sequences_.size();
  for (size_t s = 0; s < sequences_.size(); ++s) {
    if (!sequences_[s]->wants_layer_inputs() || sequences_[s]->layer_scorer() != nullptr) continue;
    KVGATE_RETURN_IF_ERROR(ForSequence(sequences_[s]->ObserveLayerInput(layer, hidden.subspan(s * hidden_size, hidden_size)), s));
  }
  return absl::OkStatus();
}

}  // namespace kvgate::kv
