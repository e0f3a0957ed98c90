#include "kv_manager/decode_batch.h"

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
  views_.clear();
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
  views_.clear();
  for (size_t s = 0; s < sequences_.size(); ++s) KVGATE_RETURN_IF_ERROR(ForSequence(sequences_[s]->BeginStep(), s));
  return absl::OkStatus();
}

absl::Status DecodeBatch::AppendLayer(int32_t layer, const float* k_new, const float* v_new) {
  // One CopyRows per tensor for the whole batch: row s * num_kv_heads + h of k_new / v_new
  // goes to sequence s's slot of kv head h.
  std::vector<const AppendPlan*> steps;
  steps.reserve(sequences_.size());
  for (const SequenceBatch* seq : sequences_) steps.push_back(&seq->step());
  return pool_->AppendDecodeRows(steps, layer, k_new, v_new);
}

absl::StatusOr<ops::HeadPagedKvView> DecodeBatch::View(int32_t layer) {
  std::vector<const SequenceLayout*> layouts;
  layouts.reserve(sequences_.size());
  for (const SequenceBatch* seq : sequences_) layouts.push_back(&seq->layout());
  if (views_.empty()) {
    // Every layer's tables in one upload: an upload of this size waits for the stream, so
    // one per step instead of one per layer keeps the host ahead of the GPU.
    KVGATE_ASSIGN_OR_RETURN(views_, pool_->BuildViews(layouts));
  }
  if (layer < 0 || layer >= static_cast<int32_t>(views_.size())) return pool_->BuildView(layouts, layer);  // its error
  return views_[layer];
}

absl::Status DecodeBatch::EndStep() {
  // Every sequence ends its step (next_pos already advanced at BeginStep); the first
  // failure is reported after all have run.
  views_.clear();  // decode-time eviction changes the layouts
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
