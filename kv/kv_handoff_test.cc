// KvHandoff: the layer wire format (exact bytes), validation, and the
// round trip of a real kvgate-tiny sequence out of one KV pool and into another (a second
// backend): decode continues bit-identically for every policy with decode-time state.
#include "kv/kv_handoff.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <optional>
#include <random>

#include "absl/strings/str_cat.h"
#include "cuda/bf16.h"
#include "kv/kv_test_util.h"
#include "kv/tiny_decode_test_util.h"

namespace kvgate::kv {
namespace {

using testing::CodedV;
using testing::CodedValue;

constexpr int kDecodeSteps = 8;

// A handoff with position-coded rows: every head a different length (0 included),
// optional masks and scores.
KvHandoff CodedHandoff(bool masks, bool scores) {
  KvHandoff h;
  h.transfer_id = "t-1";
  h.request_id = "r-1";
  h.num_layers = 2;
  h.num_kv_heads = 3;
  h.head_dim = 4;
  h.next_pos = 40;
  h.has_query_masks = masks;
  h.has_scores = scores;
  for (int32_t l = 0; l < h.num_layers; ++l) {
    for (int32_t kv = 0; kv < h.num_kv_heads; ++kv) {
      HeadRows rows;
      const int32_t length = (l * 3 + kv * 7) % 11;  // 0, 7, 3, 3, 10, 6
      for (int32_t r = 0; r < length; ++r) {
        const int32_t position = 2 + 3 * r + l;
        rows.positions.push_back(position);
        for (int32_t d = 0; d < h.head_dim; ++d) {
          rows.k.push_back(CodedValue(l, kv, position, d));
          rows.v.push_back(CodedV(l, kv, position, d));
        }
        if (masks) rows.query_mask.push_back(static_cast<uint8_t>(1 + (position % 3)));
        if (scores) rows.scores.push_back(0.25f * position);
      }
      h.heads.push_back(std::move(rows));
    }
  }
  return h;
}

void ExpectSameRows(const KvHandoff& a, const KvHandoff& b) {
  ASSERT_EQ(a.heads.size(), b.heads.size());
  for (size_t i = 0; i < a.heads.size(); ++i) {
    EXPECT_EQ(a.heads[i].positions, b.heads[i].positions) << "head " << i;
    EXPECT_EQ(a.heads[i].k, b.heads[i].k) << "head " << i;
    EXPECT_EQ(a.heads[i].v, b.heads[i].v) << "head " << i;
    EXPECT_EQ(a.heads[i].query_mask, b.heads[i].query_mask) << "head " << i;
    EXPECT_EQ(a.heads[i].scores, b.heads[i].scores) << "head " << i;
  }
}

// `h` as a pool of `pool`'s dtype holds it: K and V rounded to bf16 for a bf16 pool.
KvHandoff AsStoredIn(const KvPool& pool, KvHandoff h) {
  if (pool.dtype() != ops::KvDtype::kBf16) return h;
  for (HeadRows& rows : h.heads) {
    for (float& x : rows.k) x = ops::RoundToBf16(x);
    for (float& x : rows.v) x = ops::RoundToBf16(x);
  }
  return h;
}

TEST(KvHandoffTest, LayerWireFormatIsExact) {
  const KvHandoff h = CodedHandoff(/*masks=*/true, /*scores=*/true);
  ASSERT_TRUE(h.Validate().ok()) << h.Validate();
  EXPECT_EQ(h.Lengths(), (std::vector<int32_t>{0, 7, 3, 3, 10, 6}));
  // next_pos 40: a bitmask of 5 bytes beats 4 bytes a row for every head of 2 rows or more.
  const int64_t row_bytes = 2 * 4 * 4 + 1 + 4;
  EXPECT_EQ(h.LayerPayloadBytes(0), 10 * row_bytes + 2 * 5);
  EXPECT_EQ(h.LayerPayloadBytes(1), 19 * row_bytes + 3 * 5);
  EXPECT_EQ(h.PayloadBytes(), 29 * row_bytes + 5 * 5);
  // Layer 1, kv head 0 (3 rows at 3, 6, 9): K, V, the positions bitmask, masks, scores,
  // then kv head 1.
  const std::string bytes = SerializeLayer(h, 1);
  ASSERT_EQ(static_cast<int64_t>(bytes.size()), h.LayerPayloadBytes(1));
  const char* at = bytes.data();
  auto next_float = [&] { float f; std::memcpy(&f, at, 4); at += 4; return f; };
  for (int32_t r = 0; r < 3; ++r)
    for (int32_t d = 0; d < 4; ++d) EXPECT_EQ(next_float(), CodedValue(1, 0, 3 + 3 * r, d));
  for (int32_t r = 0; r < 3; ++r)
    for (int32_t d = 0; d < 4; ++d) EXPECT_EQ(next_float(), CodedV(1, 0, 3 + 3 * r, d));
  const uint8_t bitmask[5] = {0x48, 0x02, 0, 0, 0};  // bits 3 and 6 of byte 0, bit 1 of byte 1
  for (uint8_t expected : bitmask) EXPECT_EQ(static_cast<uint8_t>(*at++), expected);
  for (int32_t r = 0; r < 3; ++r) EXPECT_EQ(static_cast<uint8_t>(*at++), 1 + ((3 + 3 * r) % 3));
  for (int32_t r = 0; r < 3; ++r) EXPECT_EQ(next_float(), 0.25f * (3 + 3 * r));
  EXPECT_EQ(next_float(), CodedValue(1, 1, 3, 0)) << "kv head 1 follows";
}

// Few rows of a long prompt travel as int32s (little-endian), many as the bitmask: the
// smaller of the two, decided by (rows, next_pos) alone.
TEST(KvHandoffTest, PositionsTakeTheSmallerEncoding) {
  EXPECT_FALSE(PositionsAsBitmask(0, 40));
  EXPECT_FALSE(PositionsAsBitmask(1, 40)) << "4 bytes against 5";
  EXPECT_TRUE(PositionsAsBitmask(2, 40));
  EXPECT_FALSE(PositionsAsBitmask(1024, 32768)) << "4096 bytes either way";
  EXPECT_TRUE(PositionsAsBitmask(1025, 32768));
  EXPECT_EQ(HeadPayloadBytes(32768, 32768, 128, false, false, /*with_kv=*/false), 4096);
  KvHandoff h;
  h.num_layers = 1;
  h.num_kv_heads = 1;
  h.head_dim = 2;
  h.next_pos = 40;
  HeadRows rows;
  rows.positions = {258 % 40};
  rows.k = {1, 2};
  rows.v = {3, 4};
  h.heads.push_back(rows);
  ASSERT_TRUE(h.Validate().ok()) << h.Validate();
  const std::string bytes = SerializeLayer(h, 0);
  ASSERT_EQ(bytes.size(), 2 * 2 * 4 + 4u);
  EXPECT_EQ(static_cast<uint8_t>(bytes[16]), 258 % 40);
  EXPECT_EQ(static_cast<uint8_t>(bytes[17]), 0);
}

// A head that kept its whole prompt (positions 0..n-1) is a run of set bits; it parses back
// to the same positions, and a run with one bit too many is refused.
TEST(KvHandoffTest, WholePromptHeadsRoundTrip) {
  for (const int32_t n : {4, 8, 13, 64, 100}) {  // 13 bytes of bitmask beat 4n from n = 4 on
    SCOPED_TRACE(n);
    KvHandoff h;
    h.num_layers = 1;
    h.num_kv_heads = 2;
    h.head_dim = 1;
    h.next_pos = 100;
    HeadRows whole, part;
    for (int32_t r = 0; r < n; ++r) whole.positions.push_back(r);
    for (int32_t r = 0; r < n; ++r) part.positions.push_back(r == n - 1 ? 99 : r);  // 0..n-2 and 99
    whole.k.assign(n, 1.0f);
    whole.v.assign(n, 2.0f);
    part.k.assign(n, 3.0f);
    part.v.assign(n, 4.0f);
    h.heads = {whole, part};
    ASSERT_TRUE(h.Validate().ok()) << h.Validate();
    const std::string bytes = SerializeLayer(h, 0);
    const size_t mask_at = 2 * n * 4;
    EXPECT_EQ(static_cast<uint8_t>(bytes[mask_at]), n >= 8 ? 0xFF : (1u << n) - 1);
    KvHandoff back;
    back.num_layers = 1;
    back.num_kv_heads = 2;
    back.head_dim = 1;
    back.next_pos = 100;
    const std::vector<int32_t> lengths = h.Lengths();
    ASSERT_TRUE(ParseLayer(bytes, lengths, 0, &back).ok());
    ExpectSameRows(h, back);
    std::string past = bytes;
    past[mask_at + 12] = static_cast<char>(past[mask_at + 12] | 0x10);  // bit 100: next_pos
    EXPECT_EQ(ParseLayer(past, lengths, 0, &back).code(), absl::StatusCode::kInvalidArgument);
    if (n < 100) {
      std::string extra = bytes;
      extra[mask_at + n / 8] = static_cast<char>(extra[mask_at + n / 8] | (1 << (n % 8)));  // row n too
      EXPECT_EQ(ParseLayer(extra, lengths, 0, &back).code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

// A bitmask whose count differs from the header's length, or with a bit at or past
// next_pos, is refused.
TEST(KvHandoffTest, BadPositionsBitmaskIsRefused) {
  KvHandoff h = CodedHandoff(/*masks=*/false, /*scores=*/false);
  h.next_pos = 37;  // 5 bytes of bitmask, bits 37..39 unused
  ASSERT_TRUE(h.Validate().ok()) << h.Validate();
  const std::vector<int32_t> lengths = h.Lengths();
  const std::string good = SerializeLayer(h, 1);
  const size_t bitmask_at = 3 * 4 * 4 * 2;  // layer 1, kv head 0: after 3 rows of K and V
  KvHandoff parsed;
  parsed.num_layers = h.num_layers;
  parsed.num_kv_heads = h.num_kv_heads;
  parsed.head_dim = h.head_dim;
  parsed.next_pos = h.next_pos;
  ASSERT_TRUE(ParseLayer(good, lengths, 1, &parsed).ok());
  std::string extra = good;
  extra[bitmask_at] = static_cast<char>(extra[bitmask_at] | 0x01);  // a fourth row
  EXPECT_EQ(ParseLayer(extra, lengths, 1, &parsed).code(), absl::StatusCode::kInvalidArgument);
  std::string missing = good;
  missing[bitmask_at] = static_cast<char>(0x08);  // only one of the three rows
  EXPECT_EQ(ParseLayer(missing, lengths, 1, &parsed).code(), absl::StatusCode::kInvalidArgument);
  std::string past = good;
  past[bitmask_at + 1] = 0;  // row 9 moves past next_pos 37, to bit 38
  past[bitmask_at + 4] = static_cast<char>(0x40);
  EXPECT_EQ(ParseLayer(past, lengths, 1, &parsed).code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvHandoffTest, ParseLayerRoundTripsAndRejectsWrongSizes) {
  for (bool masks : {false, true}) {
    for (bool scores : {false, true}) {
      SCOPED_TRACE(absl::StrCat("masks ", masks, " scores ", scores));
      const KvHandoff h = CodedHandoff(masks, scores);
      KvHandoff parsed;
      parsed.num_layers = h.num_layers;
      parsed.num_kv_heads = h.num_kv_heads;
      parsed.head_dim = h.head_dim;
      parsed.next_pos = h.next_pos;
      parsed.has_query_masks = masks;
      parsed.has_scores = scores;
      const std::vector<int32_t> lengths = h.Lengths();
      for (int32_t l = 0; l < h.num_layers; ++l) {
        ASSERT_TRUE(ParseLayer(SerializeLayer(h, l), lengths, l, &parsed).ok());
      }
      ExpectSameRows(h, parsed);
      EXPECT_TRUE(parsed.Validate().ok()) << parsed.Validate();
      const std::string layer0 = SerializeLayer(h, 0);
      EXPECT_EQ(ParseLayer(layer0.substr(1), lengths, 0, &parsed).code(), absl::StatusCode::kInvalidArgument);
      EXPECT_EQ(ParseLayer(layer0 + "x", lengths, 0, &parsed).code(), absl::StatusCode::kInvalidArgument);
      EXPECT_EQ(ParseLayer(layer0, lengths, 2, &parsed).code(), absl::StatusCode::kInvalidArgument);
      EXPECT_EQ(ParseLayer(layer0, absl::MakeConstSpan(lengths).subspan(1), 0, &parsed).code(),
                absl::StatusCode::kInvalidArgument);
      std::vector<int32_t> negative = lengths;
      negative[0] = -1;
      EXPECT_EQ(ParseLayer(layer0, negative, 0, &parsed).code(), absl::StatusCode::kInvalidArgument);
    }
  }
}

TEST(KvHandoffTest, AnEvictionStateNeedsItsPolicy) {
  KvHandoff h;
  h.num_layers = 1;
  h.num_kv_heads = 1;
  h.head_dim = 4;
  h.next_pos = 1;
  h.heads.resize(1);
  h.eviction_state = "state";
  EXPECT_EQ(h.Validate().code(), absl::StatusCode::kInvalidArgument);
  h.eviction_policy = "streaming_llm";
  EXPECT_TRUE(h.Validate().ok()) << h.Validate();
  CarryDecodeEviction(nullptr, &h);
  EXPECT_TRUE(h.eviction_policy.empty() && h.eviction_state.empty());
}

class KvHandoffPoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // A ~130-token prompt plus decode takes 10 pages of 16 rows in each of kvgate-tiny's
    // 32 (layer, kv head) lists: 320 pages; 1024 leave room for the decode steps.
    auto worker = testing::TinyWorker::Create(1024);
    ASSERT_TRUE(worker.ok()) << worker.status();
    prefill_ = std::move(*worker);
    worker = testing::TinyWorker::Create(1024);
    ASSERT_TRUE(worker.ok()) << worker.status();
    decode_ = std::move(*worker);
    auto tokenizer = testing::LoadTinyTokenizer();
    ASSERT_TRUE(tokenizer.ok()) << tokenizer.status();
    tokenizer_ = std::move(*tokenizer);
    auto text = testing::TinyText(prefill_->model.get(), tokenizer_.get(), "Once upon a time, there was a dog", 120, 3);
    ASSERT_TRUE(text.ok()) << text.status();
    prompt_ = *text;
  }

  std::unique_ptr<testing::TinyWorker> prefill_, decode_;
  std::unique_ptr<engine::Tokenizer> tokenizer_;
  std::vector<int32_t> prompt_;
};

// Coded rows into a pool and back out: exact values, masks, scores and positions.
TEST_F(KvHandoffPoolTest, ImportExportRoundTripsExactRows) {
  KvHandoff h = CodedHandoff(/*masks=*/true, /*scores=*/true);
  h.head_dim = decode_->pool->head_dim();
  for (int32_t l = 0; l < h.num_layers; ++l) {
    for (int32_t kv = 0; kv < h.num_kv_heads; ++kv) {
      HeadRows& rows = h.at(l, kv);
      rows.k.clear();
      rows.v.clear();
      for (int32_t p : rows.positions) {
        for (int32_t d = 0; d < h.head_dim; ++d) {
          rows.k.push_back(CodedValue(l, kv, p, d));
          rows.v.push_back(CodedV(l, kv, p, d));
        }
      }
    }
  }
  KvPool& pool = *decode_->pool;
  const int32_t free_before = pool.pages_free();
  auto layout = ImportSequence(&pool, h);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_TRUE(layout->CheckInvariants().ok()) << layout->CheckInvariants();
  EXPECT_EQ(layout->next_pos, h.next_pos);
  EXPECT_TRUE(layout->has_query_masks);
  EXPECT_TRUE(layout->has_scores);
  EXPECT_EQ(pool.pages_free(), free_before - layout->NumPages());
  auto back = ExportSequence(&pool, *layout);
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameRows(AsStoredIn(pool, h), *back);
  // The mask bytes past each head's last row stay 0xFF (kv_pool.h invariant).
  for (const HeadPages& head : layout->heads) {
    if (head.page_ids.empty()) continue;
    std::vector<uint8_t> tail(pool.page_tokens());
    ASSERT_TRUE(decode_->backend
                    ->CopyToHost(tail.data(), pool.query_masks() + size_t{1} * head.page_ids.back() * pool.page_tokens(),
                                 tail.size())
                    .ok());
    for (int32_t r = (head.length - 1) % pool.page_tokens() + 1; r < pool.page_tokens(); ++r) {
      EXPECT_EQ(tail[r], kAllQueryHeads) << "unused slot " << r;
    }
  }
  ASSERT_TRUE(pool.Release(&*layout).ok());
  EXPECT_EQ(pool.pages_free(), free_before);

  // Without masks, the pool holds 0xFF bytes and the export carries none.
  KvHandoff plain = h;
  plain.has_query_masks = false;
  plain.has_scores = false;
  for (HeadRows& rows : plain.heads) rows.query_mask.clear(), rows.scores.clear();
  layout = ImportSequence(&pool, plain);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_FALSE(layout->has_query_masks);
  for (int32_t l = 0; l < plain.num_layers; ++l) {
    for (int32_t kv = 0; kv < plain.num_kv_heads; ++kv) {
      auto rows = pool.ReadRows(*layout, l, kv);
      ASSERT_TRUE(rows.ok());
      for (uint8_t byte : rows->query_mask) EXPECT_EQ(byte, kAllQueryHeads) << "layer " << l << " kv head " << kv;
    }
  }
  back = ExportSequence(&pool, *layout);
  ASSERT_TRUE(back.ok());
  ExpectSameRows(AsStoredIn(pool, plain), *back);
  ASSERT_TRUE(pool.Release(&*layout).ok());
}

TEST_F(KvHandoffPoolTest, MalformedHandoffsAreInvalidArgumentAndLeakNothing) {
  KvHandoff good = CodedHandoff(/*masks=*/true, /*scores=*/false);
  good.head_dim = decode_->pool->head_dim();
  for (HeadRows& rows : good.heads) {
    rows.k.assign(rows.positions.size() * good.head_dim, 1.0f);
    rows.v.assign(rows.positions.size() * good.head_dim, 2.0f);
  }
  ASSERT_TRUE(good.Validate().ok()) << good.Validate();
  const std::vector<std::pair<std::string, std::function<void(KvHandoff&)>>> breaks = {
      {"short K", [](KvHandoff& h) { h.at(0, 1).k.pop_back(); }},
      {"long V", [](KvHandoff& h) { h.at(1, 2).v.push_back(0); }},
      {"position count", [](KvHandoff& h) { h.at(0, 1).positions.pop_back(); }},
      {"non-ascending positions", [](KvHandoff& h) { std::swap(h.at(0, 1).positions[0], h.at(0, 1).positions[1]); }},
      {"repeated position", [](KvHandoff& h) { h.at(0, 1).positions[1] = h.at(0, 1).positions[0]; }},
      {"position >= next_pos", [](KvHandoff& h) { h.next_pos = h.at(1, 1).positions.back(); }},
      {"negative position", [](KvHandoff& h) { h.at(0, 1).positions[0] = -1; }},
      {"head_dim 0", [](KvHandoff& h) { h.head_dim = 0; }},
      {"head_dim not the pool's", [](KvHandoff& h) {
         h.head_dim = 4;
         for (HeadRows& rows : h.heads) rows.k.resize(rows.positions.size() * 4), rows.v.resize(rows.positions.size() * 4);
       }},
      {"missing masks", [](KvHandoff& h) { h.at(1, 1).query_mask.clear(); }},
      {"masks not flagged", [](KvHandoff& h) { h.has_query_masks = false; }},
      {"scores not flagged", [](KvHandoff& h) { h.at(0, 1).scores.assign(h.at(0, 1).positions.size(), 1.0f); }},
      {"missing scores", [](KvHandoff& h) { h.has_scores = true; }},
      {"head count", [](KvHandoff& h) { h.heads.pop_back(); }},
      {"no layers", [](KvHandoff& h) { h.num_layers = 0; }},
      {"negative next_pos", [](KvHandoff& h) { h.next_pos = -1; }},
  };
  KvPool& pool = *decode_->pool;
  const int32_t free_before = pool.pages_free();
  for (const auto& [name, mutate] : breaks) {
    KvHandoff bad = good;
    mutate(bad);
    if (name != "head_dim not the pool's") {
      EXPECT_EQ(bad.Validate().code(), absl::StatusCode::kInvalidArgument) << name;
    }
    auto layout = ImportSequence(&pool, bad);
    EXPECT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument) << name << ": " << layout.status();
    EXPECT_EQ(pool.pages_free(), free_before) << name;
  }
}

TEST_F(KvHandoffPoolTest, SmallPoolIsResourceExhaustedAndLeaksNothing) {
  auto small = KvPool::Create(decode_->backend.get(), 8, 16, decode_->model->config().head_dim);
  ASSERT_TRUE(small.ok());
  testing::TinyGates gates(prefill_->shape());
  const testing::PolicyCase full = testing::DecodePolicyCases(gates)[0];
  auto prefilled = testing::PrefillAndCommit(*prefill_->model, prefill_->pool.get(), full, prompt_);
  ASSERT_TRUE(prefilled.ok()) << prefilled.status();
  auto handoff = ExportSequence(prefill_->pool.get(), prefilled->sequence->layout());
  ASSERT_TRUE(handoff.ok()) << handoff.status();
  // Hold a page so the pool is not pristine: the failed import must leave it as it was.
  KvHandoff one = *handoff;
  for (HeadRows& rows : one.heads) rows = HeadRows{};
  one.at(0, 0).positions = {0};
  one.at(0, 0).k.assign(one.head_dim, 1.0f);
  one.at(0, 0).v.assign(one.head_dim, 2.0f);
  auto held = ImportSequence(small->get(), one);
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ((*small)->pages_free(), 7);
  auto layout = ImportSequence(small->get(), *handoff);
  EXPECT_EQ(layout.status().code(), absl::StatusCode::kResourceExhausted) << layout.status();
  EXPECT_EQ((*small)->pages_free(), 7);
  ASSERT_TRUE((*small)->Release(&*held).ok());
  EXPECT_EQ((*small)->pages_free(), 8);
}

// Prefill + commit with each policy on one worker, export, the wire format per layer
// (host rows) or the rows left in backend memory (the in-process path), import into a
// second worker's pool (its own backend instance and model) with the eviction rebuilt
// from its params: both copies decode the same tokens to bit-identical logits, and
// their decode-time eviction keeps the same rows step by step.
TEST_F(KvHandoffPoolTest, HandoffContinuesDecodeBitIdenticallyForEveryPolicy) {
  testing::TinyGates gates(prefill_->shape());
  const int32_t prefill_free = prefill_->pool->pages_free(), decode_free = decode_->pool->pages_free();
  for (const RowsIn rows_in : {RowsIn::kHost, RowsIn::kBackend}) {
  for (const testing::PolicyCase& c : testing::DecodePolicyCases(gates)) {
    SCOPED_TRACE(c.name + (rows_in == RowsIn::kHost ? " host rows" : " backend rows"));
    auto prefilled = testing::PrefillAndCommit(*prefill_->model, prefill_->pool.get(), c, prompt_);
    ASSERT_TRUE(prefilled.ok()) << prefilled.status();
    SequenceBatch& original = *prefilled->sequence;
    auto exported = ExportSequence(prefill_->pool.get(), original.layout(), rows_in);
    ASSERT_TRUE(exported.ok()) << exported.status();
    exported->transfer_id = "xfer-" + c.name;
    exported->first_token = testing::Argmax(prefilled->logits);
    CarryDecodeEviction(original.evictor(), &*exported);
    if (c.name == "sage_kv") {
      EXPECT_TRUE(exported->has_query_masks);
    }
    if (c.name == "fast_kvzip") {
      EXPECT_TRUE(exported->has_scores);
    }
    if (c.name != "full" && c.name != "snapkv") {
      EXPECT_EQ(exported->eviction_policy, c.name);
      EXPECT_FALSE(exported->eviction_state.empty());
    } else {
      EXPECT_TRUE(exported->eviction_policy.empty() && exported->eviction_state.empty());
    }
    ASSERT_TRUE(exported->Validate().ok()) << exported->Validate();

    if (rows_in == RowsIn::kBackend) {
      // The same rows as the host export, in GatherRows order.
      ASSERT_NE(exported->backend_rows, nullptr);
      auto host = ExportSequence(prefill_->pool.get(), original.layout(), RowsIn::kHost);
      ASSERT_TRUE(host.ok()) << host.status();
      const BackendRows& rows = *exported->backend_rows;
      EXPECT_EQ(rows.backend, std::string(prefill_->backend->Name()));
      // The rows live in the backend's memory (the GPU's under KVGATE_TEST_BACKEND=cuda).
      // They are the pool's dtype; the host export widened them.
      EXPECT_EQ(rows.dtype, prefill_->pool->dtype());
      std::vector<float> rows_k(static_cast<size_t>(rows.rows) * rows.head_dim), rows_v(rows_k.size());
      const size_t stored_bytes = rows_k.size() * ops::KvDtypeBytes(rows.dtype);
      std::vector<uint8_t> stored_k(stored_bytes), stored_v(stored_bytes);
      ASSERT_TRUE(prefill_->backend->CopyToHost(stored_k.data(), rows.k.data(), stored_bytes).ok());
      ASSERT_TRUE(prefill_->backend->CopyToHost(stored_v.data(), rows.v.data(), stored_bytes).ok());
      for (size_t e = 0; e < rows_k.size(); ++e) {
        if (rows.dtype == ops::KvDtype::kBf16) {
          ops::Bf16 k16, v16;
          std::memcpy(&k16, stored_k.data() + 2 * e, 2);
          std::memcpy(&v16, stored_v.data() + 2 * e, 2);
          rows_k[e] = ops::Bf16ToF32(k16);
          rows_v[e] = ops::Bf16ToF32(v16);
        } else {
          std::memcpy(&rows_k[e], stored_k.data() + 4 * e, 4);
          std::memcpy(&rows_v[e], stored_v.data() + 4 * e, 4);
        }
      }
      size_t at = 0;
      for (size_t i = 0; i < host->heads.size(); ++i) {
        const HeadRows& want = host->heads[i];
        EXPECT_EQ(exported->heads[i].positions, want.positions);
        EXPECT_EQ(exported->heads[i].query_mask, want.query_mask);
        EXPECT_EQ(exported->heads[i].scores, want.scores);
        EXPECT_TRUE(exported->heads[i].k.empty() && exported->heads[i].v.empty());
        ASSERT_LE(at + want.k.size(), rows_k.size()) << i;
        ASSERT_EQ(0, std::memcmp(rows_k.data() + at, want.k.data(), want.k.size() * sizeof(float))) << i;
        ASSERT_EQ(0, std::memcmp(rows_v.data() + at, want.v.data(), want.v.size() * sizeof(float))) << i;
        at += want.k.size();
      }
      EXPECT_EQ(static_cast<int64_t>(at), rows.rows * rows.head_dim);
    }
    // Over the wire: the header fields, then every layer's bytes; or the backend rows.
    KvHandoff received;
    received.transfer_id = exported->transfer_id;
    received.num_layers = exported->num_layers;
    received.num_kv_heads = exported->num_kv_heads;
    received.head_dim = exported->head_dim;
    received.next_pos = exported->next_pos;
    received.has_query_masks = exported->has_query_masks;
    received.has_scores = exported->has_scores;
    received.first_token = exported->first_token;
    received.eviction_policy = exported->eviction_policy;
    received.eviction_state = exported->eviction_state;
    const std::vector<int32_t> lengths = exported->Lengths();
    if (rows_in == RowsIn::kHost) {
      for (int32_t l = 0; l < exported->num_layers; ++l) {
        ASSERT_TRUE(ParseLayer(SerializeLayer(*exported, l), lengths, l, &received).ok());
      }
    } else {
      received = *exported;
    }
    auto layout = ImportSequence(decode_->pool.get(), received);
    ASSERT_TRUE(layout.ok()) << layout.status();
    ASSERT_TRUE(layout->CheckInvariants().ok()) << layout->CheckInvariants();
    auto eviction = gates::RestoreDecodeEvictor(received.eviction_policy, received.eviction_state, c.options,
                                                prefill_->shape());
    ASSERT_TRUE(eviction.ok()) << eviction.status();
    SequenceBatch imported(decode_->pool.get(), std::move(*layout), decode_->model->config().sliding_window,
                           std::move(*eviction));

    int32_t token = received.first_token;
    for (int step = 0; step < kDecodeSteps; ++step) {
      const SequenceLayout& a = original.layout();
      const SequenceLayout& b = imported.layout();
      ASSERT_EQ(a.next_pos, b.next_pos) << "step " << step;
      for (size_t i = 0; i < a.heads.size(); ++i) {
        ASSERT_EQ(a.heads[i].positions, b.heads[i].positions) << "step " << step << " head " << i;
        ASSERT_EQ(a.heads[i].query_mask, b.heads[i].query_mask) << "step " << step << " head " << i;
        ASSERT_EQ(a.heads[i].scores, b.heads[i].scores) << "step " << step << " head " << i;
      }
      auto want = prefill_->model->DecodeStep({&token, 1}, &original);
      auto got = decode_->model->DecodeStep({&token, 1}, &imported);
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_TRUE(got.ok()) << got.status();
      ASSERT_EQ(*got, *want) << "step " << step << " logits differ after the handoff";
      token = testing::Argmax(*want);
    }
    // The policies that evict in decode did (on both sides: the layouts matched above).
    if (c.name != "full" && c.name != "snapkv") {
      int64_t committed = 0;
      for (int32_t n : lengths) committed += n;
      EXPECT_LT(imported.layout().NumRows(), committed + int64_t{kDecodeSteps - 1} * int64_t(lengths.size()))
          << "decode-time eviction never ran";
    }
  }
  }
  EXPECT_EQ(prefill_->pool->pages_free(), prefill_free);
  EXPECT_EQ(decode_->pool->pages_free(), decode_free);
}

// Backend rows that do not fit the handoff, or live in another backend's memory, are
// refused before any page is taken.
TEST_F(KvHandoffPoolTest, MismatchedBackendRowsAreRefusedAndLeakNothing) {
  testing::TinyGates gates(prefill_->shape());
  const testing::PolicyCase full = testing::DecodePolicyCases(gates)[0];
  auto prefilled = testing::PrefillAndCommit(*prefill_->model, prefill_->pool.get(), full, prompt_);
  ASSERT_TRUE(prefilled.ok()) << prefilled.status();
  auto exported = ExportSequence(prefill_->pool.get(), prefilled->sequence->layout(), RowsIn::kBackend);
  ASSERT_TRUE(exported.ok()) << exported.status();
  ASSERT_TRUE(exported->Validate().ok()) << exported->Validate();
  KvPool& pool = *decode_->pool;
  const int32_t free_before = pool.pages_free();

  auto with_rows = [&](int64_t rows, int32_t head_dim, size_t bytes, std::string backend,
                       std::optional<ops::KvDtype> dtype = std::nullopt) {
    auto replaced = std::make_shared<BackendRows>();
    replaced->backend = std::move(backend);
    replaced->rows = rows;
    replaced->head_dim = head_dim;
    replaced->dtype = dtype.value_or(exported->backend_rows->dtype);
    replaced->k = *decode_->backend->Alloc(bytes);
    replaced->v = *decode_->backend->Alloc(bytes);
    KvHandoff h = *exported;
    h.backend_rows = std::move(replaced);
    return h;
  };
  const BackendRows& good = *exported->backend_rows;
  const size_t bytes = good.k.bytes();
  const std::string own(decode_->backend->Name());
  const std::string other = own == "cpu" ? "cuda:3" : "cpu";
  const std::vector<std::pair<std::string, KvHandoff>> invalid = {
      {"one row short", with_rows(good.rows - 1, good.head_dim, bytes, own)},
      {"other width", with_rows(good.rows, good.head_dim / 2, bytes, own)},
      {"short buffers", with_rows(good.rows, good.head_dim, bytes / 2, own)},
      {"unknown dtype", with_rows(good.rows, good.head_dim, bytes, own, static_cast<ops::KvDtype>(5))},
  };
  for (const auto& [name, bad] : invalid) {
    EXPECT_EQ(bad.Validate().code(), absl::StatusCode::kInvalidArgument) << name;
    auto layout = ImportSequence(&pool, bad);
    EXPECT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument) << name << ": " << layout.status();
    EXPECT_EQ(pool.pages_free(), free_before) << name;
  }
  KvHandoff host_rows_too = *exported;
  host_rows_too.at(0, 0).k.assign(host_rows_too.at(0, 0).positions.size() * host_rows_too.head_dim, 1.0f);
  host_rows_too.at(0, 0).v = host_rows_too.at(0, 0).k;
  EXPECT_EQ(host_rows_too.Validate().code(), absl::StatusCode::kInvalidArgument);

  const KvHandoff elsewhere = with_rows(good.rows, good.head_dim, bytes, other);
  auto layout = ImportSequence(&pool, elsewhere);
  EXPECT_EQ(layout.status().code(), absl::StatusCode::kFailedPrecondition) << layout.status();
  EXPECT_EQ(pool.pages_free(), free_before);

  layout = ImportSequence(&pool, *exported);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_TRUE(pool.Release(&*layout).ok());
  EXPECT_EQ(pool.pages_free(), free_before);
}

}  // namespace
}  // namespace kvgate::kv
