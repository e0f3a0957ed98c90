#include "kv/decode_step_tables.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::kv {
namespace {

// Entries per batch slot and kv head in a layer's small tables: src rows, dst rows,
// page_indptr, lengths, first slots, gap rows, gap slots.
constexpr size_t kLayerTablesPerSeqHead = 7;

size_t RoundUp(size_t value, size_t multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace

size_t DecodeStepTables::IdOffset(int32_t layer, int32_t slot, int32_t kv_head) const {
  return ((static_cast<size_t>(layer) * slot_capacity_ + slot) * kv_heads_ + kv_head) * stride_;
}

absl::Status DecodeStepTables::Reshape(int32_t layers, int32_t kv_heads, size_t num_sequences, size_t max_pages) {
  // Headroom, so that a growing batch or growing sequences reshape (and re-upload every
  // id) rarely: a quarter more of each, in round units.
  const size_t slots = RoundUp(std::max<size_t>(num_sequences + num_sequences / 4, 1), 8);
  const size_t stride = RoundUp(max_pages + max_pages / 4 + 16, 64);
  const size_t small = static_cast<size_t>(layers) * (kLayerTablesPerSeqHead * slots * kv_heads + 1);
  const size_t ids = static_cast<size_t>(layers) * slots * kv_heads * stride;
  if (ids >= static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(absl::StrCat("decode step tables of ", ids, " page ids (", num_sequences,
                                                   " sequences x ", layers, " layers x ", kv_heads,
                                                   " kv heads x ", stride, ") pass 2^31 - 1"));
  }
  const size_t bytes = (small + ids) * sizeof(int32_t);
  if (buffer_.bytes() < bytes) {
    buffer_ = ops::DeviceBuffer();
    KVGATE_ASSIGN_OR_RETURN(buffer_, pool_->backend()->Alloc(bytes));
  }
  layers_ = layers;
  kv_heads_ = kv_heads;
  slot_capacity_ = static_cast<int32_t>(slots);
  stride_ = static_cast<int32_t>(stride);
  small_tables_ = small;
  ids_mirror_.assign(ids, 0);
  slot_owner_.assign(slots, nullptr);
  return absl::OkStatus();
}

std::vector<int32_t> DecodeStepTables::AssignSlots(absl::Span<const SequenceLayout* const> layouts) {
  std::unordered_map<const SequenceLayout*, int32_t> previous;
  for (int32_t k = 0; k < slot_capacity_; ++k) {
    if (slot_owner_[k] != nullptr) previous.emplace(slot_owner_[k], k);
  }
  std::vector<int32_t> slots(layouts.size(), -1);
  std::vector<bool> taken(slot_capacity_, false);
  for (size_t s = 0; s < layouts.size(); ++s) {
    const auto it = previous.find(layouts[s]);
    if (it != previous.end() && !taken[it->second]) {
      slots[s] = it->second;
      taken[it->second] = true;
    }
  }
  int32_t next_free = 0;
  for (size_t s = 0; s < layouts.size(); ++s) {
    if (slots[s] >= 0) continue;
    while (taken[next_free]) ++next_free;  // slot_capacity_ >= layouts.size(): one is free
    slots[s] = next_free;
    taken[next_free] = true;
  }
  for (int32_t k = 0; k < slot_capacity_; ++k) slot_owner_[k] = nullptr;
  for (size_t s = 0; s < layouts.size(); ++s) slot_owner_[slots[s]] = layouts[s];
  return slots;
}

absl::StatusOr<const DecodeStepTables::Step*> DecodeStepTables::Update(
    absl::Span<const SequenceLayout* const> layouts, absl::Span<const AppendPlan* const> steps) {
  last_upload_ = UploadStats{};
  step_ = Step{};
  if (layouts.size() != steps.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("step tables of ", layouts.size(), " layouts and ", steps.size(), " append plans"));
  }
  if (layouts.empty()) return &step_;
  const int32_t layers = layouts[0]->num_layers;
  const int32_t heads = layouts[0]->num_kv_heads;
  bool any_masks = false;
  size_t max_pages = 0;
  for (size_t s = 0; s < layouts.size(); ++s) {
    const SequenceLayout& seq = *layouts[s];
    if (seq.heads.empty() || seq.page_tokens != pool_->page_tokens() || seq.num_kv_heads != heads ||
        seq.num_layers != layers) {
      return absl::InvalidArgumentError(absl::StrCat("decode step tables: sequence ", s, " of the batch has ",
                                                     seq.num_layers, " layers x ", seq.num_kv_heads,
                                                     " kv heads, page_tokens ", seq.page_tokens, " (pool ",
                                                     pool_->page_tokens(), ", batch ", layers, " x ", heads, ")"));
    }
    if (steps[s]->num_kv_heads != heads || steps[s]->num_layers != layers) {
      return absl::InvalidArgumentError(absl::StrCat("decode step tables: append plan of sequence ", s, " has ",
                                                     steps[s]->num_layers, " layers x ", steps[s]->num_kv_heads,
                                                     " kv heads (batch: ", layers, " x ", heads, ")"));
    }
    any_masks |= seq.has_query_masks;
    for (const HeadPages& hp : seq.heads) max_pages = std::max(max_pages, hp.page_ids.size());
  }
  if (!mirror_valid_ || layers != layers_ || heads != kv_heads_ || layouts.size() > static_cast<size_t>(slot_capacity_) ||
      max_pages > static_cast<size_t>(stride_)) {
    mirror_valid_ = false;
    KVGATE_RETURN_IF_ERROR(Reshape(layers, heads, layouts.size(), max_pages));
  }
  const bool rebuild = !mirror_valid_;
  mirror_valid_ = false;  // until the uploads below are submitted
  const std::vector<int32_t> slots = AssignSlots(layouts);

  // The ids: the mirror takes every list; a changed id also joins the scatter.
  std::vector<int32_t> changed_values, changed_offsets;
  for (int32_t l = 0; l < layers; ++l) {
    for (size_t s = 0; s < layouts.size(); ++s) {
      for (int32_t h = 0; h < heads; ++h) {
        const std::vector<int32_t>& ids = layouts[s]->at(l, h).page_ids;
        const size_t offset = IdOffset(l, slots[s], h);
        int32_t* mirrored = ids_mirror_.data() + offset;
        if (rebuild) {
          std::copy(ids.begin(), ids.end(), mirrored);
          continue;
        }
        if (ids.empty() || std::memcmp(mirrored, ids.data(), ids.size() * sizeof(int32_t)) == 0) continue;
        for (size_t p = 0; p < ids.size(); ++p) {
          if (mirrored[p] == ids[p]) continue;
          mirrored[p] = ids[p];
          changed_values.push_back(ids[p]);
          changed_offsets.push_back(static_cast<int32_t>(offset + p));
        }
      }
    }
  }
  ops::Backend& backend = *pool_->backend();
  int32_t* small_tables = buffer_.as<int32_t>();
  int32_t* id_region = small_tables + small_tables_;
  // A scatter moves 3 int32 per id: past a third of the region, the region goes whole.
  if (rebuild || changed_values.size() * 3 >= ids_mirror_.size()) {
    KVGATE_RETURN_IF_ERROR(backend.CopyToBackend(id_region, ids_mirror_.data(), ids_mirror_.size() * sizeof(int32_t)));
    last_upload_.rebuilt = true;
    last_upload_.bytes_uploaded += ids_mirror_.size() * sizeof(int32_t);
  } else if (!changed_values.empty()) {
    const size_t n = changed_values.size();
    scatter_host_.resize(3 * n);
    std::copy(changed_values.begin(), changed_values.end(), scatter_host_.begin());
    std::iota(scatter_host_.begin() + n, scatter_host_.begin() + 2 * n, 0);
    std::copy(changed_offsets.begin(), changed_offsets.end(), scatter_host_.begin() + 2 * n);
    const size_t bytes = scatter_host_.size() * sizeof(int32_t);
    if (scatter_.bytes() < bytes) {
      scatter_ = ops::DeviceBuffer();
      KVGATE_ASSIGN_OR_RETURN(scatter_, backend.Alloc(std::max<size_t>(bytes * 2, 4096)));
    }
    KVGATE_RETURN_IF_ERROR(backend.CopyToBackend(scatter_.data(), scatter_host_.data(), bytes));
    // Same-dtype CopyRows moves raw 4-byte words: float32 rows of one element carry the
    // int32 ids unchanged.
    ops::CopyRowsArgs scatter;
    scatter.src = scatter_.data();
    scatter.dst = id_region;
    scatter.src_rows = scatter_.as<int32_t>() + n;
    scatter.dst_rows = scatter_.as<int32_t>() + 2 * n;
    scatter.num_rows = static_cast<int32_t>(n);
    scatter.row_elements = 1;
    scatter.src_dtype = scatter.dst_dtype = ops::KvDtype::kFloat32;
    KVGATE_RETURN_IF_ERROR(backend.CopyRows(scatter));
    last_upload_.ids_scattered = static_cast<int64_t>(n);
    last_upload_.bytes_uploaded += bytes;
  }

  // The small tables, whole: per layer [src rows | dst rows] at 0, page_indptr at
  // 2 x capacity, lengths after it, then first slots, gap rows and gap slots.
  const size_t capacity_heads = static_cast<size_t>(slot_capacity_) * heads;
  const size_t layer_block = kLayerTablesPerSeqHead * capacity_heads + 1;
  const size_t seq_heads = layouts.size() * heads;
  small_host_.assign(small_tables_, 0);
  for (int32_t l = 0; l < layers; ++l) {
    int32_t* block = small_host_.data() + layer_block * l;
    std::iota(block, block + seq_heads, 0);
    int32_t* indptr = block + 2 * capacity_heads;
    int32_t* lengths = indptr + capacity_heads + 1;
    int32_t* first_slots = lengths + capacity_heads;
    int32_t* gap_rows = first_slots + capacity_heads;
    int32_t* gap_slots = gap_rows + capacity_heads;
    for (size_t s = 0; s < layouts.size(); ++s) {
      const absl::Span<const int32_t> rows = steps[s]->layer_rows(l);
      std::copy(rows.begin(), rows.end(), block + seq_heads + s * heads);
      for (int32_t h = 0; h < heads; ++h) {
        indptr[s * heads + h] = static_cast<int32_t>(IdOffset(l, slots[s], h));
        const HeadPages& hp = layouts[s]->at(l, h);
        lengths[s * heads + h] = hp.length;
        first_slots[s * heads + h] = hp.first_slot;
        gap_rows[s * heads + h] = hp.gap_row;
        gap_slots[s * heads + h] = hp.gap_slots;
      }
    }
    indptr[seq_heads] = static_cast<int32_t>(ids_mirror_.size());
  }
  KVGATE_RETURN_IF_ERROR(backend.CopyToBackend(small_tables, small_host_.data(), small_tables_ * sizeof(int32_t)));
  last_upload_.bytes_uploaded += small_tables_ * sizeof(int32_t);
  mirror_valid_ = true;

  for (int32_t l = 0; l < layers; ++l) {
    const int32_t* block = small_tables + layer_block * l;
    step_.append_rows.push_back(block);
    ops::HeadPagedKvView view = pool_->PagesView(any_masks);
    view.page_indptr = block + 2 * capacity_heads;
    view.lengths = view.page_indptr + capacity_heads + 1;
    view.first_slots = view.lengths + capacity_heads;
    view.gap_rows = view.first_slots + capacity_heads;
    view.gap_slots = view.gap_rows + capacity_heads;
    view.page_ids = id_region;
    step_.views.push_back(view);
  }
  step_.num_append_rows = static_cast<int32_t>(seq_heads);
  step_.replay_key = {reinterpret_cast<uintptr_t>(small_tables), seq_heads,
                      uint64_t{static_cast<uint32_t>(layers)} << 32 | static_cast<uint32_t>(slot_capacity_),
                      uint64_t{static_cast<uint32_t>(stride_)} << 1 | uint64_t{any_masks}};
  return &step_;
}

}  // namespace kvgate::kv
