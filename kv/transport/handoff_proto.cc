#include "kv/transport/handoff_proto.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvgate::kv {

v1::KvTransferHeader ToHeaderProto(const KvHandoff& handoff) {
  v1::KvTransferHeader header;
  header.set_transfer_id(handoff.transfer_id);
  header.set_request_id(handoff.request_id);
  header.set_num_layers(handoff.num_layers);
  header.set_num_kv_heads(handoff.num_kv_heads);
  header.set_head_dim(handoff.head_dim);
  header.set_next_pos(handoff.next_pos);
  header.set_has_query_masks(handoff.has_query_masks);
  header.set_has_scores(handoff.has_scores);
  const std::vector<int32_t> lengths = handoff.Lengths();
  header.mutable_lengths()->Add(lengths.begin(), lengths.end());
  header.set_first_token(handoff.first_token);
  header.set_sampler_state(handoff.sampler_state);
  header.set_eviction_policy(handoff.eviction_policy);
  header.set_eviction_state(handoff.eviction_state);
  header.set_payload_bytes(handoff.PayloadBytes());
  return header;
}

absl::StatusOr<TransferHeader> FromHeaderProto(const v1::KvTransferHeader& header) {
  if (header.transfer_id().empty()) return absl::InvalidArgumentError("header.transfer_id is empty");
  const int32_t L = header.num_layers(), H = header.num_kv_heads();
  if (L <= 0 || L > kMaxTransferLayers || H <= 0 || H > kMaxTransferKvHeads ||
      int64_t{L} * H > kMaxTransferHeads) {
    return absl::InvalidArgumentError(absl::StrCat("header.num_layers ", L, " x num_kv_heads ", H,
                                                   " is outside [1, ", kMaxTransferLayers, "] x [1, ",
                                                   kMaxTransferKvHeads, "] (at most ", kMaxTransferHeads, " heads)"));
  }
  if (header.head_dim() <= 0 || header.head_dim() > kMaxTransferHeadDim || header.next_pos() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.head_dim ", header.head_dim(), ", header.next_pos ", header.next_pos()));
  }
  if (static_cast<int64_t>(header.lengths_size()) != int64_t{L} * H) {
    return absl::InvalidArgumentError(absl::StrCat("header.lengths has ", header.lengths_size(), " entries for ", L,
                                                   " layers x ", H, " kv heads"));
  }
  if (header.eviction_policy().empty() != header.eviction_state().empty()) {
    return absl::InvalidArgumentError(absl::StrCat("header.eviction_policy '", header.eviction_policy().substr(0, 64),
                                                   "' with an eviction_state of ", header.eviction_state().size(),
                                                   " bytes (both or neither)"));
  }
  TransferHeader out;
  KvHandoff& shell = out.shell;
  shell.transfer_id = header.transfer_id();
  shell.request_id = header.request_id();
  shell.num_layers = L;
  shell.num_kv_heads = H;
  shell.head_dim = header.head_dim();
  shell.next_pos = header.next_pos();
  shell.has_query_masks = header.has_query_masks();
  shell.has_scores = header.has_scores();
  shell.first_token = header.first_token();
  shell.sampler_state = header.sampler_state();
  shell.eviction_policy = header.eviction_policy();
  shell.eviction_state = header.eviction_state();
  shell.heads.resize(static_cast<size_t>(L) * H);
  out.lengths.assign(header.lengths().begin(), header.lengths().end());
  out.layer_bytes.assign(L, 0);
  int64_t total_rows = 0;
  for (int32_t l = 0; l < L; ++l) {
    for (int32_t h = 0; h < H; ++h) {
      const int32_t n = out.lengths[static_cast<size_t>(l) * H + h];
      // A head never holds more rows than positions before next_pos.
      if (n < 0 || n > shell.next_pos) {
        return absl::InvalidArgumentError(absl::StrCat("header.lengths: layer ", l, " kv head ", h, " has ", n,
                                                       " rows (next_pos ", shell.next_pos, ")"));
      }
      out.layer_bytes[l] += HeadPayloadBytes(n, shell.next_pos, shell.head_dim, shell.has_query_masks, shell.has_scores,
                                             /*with_kv=*/!header.has_device_rows());
      total_rows += n;
      if (out.layer_bytes[l] > kMaxTransferPayloadBytes) {
        return absl::InvalidArgumentError(absl::StrCat("header.lengths: layer ", l, " exceeds ",
                                                       kMaxTransferPayloadBytes, " bytes"));
      }
    }
    out.payload_bytes += out.layer_bytes[l];
    if (out.payload_bytes > kMaxTransferPayloadBytes) {
      return absl::InvalidArgumentError(absl::StrCat("header.lengths: the payload exceeds ", kMaxTransferPayloadBytes,
                                                     " bytes"));
    }
  }
  if (header.payload_bytes() != out.payload_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("header.payload_bytes ", header.payload_bytes(),
                                                   ", the lengths need ", out.payload_bytes));
  }
  if (header.has_device_rows()) {
    const v1::KvDeviceRows& device = header.device_rows();
    if (device.k_name().empty() || device.v_name().empty() || device.k_name().size() > kMaxDeviceRowsNameBytes ||
        device.v_name().size() > kMaxDeviceRowsNameBytes) {
      return absl::InvalidArgumentError(absl::StrCat("header.device_rows names of ", device.k_name().size(), " and ",
                                                     device.v_name().size(), " bytes (1 to ",
                                                     kMaxDeviceRowsNameBytes, ")"));
    }
    if (device.rows() != total_rows) {
      return absl::InvalidArgumentError(
          absl::StrCat("header.device_rows.rows ", device.rows(), ", the lengths sum to ", total_rows));
    }
    DeviceRowsRef ref;
    switch (device.dtype()) {
      case v1::KV_ROW_DTYPE_FLOAT32:
        ref.dtype = ops::KvDtype::kFloat32;
        break;
      case v1::KV_ROW_DTYPE_BF16:
        ref.dtype = ops::KvDtype::kBf16;
        break;
      default:
        return absl::InvalidArgumentError(absl::StrCat("header.device_rows.dtype ", device.dtype(), " is unknown"));
    }
    const int64_t row_bytes = int64_t{shell.head_dim} * static_cast<int64_t>(ops::KvDtypeBytes(ref.dtype));
    if (total_rows > kMaxTransferPayloadBytes / row_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("header.device_rows: ", total_rows, " rows of ", row_bytes,
                                                     " bytes exceed ", kMaxTransferPayloadBytes, " bytes"));
    }
    ref.k_name = device.k_name();
    ref.v_name = device.v_name();
    ref.rows = total_rows;
    ref.buffer_bytes = std::max<int64_t>(total_rows, 1) * row_bytes;
    out.device_rows = std::move(ref);
  }
  return out;
}

}  // namespace kvgate::kv
