// The KvTransferHeader mapping: round trips of every field and eviction kind, and the
// header checks a receiver relies on before it reserves anything.
#include "kv_manager/transport/handoff_proto.h"

#include <gtest/gtest.h>

#include <functional>

#include "kv_manager/transport/transport_test_util.h"

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

TEST(HandoffProtoTest, EveryEvictionKindRoundTrips) {
  for (auto kind : {DecodeEviction::Kind::kNone, DecodeEviction::Kind::kStreamingRing,
                    DecodeEviction::Kind::kRecentRing, DecodeEviction::Kind::kFastKvzip,
                    DecodeEviction::Kind::kAttentionGate}) {
    DecodeEvictionParams params;
    params.kind = kind;
    params.sink_tokens = 1;
    params.ring_begin = 2;
    params.capacity = 3;
    params.interval = 4;
    params.attention_gate_state = std::string("\0\1\2", 3);
    auto back = EvictionFromProto(EvictionToProto(params));
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(back->kind, kind);
    EXPECT_EQ(back->sink_tokens, 1);
    EXPECT_EQ(back->ring_begin, 2);
    EXPECT_EQ(back->capacity, 3);
    EXPECT_EQ(back->interval, 4);
    EXPECT_EQ(back->attention_gate_state, params.attention_gate_state);
  }
  v1::DecodeEvictionState unknown;
  unknown.set_kind(static_cast<v1::DecodeEvictionState::Kind>(42));
  EXPECT_EQ(EvictionFromProto(unknown).status().code(), absl::StatusCode::kInvalidArgument);
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
      {"eviction.kind", [](v1::KvTransferHeader& h) {
         h.mutable_eviction()->set_kind(static_cast<v1::DecodeEvictionState::Kind>(9));
       }},
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
