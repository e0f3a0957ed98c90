// The KvTransferHeader mapping: round trips of every field (the eviction state as opaque bytes), and the
// header checks a receiver relies on before it reserves anything.
#include "kv/transport/handoff_proto.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "kv/transport/transport_test_util.h"

namespace kvgate::kv {
namespace {

TEST(HandoffProtoTest, HeaderRoundTrips) {
  const KvHandoff sent = testing::CodedTransfer("p1", 6, /*masks=*/true, /*scores=*/true);
  const v1::KvTransferHeader header = ToHeaderProto(sent);
  EXPECT_EQ(header.payload_bytes(), sent.PayloadBytes());
  EXPECT_EQ(header.lengths_size(), 6);
  auto back = FromHeaderProto(header);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->lengths, sent.Lengths());
  EXPECT_EQ(back->payload_bytes, sent.PayloadBytes());
  ASSERT_EQ(back->layer_bytes.size(), 2u);
  EXPECT_EQ(back->layer_bytes[0], sent.LayerPayloadBytes(0));
  EXPECT_EQ(back->layer_bytes[1], sent.LayerPayloadBytes(1));
  // The shell is the handoff without rows: fill them and it is the same handoff.
  KvHandoff shell = back->shell;
  for (int32_t l = 0; l < shell.num_layers; ++l) {
    ASSERT_TRUE(ParseLayer(SerializeLayer(sent, l), back->lengths, l, &shell).ok());
  }
  testing::ExpectSameHandoff(sent, shell);
}

TEST(HandoffProtoTest, MalformedHeadersAreInvalidArgument) {
  const v1::KvTransferHeader good = ToHeaderProto(testing::CodedTransfer("p2", 4));
  ASSERT_TRUE(FromHeaderProto(good).ok());
  const std::vector<std::pair<const char*, std::function<void(v1::KvTransferHeader&)>>> breaks = {
      {"transfer_id", [](v1::KvTransferHeader& h) { h.clear_transfer_id(); }},
      {"num_layers", [](v1::KvTransferHeader& h) { h.set_num_layers(0); }},
      {"num_layers", [](v1::KvTransferHeader& h) { h.set_num_layers(kMaxTransferLayers + 1); }},
      {"num_kv_heads", [](v1::KvTransferHeader& h) { h.set_num_kv_heads(-3); }},
      {"head_dim", [](v1::KvTransferHeader& h) { h.set_head_dim(0); }},
      {"head_dim", [](v1::KvTransferHeader& h) { h.set_head_dim(kMaxTransferHeadDim + 1); }},
      {"next_pos", [](v1::KvTransferHeader& h) { h.set_next_pos(-1); }},
      {"lengths has", [](v1::KvTransferHeader& h) { h.mutable_lengths()->RemoveLast(); }},
      {"rows", [](v1::KvTransferHeader& h) { h.set_lengths(2, -1); }},
      {"rows", [](v1::KvTransferHeader& h) { h.set_lengths(2, h.next_pos() + 1); }},
      {"payload_bytes", [](v1::KvTransferHeader& h) { h.set_payload_bytes(h.payload_bytes() + 1); }},
      {"eviction_policy", [](v1::KvTransferHeader& h) { h.clear_eviction_policy(); }},
      {"eviction_policy", [](v1::KvTransferHeader& h) { h.clear_eviction_state(); }},
  };
  for (const auto& [field, mutate] : breaks) {
    v1::KvTransferHeader bad = good;
    mutate(bad);
    const absl::Status s = FromHeaderProto(bad).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string::npos) << field << ": " << s;
  }
}

