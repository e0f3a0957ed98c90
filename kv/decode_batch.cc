#include "kv/decode_batch.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::kv {
namespace {

absl::Status ForSequence(const absl::Status& s, size_t index) {
  if (s.ok()) return s;
  return absl::Status(s.code(), absl::StrCat("sequence ", index, " of the decode batch: ", s.message()));
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
  return tables_->replay_key;
}

absl::Status DecodeBatch::EndStep() {
  // Every sequence ends its step (next_pos already advanced at BeginStep); the first
  // failure is reported after all have run.
  tables_ = nullptr;  // decode-time eviction changes the layouts
  absl::Status first;
  for (size_t s = 0; s < sequences_.size(); ++s) {
    absl::Status st = sequences_[s]->EndStep();
    if (!st.ok() && first.ok()) first = ForSequence(st, s);
  }
  return first;
}

bool DecodeBatch::wants_layer_inputs() const {
  for (const SequenceBatch* seq : sequences_) {
    if (seq->wants_layer_inputs()) return true;
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
    if (!sequences_[s]->wants_layer_inputs()) continue;
    KVGATE_RETURN_IF_ERROR(ForSequence(sequences_[s]->ObserveLayerInput(layer, hidden.subspan(s * hidden_size, hidden_size)), s));
  }
  return absl::OkStatus();
}

}  // namespace kvgate::kv
