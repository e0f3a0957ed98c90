// The KvTransferHeader mapping: round trips of every field (the eviction state as opaque bytes), and the
// header checks a receiver relies on before it reserves anything.
#include "kv/transport/handoff_proto.h"

#include <gtest/gtest.h>

#include <functional>

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

}  // namespace
}  // namespace kvgate::kv