// cuda_ipc: K and V stay in the sender's device memory, so the header names them and the
// layer payloads hold positions (and masks, scores) only.
TEST(HandoffProtoTest, DeviceRowsLeaveKAndVOutOfThePayload) {
  auto backend = ops::CreateBackend("cpu");
  ASSERT_TRUE(backend.ok()) << backend.status();
  const KvHandoff host = testing::CodedTransfer("ipc", 6, /*masks=*/true, /*scores=*/true);
  const KvHandoff sent = testing::WithBackendRows(host, backend->get());
  int64_t rows = 0;
  for (const HeadRows& head : sent.heads) rows += static_cast<int64_t>(head.positions.size());
  EXPECT_EQ(host.PayloadBytes() - sent.PayloadBytes(), rows * 2 * host.head_dim * int64_t{sizeof(float)})
      << "positions, masks and scores only";
  EXPECT_EQ(sent.HeldBytes(), sent.PayloadBytes() + static_cast<int64_t>(sent.backend_rows->k.bytes() * 2));

  v1::KvTransferHeader header = ToHeaderProto(sent);
  EXPECT_EQ(header.payload_bytes(), sent.PayloadBytes());
  v1::KvDeviceRows* device = header.mutable_device_rows();
  device->set_k_name("k-name");
  device->set_v_name("v-name");
  device->set_rows(rows);
  device->set_dtype(v1::KV_ROW_DTYPE_BF16);
  auto back = FromHeaderProto(header);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(back->device_rows.has_value());
  EXPECT_EQ(back->device_rows->k_name, "k-name");
  EXPECT_EQ(back->device_rows->v_name, "v-name");
  EXPECT_EQ(back->device_rows->rows, rows);
  EXPECT_EQ(back->device_rows->dtype, ops::KvDtype::kBf16);
  EXPECT_EQ(back->device_rows->buffer_bytes, rows * sent.head_dim * 2);
  EXPECT_EQ(back->held_bytes(), back->payload_bytes + 2 * rows * sent.head_dim * 2);
  EXPECT_EQ(back->layer_bytes[1], sent.LayerPayloadBytes(1));
  // A receiver that holds the rows apart parses positions, masks and scores alone.
  KvHandoff shell = back->shell;
  shell.backend_rows = sent.backend_rows;
  for (int32_t l = 0; l < shell.num_layers; ++l) {
    ASSERT_TRUE(ParseLayer(SerializeLayer(sent, l), back->lengths, l, &shell).ok());
  }
  ASSERT_TRUE(shell.Validate().ok()) << shell.Validate();
  for (size_t i = 0; i < host.heads.size(); ++i) {
    EXPECT_EQ(shell.heads[i].positions, host.heads[i].positions);
    EXPECT_EQ(shell.heads[i].query_mask, host.heads[i].query_mask);
    EXPECT_EQ(shell.heads[i].scores, host.heads[i].scores);
    EXPECT_TRUE(shell.heads[i].k.empty());
  }
  // Host rows parsed as if apart (or the reverse) are the wrong size.
  KvHandoff host_shell = back->shell;
  EXPECT_EQ(ParseLayer(SerializeLayer(host, 1), back->lengths, 1, &shell).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseLayer(SerializeLayer(sent, 1), back->lengths, 1, &host_shell).code(),
            absl::StatusCode::kInvalidArgument);

  const std::vector<std::pair<const char*, std::function<void(v1::KvTransferHeader&)>>> breaks = {
      {"device_rows.rows", [](v1::KvTransferHeader& h) { h.mutable_device_rows()->set_rows(h.device_rows().rows() + 1); }},
      {"device_rows.dtype", [](v1::KvTransferHeader& h) { h.mutable_device_rows()->clear_dtype(); }},
      {"device_rows names", [](v1::KvTransferHeader& h) { h.mutable_device_rows()->clear_k_name(); }},
      {"device_rows names",
       [](v1::KvTransferHeader& h) { h.mutable_device_rows()->set_v_name(std::string(kMaxDeviceRowsNameBytes + 1, 'x')); }},
      // Without device_rows the payload must hold K and V.
      {"payload_bytes", [](v1::KvTransferHeader& h) { h.clear_device_rows(); }},
  };
  for (const auto& [field, mutate] : breaks) {
    v1::KvTransferHeader bad = header;
    mutate(bad);
    const absl::Status s = FromHeaderProto(bad).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string::npos) << field << ": " << s;
  }
}

}  // namespace
}  // namespace kvgate::kv
