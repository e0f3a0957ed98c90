// KvPool on the CPU backend. A prefill cache filled with position-coded values
// (layer * 1e6 + kv_head * 1e4 + position * 10 + dim, exact in float32) is committed,
// appended to and compacted, and every row read back must hold exactly the value of its
// position; views carry the right indptr / ids / lengths; a randomised sequence over
// several sequences is checked against a std::map model. A bf16 pool is checked
// against a float32 pool run through the same operations: every row it holds is the
// float32 pool's row rounded to bf16, and its paged attention equals the float32 pool's
// over rows that were bf16 already.
#include "kv/kv_pool.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <tuple>

#include "cuda/bf16.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/model.h"
#include "engine/model_config.h"
#include "kv/kv_test_util.h"

namespace kvgate::kv {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using testing::CodedV;
using testing::CodedValue;
using testing::PlanOf;

// HeadPagedDecodeAttention vs dense Attention over the same rows: float32 sums of 16
// rows in a different order.
constexpr float kAttentionAtol = 1e-5f;

class KvPoolTest : public ::testing::Test {
 protected:
  static constexpr int32_t kLayers = 2, kHeads = 2, kQHeads = 4, kDim = 4, kCapacity = 40;

  void SetUp() override {
    auto model = engine::Model::CreateRandom(testing::SmallLlamaConfig(kLayers, kQHeads, kHeads, kDim), 1,
                                             backend_.get());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }

  // A prefill cache of `prompt` tokens (run through the model, so its length is right)
  // whose rows are then overwritten: coded values, or seeded random ones (rounded to bf16
  // with `bf16_exact`).
  std::unique_ptr<engine::KvCache> MakeCache(int32_t prompt, std::mt19937* random = nullptr, bool bf16_exact = false) {
    auto cache = model_->NewCache(kCapacity);
    EXPECT_TRUE(cache.ok()) << cache.status();
    if (prompt > 0) {
      std::vector<int32_t> tokens(prompt, 3);
      auto logits = model_->Forward(tokens, cache->get());
      EXPECT_TRUE(logits.ok()) << logits.status();
    }
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (int32_t l = 0; l < kLayers; ++l) {
      std::vector<float> k(kHeads * kCapacity * kDim), v(k.size());
      for (int32_t h = 0; h < kHeads; ++h) {
        for (int32_t p = 0; p < kCapacity; ++p) {
          for (int32_t d = 0; d < kDim; ++d) {
            const size_t i = (static_cast<size_t>(h) * kCapacity + p) * kDim + d;
            k[i] = random ? dist(*random) : CodedValue(l, h, p, d);
            v[i] = random ? dist(*random) : CodedV(l, h, p, d);
            if (bf16_exact) {
              k[i] = ops::RoundToBf16(k[i]);
              v[i] = ops::RoundToBf16(v[i]);
            }
          }
        }
      }
      EXPECT_TRUE(backend_->CopyToBackend((*cache)->k(l), k.data(), k.size() * 4).ok());
      EXPECT_TRUE(backend_->CopyToBackend((*cache)->v(l), v.data(), v.size() * 4).ok());
    }
    return std::move(*cache);
  }

  std::unique_ptr<KvPool> MakePool(int32_t num_pages, int32_t page_tokens,
                                   ops::KvDtype dtype = ops::KvDtype::kFloat32) {
    auto pool = KvPool::Create(backend_.get(), num_pages, page_tokens, kDim, dtype);
    EXPECT_TRUE(pool.ok()) << pool.status();
    return std::move(*pool);
  }

  // Backend rows [kHeads, kDim] of the decode token at `position` of `layer`.
  ops::DeviceBuffer NewRows(int32_t layer, int32_t position, bool v) {
    std::vector<float> host(kHeads * kDim);
    for (int32_t h = 0; h < kHeads; ++h) {
      for (int32_t d = 0; d < kDim; ++d) {
        host[h * kDim + d] = v ? CodedV(layer, h, position, d) : CodedValue(layer, h, position, d);
      }
    }
    auto buf = backend_->Alloc(host.size() * 4);
    EXPECT_TRUE(buf.ok());
    EXPECT_TRUE(backend_->CopyToBackend(buf->data(), host.data(), host.size() * 4).ok());
    return std::move(*buf);
  }

  // One full decode step of one sequence: reserve, then copy every layer.
  void DecodeStep(KvPool* pool, SequenceLayout* layout) {
    auto step = pool->ReserveDecodeStep(layout);
    ASSERT_TRUE(step.ok()) << step.status();
    for (int32_t l = 0; l < kLayers; ++l) {
      ops::DeviceBuffer k = NewRows(l, step->position, false), v = NewRows(l, step->position, true);
      ASSERT_TRUE(pool->AppendDecodeRows(*step, l, k.as<float>(), v.as<float>()).ok());
    }
  }

  // Every row of (layer, kv_head) holds the coded values of its position, the positions
  // are `positions`, and the backend mask bytes are `masks` (empty = all 0xFF).
  void ExpectHead(const KvPool& pool, const SequenceLayout& layout, int32_t l, int32_t h,
                  const std::vector<int32_t>& positions, std::vector<uint8_t> masks = {}) {
    SCOPED_TRACE(::testing::Message() << "layer " << l << " kv head " << h);
    auto rows = pool.ReadRows(layout, l, h);
    ASSERT_TRUE(rows.ok()) << rows.status();
    ASSERT_THAT(rows->positions, ElementsAreArray(positions));
    ASSERT_EQ(rows->k.size(), positions.size() * kDim);
    for (size_t r = 0; r < positions.size(); ++r) {
      for (int32_t d = 0; d < kDim; ++d) {
        ASSERT_EQ(rows->k[r * kDim + d], CodedValue(l, h, positions[r], d)) << "row " << r << " dim " << d;
        ASSERT_EQ(rows->v[r * kDim + d], CodedV(l, h, positions[r], d)) << "row " << r << " dim " << d;
      }
    }
    if (masks.empty()) masks.assign(positions.size(), kAllQueryHeads);
    EXPECT_THAT(rows->query_mask, ElementsAreArray(masks));
  }

  // Paged decode attention of one sequence's token (q: [kQHeads, kDim], backend) over
  // `layout`'s rows of `layer`, into out, scale 0.5.
  void PagedAttention(KvPool* pool, const SequenceLayout& layout, int32_t layer, const float* q, float* out) {
    const SequenceLayout* one[] = {&layout};
    auto view = pool->BuildView(one, layer);
    ASSERT_TRUE(view.ok()) << view.status();
    ops::HeadPagedDecodeAttentionArgs p;
    p.q = q;
    p.kv = *view;
    p.out = out;
    p.num_seqs = 1;
    p.num_q_heads = kQHeads;
    p.num_kv_heads = kHeads;
    p.scale = 0.5f;
    ASSERT_TRUE(backend_->HeadPagedDecodeAttention(p).ok());
  }

  std::unique_ptr<ops::Backend> backend_ = ops::CreateCpuBackend(2);
  std::unique_ptr<engine::Model> model_;
};

TEST_F(KvPoolTest, CommitCopiesExactRowsAndMasks) {
  auto cache = MakeCache(10);
  auto pool = MakePool(16, 3);
  gates::KeepPlan plan = PlanOf(kLayers, kHeads, 10, {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, {2, 9}, {}, {0, 5, 7, 8}});
  plan.at(1, 1).query_mask = {0x1, 0x3, 0x2, 0x0};
  SequenceLayout layout;
  ASSERT_TRUE(pool->CommitPrefill(*cache, plan, &layout).ok());
  EXPECT_EQ(pool->pages_used(), 4 + 1 + 0 + 2);
  EXPECT_EQ(pool->pages_free(), 16 - 7);
  EXPECT_EQ(layout.next_pos, 10);
  ExpectHead(*pool, layout, 0, 0, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9});
  ExpectHead(*pool, layout, 0, 1, {2, 9});
  ExpectHead(*pool, layout, 1, 0, {});
  ExpectHead(*pool, layout, 1, 1, {0, 5, 7, 8}, {0x1, 0x3, 0x2, 0x0});
  ASSERT_TRUE(pool->Release(&layout).ok());
  EXPECT_EQ(pool->pages_used(), 0);
}

TEST_F(KvPoolTest, CommitErrorsLeakNothing) {
  auto cache = MakeCache(6);
  auto pool = MakePool(4, 2);
  SequenceLayout layout;
  // Prompt length disagrees with the cache.
  EXPECT_EQ(pool->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 5), &layout).code(),
            absl::StatusCode::kInvalidArgument);
  // 4 heads x 3 pages > 4 pages.
  EXPECT_EQ(pool->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 6), &layout).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(pool->pages_used(), 0);
  EXPECT_TRUE(layout.heads.empty());
  ASSERT_TRUE(pool->CommitPrefill(*cache, PlanOf(kLayers, kHeads, 6, {{0}, {1}, {2}, {3}}), &layout).ok());
  SequenceLayout copy = layout;
  EXPECT_EQ(pool->CommitPrefill(*cache, PlanOf(kLayers, kHeads, 6, {{0}, {1}, {2}, {3}}), &layout).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(layout.AllPages(), copy.AllPages());
  EXPECT_EQ(pool->pages_used(), 4);
}

TEST_F(KvPoolTest, DecodeAppendsAcrossPageBoundaries) {
  auto cache = MakeCache(5);
  auto pool = MakePool(32, 4);
  SequenceLayout layout;
  ASSERT_TRUE(pool->CommitPrefill(*cache, PlanOf(kLayers, kHeads, 5, {{0, 1, 2, 3}, {4}, {}, {1, 3}}), &layout)
                  .ok());
  for (int i = 0; i < 6; ++i) {
    DecodeStep(pool.get(), &layout);
    ASSERT_FALSE(HasFatalFailure());
  }
  EXPECT_EQ(layout.next_pos, 11);
  ExpectHead(*pool, layout, 0, 0, {0, 1, 2, 3, 5, 6, 7, 8, 9, 10});
  ExpectHead(*pool, layout, 0, 1, {4, 5, 6, 7, 8, 9, 10});
  ExpectHead(*pool, layout, 1, 0, {5, 6, 7, 8, 9, 10});
  ExpectHead(*pool, layout, 1, 1, {1, 3, 5, 6, 7, 8, 9, 10});
  EXPECT_EQ(pool->pages_used(), 3 + 2 + 2 + 2);
}

TEST_F(KvPoolTest, MaskedDecodeRowsAreVisibleToAll) {
  auto cache = MakeCache(3);
  auto pool = MakePool(16, 2);
  gates::KeepPlan plan = PlanOf(kLayers, kHeads, 3, {{0}, {1}, {2}, {0, 1, 2}});
  for (gates::HeadKeep& h : plan.heads) h.query_mask.assign(h.positions.size(), 0x5);
  SequenceLayout layout;
  ASSERT_TRUE(pool->CommitPrefill(*cache, plan, &layout).ok());
  DecodeStep(pool.get(), &layout);
  DecodeStep(pool.get(), &layout);
  ASSERT_FALSE(HasFatalFailure());
  ExpectHead(*pool, layout, 1, 1, {0, 1, 2, 3, 4}, {0x5, 0x5, 0x5, 0xFF, 0xFF});
  ExpectHead(*pool, layout, 0, 0, {0, 3, 4}, {0x5, 0xFF, 0xFF});
  // Pages reused after a masked sequence leave no trace of its masks.
  ASSERT_TRUE(pool->Release(&layout).ok());
  ASSERT_TRUE(pool->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 3), &layout).ok());
  DecodeStep(pool.get(), &layout);
  ASSERT_FALSE(HasFatalFailure());
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int32_t h = 0; h < kHeads; ++h) ExpectHead(*pool, layout, l, h, {0, 1, 2, 3});
  }
}

TEST_F(KvPoolTest, CompactionKeepsExactRows) {
  auto cache = MakeCache(12);
  auto pool = MakePool(40, 3);
  SequenceLayout layout;
  ASSERT_TRUE(pool->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 12), &layout).ok());
  DecodeStep(pool.get(), &layout);
  ASSERT_FALSE(HasFatalFailure());
  ASSERT_EQ(pool->pages_used(), 4 * 5);  // 13 rows per head
  const std::vector<int32_t> all = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  gates::KeepPlan keep = PlanOf(kLayers, kHeads, 12, {{0, 1, 11, 12}, all, {}, {5}});
  keep.at(1, 1).query_mask = {0x2};
  auto freed = pool->Compact(&layout, keep);
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, (5 - 2) + 0 + 5 + (5 - 1));
  EXPECT_EQ(pool->pages_used(), 2 + 5 + 0 + 1);
  ExpectHead(*pool, layout, 0, 0, {0, 1, 11, 12}, {0xFF, 0xFF, 0xFF, 0xFF});
  ExpectHead(*pool, layout, 0, 1, all, std::vector<uint8_t>(all.size(), 0xFF));
  ExpectHead(*pool, layout, 1, 0, {});
  ExpectHead(*pool, layout, 1, 1, {5}, {0x2});
  // Decode continues at the uncompacted position.
  DecodeStep(pool.get(), &layout);
  ASSERT_FALSE(HasFatalFailure());
  ExpectHead(*pool, layout, 0, 0, {0, 1, 11, 12, 13});
  ExpectHead(*pool, layout, 1, 0, {13});
  ExpectHead(*pool, layout, 1, 1, {5, 13}, {0x2, 0xFF});
  // An invalid keep set changes nothing.
  const std::vector<int32_t> pages = layout.AllPages();
  EXPECT_EQ(pool->Compact(&layout, PlanOf(kLayers, kHeads, 12, {{0, 2}, {}, {}, {}})).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(layout.AllPages(), pages);
  EXPECT_EQ(pool->pages_used(), static_cast<int32_t>(pages.size()));
}

TEST_F(KvPoolTest, BuildViewUploadsIndptrIdsLengths) {
  auto cache = MakeCache(7);
  auto pool = MakePool(32, 2);
  SequenceLayout a, b;
  ASSERT_TRUE(pool->CommitPrefill(*cache, PlanOf(kLayers, kHeads, 7, {{0, 1, 2}, {6}, {0}, {}}), &a).ok());
  gates::KeepPlan plan_b = PlanOf(kLayers, kHeads, 7, {{}, {0, 1, 2, 3, 4}, {1, 2}, {3}});
  plan_b.at(1, 0).query_mask = {0x1, 0x2};
  ASSERT_TRUE(pool->CommitPrefill(*cache, plan_b, &b).ok());
  // a: pages 0,1 | 2 | 3 | -   b: - | 4,5,6 | 7 | 8
  ASSERT_THAT(a.AllPages(), ElementsAre(0, 1, 2, 3));
  ASSERT_THAT(b.AllPages(), ElementsAre(4, 5, 6, 7, 8));

  auto read = [&](const int32_t* dev, size_t n) {
    std::vector<int32_t> host(n);
    EXPECT_TRUE(backend_->CopyToHost(host.data(), dev, n * 4).ok());
    return host;
  };
  const SequenceLayout* batch[] = {&a, &b};
  auto view = pool->BuildView(batch, 0);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_THAT(read(view->page_indptr, 5), ElementsAre(0, 2, 3, 3, 6));
  EXPECT_THAT(read(view->page_ids, 6), ElementsAre(0, 1, 2, 4, 5, 6));
  EXPECT_THAT(read(view->lengths, 4), ElementsAre(3, 1, 0, 5));
  EXPECT_EQ(view->k_pages, pool->k_pages());
  EXPECT_EQ(view->v_pages, pool->v_pages());
  EXPECT_EQ(view->query_masks, pool->query_masks());  // b carries masks
  EXPECT_EQ(view->page_tokens, 2);
  EXPECT_EQ(view->head_dim, kDim);

  view = pool->BuildView(batch, 1);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_THAT(read(view->page_indptr, 5), ElementsAre(0, 1, 1, 2, 3));
  EXPECT_THAT(read(view->page_ids, 3), ElementsAre(3, 7, 8));
  EXPECT_THAT(read(view->lengths, 4), ElementsAre(1, 0, 2, 1));

  const SequenceLayout* only_a[] = {&a};
  view = pool->BuildView(only_a, 1);
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_EQ(view->query_masks, nullptr);
  EXPECT_EQ(pool->BuildView(only_a, 2).status().code(), absl::StatusCode::kInvalidArgument);
  SequenceLayout empty;
  const SequenceLayout* with_empty[] = {&a, &empty};
  EXPECT_EQ(pool->BuildView(with_empty, 0).status().code(), absl::StatusCode::kInvalidArgument);

  // Every layer in one upload: the same tables as the views of one layer each.
  auto views = pool->BuildViews(batch);
  ASSERT_TRUE(views.ok()) << views.status();
  ASSERT_EQ(views->size(), static_cast<size_t>(kLayers));
  EXPECT_THAT(read((*views)[0].page_indptr, 5), ElementsAre(0, 2, 3, 3, 6));
  EXPECT_THAT(read((*views)[0].page_ids, 6), ElementsAre(0, 1, 2, 4, 5, 6));
  EXPECT_THAT(read((*views)[0].lengths, 4), ElementsAre(3, 1, 0, 5));
  EXPECT_THAT(read((*views)[1].page_indptr, 5), ElementsAre(0, 1, 1, 2, 3));
  EXPECT_THAT(read((*views)[1].page_ids, 3), ElementsAre(3, 7, 8));
  EXPECT_THAT(read((*views)[1].lengths, 4), ElementsAre(1, 0, 2, 1));
  for (const ops::HeadPagedKvView& v : *views) {
    EXPECT_EQ(v.k_pages, pool->k_pages());
    EXPECT_EQ(v.query_masks, pool->query_masks());
    EXPECT_EQ(v.page_tokens, 2);
    EXPECT_EQ(v.head_dim, kDim);
  }
  EXPECT_EQ(pool->BuildViews(with_empty).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(KvPoolTest, BatchedAppendMatchesPerSequence) {
  auto cache = MakeCache(4);
  auto pool = MakePool(32, 2);
  SequenceLayout a, b;
  ASSERT_TRUE(pool->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 4), &a).ok());
  ASSERT_TRUE(pool->CommitPrefill(*cache, PlanOf(kLayers, kHeads, 4, {{1}, {2}, {3}, {}}), &b).ok());
  ASSERT_TRUE(pool->Compact(&b, PlanOf(kLayers, kHeads, 4, {{1}, {}, {3}, {}})).ok());
  DecodeStep(pool.get(), &b);  // b at position 5 next, a at 4
  ASSERT_FALSE(HasFatalFailure());
  auto step_a = pool->ReserveDecodeStep(&a);
  auto step_b = pool->ReserveDecodeStep(&b);
  ASSERT_TRUE(step_a.ok() && step_b.ok());
  const AppendPlan* steps[] = {&*step_a, &*step_b};
  for (int32_t l = 0; l < kLayers; ++l) {
    // [2 seqs, kHeads, kDim]: a's token at position 4, b's at 5.
    const auto [k, v] = testing::CodedRowsAt(l, {step_a->position, step_b->position}, kHeads, kDim);
    auto kb = backend_->Alloc(k.size() * 4), vb = backend_->Alloc(v.size() * 4);
    ASSERT_TRUE(kb.ok() && vb.ok());
    ASSERT_TRUE(backend_->CopyToBackend(kb->data(), k.data(), k.size() * 4).ok());
    ASSERT_TRUE(backend_->CopyToBackend(vb->data(), v.data(), v.size() * 4).ok());
    ASSERT_TRUE(pool->AppendDecodeRows(steps, l, kb->as<float>(), vb->as<float>()).ok());
  }
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int32_t h = 0; h < kHeads; ++h) ExpectHead(*pool, a, l, h, {0, 1, 2, 3, 4});
  }
  ExpectHead(*pool, b, 0, 0, {1, 4, 5});
  ExpectHead(*pool, b, 0, 1, {4, 5});
  ExpectHead(*pool, b, 1, 0, {3, 4, 5});
  ExpectHead(*pool, b, 1, 1, {4, 5});
  EXPECT_EQ(pool->AppendDecodeRows(steps, kLayers, nullptr, nullptr).code(), absl::StatusCode::kInvalidArgument);
}

// The view is what the decode kernel reads: with every row kept, paged decode
// attention of the last prompt token equals dense attention over the contiguous cache.
TEST_F(KvPoolTest, PagedAttentionOverViewEqualsDenseAttention) {
  constexpr int32_t kPrompt = 11;
  std::mt19937 rng(5);
  auto cache = MakeCache(kPrompt, &rng);
  auto pool = MakePool(64, 3);
  SequenceLayout layout;
  ASSERT_TRUE(pool->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, kPrompt), &layout).ok());
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(kQHeads * kDim);
  for (float& x : q) x = dist(rng);
  auto qb = backend_->Alloc(q.size() * 4), dense = backend_->Alloc(q.size() * 4),
       paged = backend_->Alloc(q.size() * 4);
  ASSERT_TRUE(qb.ok() && dense.ok() && paged.ok());
  ASSERT_TRUE(backend_->CopyToBackend(qb->data(), q.data(), q.size() * 4).ok());
  for (int32_t l = 0; l < kLayers; ++l) {
    ops::AttentionArgs d;
    d.q = qb->as<float>();
    d.k_cache = cache->k(l);
    d.v_cache = cache->v(l);
    d.out = dense->as<float>();
    d.num_tokens = 1;
    d.num_q_heads = kQHeads;
    d.num_kv_heads = kHeads;
    d.head_dim = kDim;
    d.capacity_tokens = kCapacity;
    d.q_start_row = kPrompt - 1;
    d.scale = 0.5f;
    ASSERT_TRUE(backend_->Attention(d).ok());
    PagedAttention(pool.get(), layout, l, qb->as<float>(), paged->as<float>());
    ASSERT_FALSE(HasFatalFailure());
    std::vector<float> want(q.size()), got(q.size());
    ASSERT_TRUE(backend_->CopyToHost(want.data(), dense->data(), want.size() * 4).ok());
    ASSERT_TRUE(backend_->CopyToHost(got.data(), paged->data(), got.size() * 4).ok());
    for (size_t i = 0; i < q.size(); ++i) EXPECT_NEAR(got[i], want[i], kAttentionAtol) << "layer " << l << " i " << i;
  }
}

// Random commit / decode / compact / release over several sequences on the CPU
// backend, against a std::map of (sequence, layer, kv head) -> (position, k, v, mask
// byte) rows. Masked and unmasked sequences share pages over time, so stale mask bytes
// of a page's previous owner would show.
TEST_F(KvPoolTest, RandomOpsMatchMapModel) {
  constexpr int kSeqs = 3;
  constexpr int32_t kPt = 3;
  using Row = std::tuple<int32_t, float, float, uint8_t>;  // position, k[0], v[0], mask
  for (uint32_t seed : {11u, 12u}) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    std::mt19937 rng(seed);
    auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    auto pool = MakePool(30, kPt);
    SequenceLayout layouts[kSeqs];
    std::map<std::tuple<int, int32_t, int32_t>, std::vector<Row>> model;
    int ok_ops = 0, failed_ops = 0;
    for (int step = 0; step < 200; ++step) {
      SCOPED_TRACE(::testing::Message() << "step " << step);
      const int s = uniform(0, kSeqs - 1);
      SequenceLayout& layout = layouts[s];
      const int kind = layout.heads.empty() ? 0 : uniform(1, 12);
      if (kind == 0) {
        const int32_t prompt = uniform(1, 16);
        auto cache = MakeCache(prompt);
        std::vector<int32_t> all(prompt);
        for (int32_t i = 0; i < prompt; ++i) all[i] = i;
        gates::KeepPlan plan{kLayers, kHeads, prompt, {}};
        const bool masks = uniform(0, 1) == 1;
        for (int32_t i = 0; i < kLayers * kHeads; ++i) {
          gates::HeadKeep keep{testing::RandomSubset(all, uniform(0, prompt), rng), {}, {}};
          if (masks) {
            for (size_t r = 0; r < keep.positions.size(); ++r) keep.query_mask.push_back(uniform(0, 255));
          }
          plan.heads.push_back(std::move(keep));
        }
        absl::Status st = pool->CommitPrefill(*cache, plan, &layout);
        if (!st.ok()) {
          ASSERT_EQ(st.code(), absl::StatusCode::kResourceExhausted) << st;
          ++failed_ops;
        } else {
          for (int32_t l = 0; l < kLayers; ++l) {
            for (int32_t h = 0; h < kHeads; ++h) {
              std::vector<Row>& rows = model[{s, l, h}];
              rows.clear();
              const gates::HeadKeep& keep = plan.at(l, h);
              for (size_t r = 0; r < keep.positions.size(); ++r) {
                const int32_t p = keep.positions[r];
                rows.emplace_back(p, CodedValue(l, h, p, 0), CodedV(l, h, p, 0),
                                  masks ? keep.query_mask[r] : kAllQueryHeads);
              }
            }
          }
          ++ok_ops;
        }
      } else if (kind <= 6) {
        const int32_t p = layout.next_pos;
        auto reserved = pool->ReserveDecodeStep(&layout);
        if (!reserved.ok()) {
          ASSERT_EQ(reserved.status().code(), absl::StatusCode::kResourceExhausted) << reserved.status();
          ASSERT_EQ(layout.next_pos, p);
          ++failed_ops;
        } else {
          for (int32_t l = 0; l < kLayers; ++l) {
            ops::DeviceBuffer k = NewRows(l, p, false), v = NewRows(l, p, true);
            ASSERT_TRUE(pool->AppendDecodeRows(*reserved, l, k.as<float>(), v.as<float>()).ok());
            for (int32_t h = 0; h < kHeads; ++h) {
              model[{s, l, h}].emplace_back(p, CodedValue(l, h, p, 0), CodedV(l, h, p, 0), kAllQueryHeads);
            }
          }
          ++ok_ops;
        }
      } else if (kind <= 9) {
        std::vector<std::vector<int32_t>> current;
        for (const HeadPages& hp : layout.heads) current.push_back(hp.positions);
        gates::KeepPlan keep =
            testing::RandomKeep(kLayers, kHeads, layout.next_pos, current, uniform(0, 10) / 10.0, rng);
        const int32_t used = pool->pages_used();
        auto freed = pool->Compact(&layout, keep);
        if (!freed.ok()) {
          ASSERT_EQ(freed.status().code(), absl::StatusCode::kResourceExhausted) << freed.status();
          ASSERT_EQ(pool->pages_used(), used);
          ++failed_ops;
        } else {
          ASSERT_EQ(pool->pages_used(), used - *freed);
          for (int32_t l = 0; l < kLayers; ++l) {
            for (int32_t h = 0; h < kHeads; ++h) {
              const std::vector<int32_t>& kept = keep.at(l, h).positions;
              std::vector<Row>& rows = model[{s, l, h}];
              std::erase_if(rows, [&](const Row& r) {
                return !std::binary_search(kept.begin(), kept.end(), std::get<0>(r));
              });
            }
          }
          ++ok_ops;
        }
      } else if (kind == 10) {
        ASSERT_TRUE(pool->Release(&layout).ok());
        for (int32_t l = 0; l < kLayers; ++l) {
          for (int32_t h = 0; h < kHeads; ++h) model.erase({s, l, h});
        }
        ++ok_ops;
      } else {
        // Decode-time drops: a ring's (the row after two sinks), or random rows; in place
        // or by compaction, as DropRows picks.
        const bool ring = kind == 11;
        RowDrops drops(layout.heads.size());
        for (size_t i = 0; i < layout.heads.size(); ++i) {
          const int32_t length = layout.heads[i].length;
          for (int32_t r = 0; r < length; ++r) {
            if (ring ? (r == 2 && length > 3) : uniform(0, 3) == 0) drops[i].push_back(r);
          }
        }
        SequenceLayout* batch[] = {&layout};
        ASSERT_TRUE(pool->DropRows(batch, absl::MakeConstSpan(&drops, 1)).ok());
        for (int32_t l = 0; l < kLayers; ++l) {
          for (int32_t h = 0; h < kHeads; ++h) {
            const std::vector<int32_t>& dropped = drops[static_cast<size_t>(l) * kHeads + h];
            std::vector<Row>& rows = model[{s, l, h}];
            std::vector<Row> kept;
            for (size_t r = 0; r < rows.size(); ++r) {
              if (!std::binary_search(dropped.begin(), dropped.end(), static_cast<int32_t>(r))) kept.push_back(rows[r]);
            }
            rows = std::move(kept);
          }
        }
        ++ok_ops;
      }
      // Check every sequence against the model and account for every page.
      std::set<int32_t> pages;
      for (int q = 0; q < kSeqs; ++q) {
        ASSERT_TRUE(layouts[q].CheckInvariants().ok()) << layouts[q].CheckInvariants();
        for (int32_t page : layouts[q].AllPages()) ASSERT_TRUE(pages.insert(page).second) << "page " << page;
        if (layouts[q].heads.empty()) continue;
        for (int32_t l = 0; l < kLayers; ++l) {
          for (int32_t h = 0; h < kHeads; ++h) {
            auto rows = pool->ReadRows(layouts[q], l, h);
            ASSERT_TRUE(rows.ok()) << rows.status();
            std::vector<Row> actual;
            for (size_t r = 0; r < rows->positions.size(); ++r) {
              actual.emplace_back(rows->positions[r], rows->k[r * kDim], rows->v[r * kDim], rows->query_mask[r]);
              for (int32_t d = 0; d < kDim; ++d) {
                ASSERT_EQ(rows->k[r * kDim + d], CodedValue(l, h, rows->positions[r], d));
              }
            }
            ASSERT_EQ(actual, (model[{q, l, h}])) << "seq " << q << " layer " << l << " head " << h;
          }
        }
      }
      ASSERT_EQ(static_cast<int32_t>(pages.size()), pool->pages_used());
      ASSERT_EQ(pool->pages_used() + pool->pages_free(), pool->num_pages());
    }
    for (SequenceLayout& layout : layouts) ASSERT_TRUE(pool->Release(&layout).ok());
    EXPECT_EQ(pool->pages_used(), 0);
    EXPECT_GT(ok_ops, 100);
    EXPECT_GT(failed_ops, 0);
  }
}

// A ring (two sinks, then the newest rows) over many decode steps: each step drops the
// oldest non-sink row in place, which widens the gap after the sinks (nothing moves) and
// frees each page the gap covers; the rows, the gather, the page count and paged
// attention stay those of the same rows committed afresh. A malformed drop changes
// nothing.
TEST_F(KvPoolTest, InPlaceDropsOfARingKeepExactRows) {
  constexpr int32_t kPrompt = 9, kPt = 4, kSinks = 2, kRing = 7;
  auto cache = MakeCache(kPrompt);
  auto pool = MakePool(64, kPt);
  SequenceLayout layout;
  ASSERT_TRUE(pool->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, kPrompt), &layout).ok());
  auto qb = backend_->Alloc(kQHeads * kDim * 4), got = backend_->Alloc(kQHeads * kDim * 4),
       want = backend_->Alloc(kQHeads * kDim * 4);
  ASSERT_TRUE(qb.ok() && got.ok() && want.ok());
  std::vector<float> q(kQHeads * kDim);
  for (size_t i = 0; i < q.size(); ++i) q[i] = 1e-6f * static_cast<float>(i % 7);
  ASSERT_TRUE(backend_->CopyToBackend(qb->data(), q.data(), q.size() * 4).ok());
  bool gap_seen = false;
  for (int step = 0; step < 23; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    DecodeStep(pool.get(), &layout);
    ASSERT_FALSE(HasFatalFailure());
    RowDrops drops(layout.heads.size());
    for (size_t i = 0; i < drops.size(); ++i) {
      for (int32_t r = kSinks; r < layout.heads[i].length - kRing; ++r) drops[i].push_back(r);
    }
    const int32_t used = pool->pages_used();
    SequenceLayout* batch[] = {&layout};
    ASSERT_TRUE(pool->DropRows(batch, absl::MakeConstSpan(&drops, 1)).ok());
    ASSERT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
    EXPECT_LE(pool->pages_used(), used);
    gap_seen |= layout.heads[0].gap_slots != 0;
    std::vector<int32_t> want_positions = {0, 1};
    for (int32_t p = std::max(kSinks, layout.next_pos - kRing); p < layout.next_pos; ++p) want_positions.push_back(p);
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int32_t h = 0; h < kHeads; ++h) ExpectHead(*pool, layout, l, h, want_positions);
    }
    ASSERT_FALSE(HasFatalFailure());
    int64_t pages = 0;
    for (const HeadPages& hp : layout.heads) {
      pages += (hp.first_slot + hp.gap_slots + hp.length + kPt - 1) / kPt;
      EXPECT_LE(hp.page_ids.size(), (kSinks + kRing + kPt - 1) / kPt + 2);
    }
    EXPECT_EQ(pool->pages_used(), pages);

    // The same rows committed afresh (first slot 0): equal gathers, equal attention.
    std::vector<HeadRows> host;
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int32_t h = 0; h < kHeads; ++h) host.push_back(*pool->ReadRows(layout, l, h));
    }
    gates::KeepPlan plan{kLayers, kHeads, layout.next_pos, {}};
    for (const HeadRows& rows : host) plan.heads.push_back(gates::HeadKeep{rows.positions, {}, {}});
    SequenceLayout fresh;
    ASSERT_TRUE(pool->CommitHostRows(plan, host, &fresh).ok());
    auto gathered = pool->GatherRows(layout), gathered_fresh = pool->GatherRows(fresh);
    ASSERT_TRUE(gathered.ok() && gathered_fresh.ok());
    ASSERT_EQ(gathered->rows, gathered_fresh->rows);
    std::vector<float> a(gathered->rows * kDim), b(a.size());
    ASSERT_TRUE(backend_->CopyToHost(a.data(), gathered->k.data(), a.size() * 4).ok());
    ASSERT_TRUE(backend_->CopyToHost(b.data(), gathered_fresh->k.data(), b.size() * 4).ok());
    EXPECT_EQ(a, b);
    for (int32_t l = 0; l < kLayers; ++l) {
      PagedAttention(pool.get(), layout, l, qb->as<float>(), got->as<float>());
      PagedAttention(pool.get(), fresh, l, qb->as<float>(), want->as<float>());
      ASSERT_FALSE(HasFatalFailure());
      std::vector<float> x(q.size()), y(q.size());
      ASSERT_TRUE(backend_->CopyToHost(x.data(), got->data(), x.size() * 4).ok());
      ASSERT_TRUE(backend_->CopyToHost(y.data(), want->data(), y.size() * 4).ok());
      EXPECT_EQ(x, y) << "layer " << l;
    }
    ASSERT_TRUE(pool->Release(&fresh).ok());
  }
  EXPECT_TRUE(gap_seen);
  // Drops that do not fit the layout are refused before anything moves.
  const SequenceLayout before = layout;
  RowDrops bad(layout.heads.size());
  bad[1] = {3, 2};
  SequenceLayout* batch[] = {&layout};
  EXPECT_EQ(pool->DropRows(batch, absl::MakeConstSpan(&bad, 1)).code(), absl::StatusCode::kInvalidArgument);
  bad[1] = {layout.heads[1].length};
  EXPECT_EQ(pool->DropRows(batch, absl::MakeConstSpan(&bad, 1)).code(), absl::StatusCode::kInvalidArgument);
  bad.pop_back();
  EXPECT_EQ(pool->DropRows(batch, absl::MakeConstSpan(&bad, 1)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(layout.AllPages(), before.AllPages());
  EXPECT_EQ(layout.heads[1].positions, before.heads[1].positions);
  ASSERT_TRUE(pool->Release(&layout).ok());
  EXPECT_EQ(pool->pages_used(), 0);
}

// Every (layer, kv head) of `narrow` holds `wide`'s rows rounded to bf16, with the same
// positions and mask bytes.
void ExpectRoundedRows(const KvPool& wide, const SequenceLayout& wide_layout, const KvPool& narrow,
                       const SequenceLayout& narrow_layout) {
  ASSERT_EQ(wide_layout.num_layers, narrow_layout.num_layers);
  for (int32_t l = 0; l < wide_layout.num_layers; ++l) {
    for (int32_t h = 0; h < wide_layout.num_kv_heads; ++h) {
      SCOPED_TRACE(::testing::Message() << "layer " << l << " kv head " << h);
      auto want = wide.ReadRows(wide_layout, l, h);
      auto got = narrow.ReadRows(narrow_layout, l, h);
      ASSERT_TRUE(want.ok() && got.ok());
      ASSERT_EQ(got->positions, want->positions);
      ASSERT_EQ(got->query_mask, want->query_mask);
      ASSERT_EQ(got->k.size(), want->k.size());
      for (size_t i = 0; i < want->k.size(); ++i) {
        ASSERT_EQ(got->k[i], ops::RoundToBf16(want->k[i])) << "K element " << i;
        ASSERT_EQ(got->v[i], ops::RoundToBf16(want->v[i])) << "V element " << i;
      }
    }
  }
}

// Commit (with masks), decode appends across page boundaries, compaction, gather and the
// two imports, on a bf16 pool and a float32 pool side by side.
TEST_F(KvPoolTest, Bf16PoolHoldsTheRoundedRowsOfAFloat32Pool) {
  constexpr int32_t kPrompt = 13;
  std::mt19937 rng(21);
  auto cache = MakeCache(kPrompt, &rng);
  auto wide = MakePool(64, 3);
  auto narrow = MakePool(64, 3, ops::KvDtype::kBf16);
  EXPECT_EQ(narrow->dtype(), ops::KvDtype::kBf16);
  EXPECT_EQ(narrow->row_bytes(), kDim * 2u);
  EXPECT_EQ(wide->row_bytes(), kDim * 4u);
  gates::KeepPlan plan = PlanOf(kLayers, kHeads, kPrompt, {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, {2, 9, 12},
                                                          {12}, {0, 5, 7, 8, 12}});
  plan.at(1, 1).query_mask = {0x1, 0x3, 0x2, 0x0, 0xF};
  SequenceLayout wide_layout, narrow_layout;
  ASSERT_TRUE(wide->CommitPrefill(*cache, plan, &wide_layout).ok());
  ASSERT_TRUE(narrow->CommitPrefill(*cache, plan, &narrow_layout).ok());
  ExpectRoundedRows(*wide, wide_layout, *narrow, narrow_layout);
  for (int step = 0; step < 5; ++step) {
    DecodeStep(wide.get(), &wide_layout);
    DecodeStep(narrow.get(), &narrow_layout);
  }
  ExpectRoundedRows(*wide, wide_layout, *narrow, narrow_layout);
  std::vector<std::vector<int32_t>> current;
  for (const HeadPages& hp : wide_layout.heads) current.push_back(hp.positions);
  const gates::KeepPlan keep = testing::RandomKeep(kLayers, kHeads, wide_layout.next_pos, current, 0.5, rng);
  ASSERT_TRUE(wide->Compact(&wide_layout, keep).ok());
  ASSERT_TRUE(narrow->Compact(&narrow_layout, keep).ok());
  ExpectRoundedRows(*wide, wide_layout, *narrow, narrow_layout);

  // Gathered bf16 rows land in a float32 pool widened, and in a bf16 pool unchanged.
  auto gathered = narrow->GatherRows(narrow_layout);
  ASSERT_TRUE(gathered.ok()) << gathered.status();
  EXPECT_EQ(gathered->dtype, ops::KvDtype::kBf16);
  gates::KeepPlan import_plan{kLayers, kHeads, narrow_layout.next_pos, {}};
  std::vector<HeadRows> host_rows;
  for (int32_t l = 0; l < kLayers; ++l) {
    for (int32_t h = 0; h < kHeads; ++h) {
      const HeadPages& hp = narrow_layout.at(l, h);
      import_plan.heads.push_back({hp.positions, hp.query_mask, {}});
      auto rows = wide->ReadRows(wide_layout, l, h);
      ASSERT_TRUE(rows.ok());
      host_rows.push_back(*std::move(rows));
    }
  }
  auto other_wide = MakePool(64, 3);
  auto other_narrow = MakePool(64, 3, ops::KvDtype::kBf16);
  SequenceLayout from_backend_wide, from_backend_narrow, from_host_narrow;
  ASSERT_TRUE(other_wide->CommitBackendRows(import_plan, *gathered, &from_backend_wide).ok());
  ASSERT_TRUE(other_narrow->CommitBackendRows(import_plan, *gathered, &from_backend_narrow).ok());
  ExpectRoundedRows(*wide, wide_layout, *other_wide, from_backend_wide);
  ExpectRoundedRows(*wide, wide_layout, *other_narrow, from_backend_narrow);
  ASSERT_TRUE(other_narrow->Release(&from_backend_narrow).ok());
  // Host (float32) rows are rounded as they land.
  ASSERT_TRUE(other_narrow->CommitHostRows(import_plan, host_rows, &from_host_narrow).ok());
  ExpectRoundedRows(*wide, wide_layout, *other_narrow, from_host_narrow);
  // Backend rows too short for the plan in their own dtype are refused.
  BackendRows short_rows;
  short_rows.backend = gathered->backend;
  short_rows.rows = gathered->rows;
  short_rows.head_dim = gathered->head_dim;
  short_rows.dtype = ops::KvDtype::kFloat32;  // claims 4 bytes an element over 2-byte buffers
  short_rows.k = std::move(gathered->k);
  short_rows.v = std::move(gathered->v);
  SequenceLayout refused;
  EXPECT_EQ(other_wide->CommitBackendRows(import_plan, short_rows, &refused).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(refused.heads.empty());
  for (auto [pool, layout] : {std::pair{wide.get(), &wide_layout}, {narrow.get(), &narrow_layout},
                              {other_wide.get(), &from_backend_wide}, {other_narrow.get(), &from_host_narrow}}) {
    ASSERT_TRUE(pool->Release(layout).ok());
    EXPECT_EQ(pool->pages_used(), 0);
  }
}

// Paged decode attention over a bf16 pool equals it over a float32 pool, bit for bit,
// when the rows were bf16 values to begin with (the widening is exact).
TEST_F(KvPoolTest, Bf16PagedAttentionEqualsFloat32OverBf16ExactRows) {
  constexpr int32_t kPrompt = 11;
  std::mt19937 rng(6);
  auto cache = MakeCache(kPrompt, &rng, /*bf16_exact=*/true);
  auto wide = MakePool(64, 3);
  auto narrow = MakePool(64, 3, ops::KvDtype::kBf16);
  SequenceLayout wide_layout, narrow_layout;
  gates::KeepPlan plan = PlanOf(kLayers, kHeads, kPrompt, {{0, 3, 4, 10}, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, {10},
                                                          {0, 9, 10}});
  plan.at(0, 1).query_mask = {0x1, 0x3, 0x2, 0xC, 0x5, 0x1, 0x2, 0x4, 0x8, 0xF};
  ASSERT_TRUE(wide->CommitPrefill(*cache, plan, &wide_layout).ok());
  ASSERT_TRUE(narrow->CommitPrefill(*cache, plan, &narrow_layout).ok());
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> q(kQHeads * kDim);
  for (float& x : q) x = dist(rng);
  auto qb = backend_->Alloc(q.size() * 4);
  ASSERT_TRUE(qb.ok());
  ASSERT_TRUE(backend_->CopyToBackend(qb->data(), q.data(), q.size() * 4).ok());
  for (int32_t l = 0; l < kLayers; ++l) {
    std::vector<float> outs[2];
    for (int i = 0; i < 2; ++i) {
      KvPool* pool = i == 0 ? wide.get() : narrow.get();
      const SequenceLayout* batch[] = {i == 0 ? &wide_layout : &narrow_layout};
      auto view = pool->BuildView(batch, l);
      ASSERT_TRUE(view.ok()) << view.status();
      EXPECT_EQ(view->dtype, pool->dtype());
      auto out = backend_->Alloc(q.size() * 4);
      ASSERT_TRUE(out.ok());
      ASSERT_TRUE(backend_->HeadPagedDecodeAttention({qb->as<float>(), *view, out->as<float>(), 1, kQHeads, kHeads, 0.5f})
                      .ok());
      outs[i].resize(q.size());
      ASSERT_TRUE(backend_->CopyToHost(outs[i].data(), out->data(), q.size() * 4).ok());
    }
    EXPECT_EQ(outs[0], outs[1]) << "layer " << l;
  }
  ASSERT_TRUE(wide->Release(&wide_layout).ok());
  ASSERT_TRUE(narrow->Release(&narrow_layout).ok());
}

TEST(KvPoolCreateTest, ParsesKvCacheDtype) {
  EXPECT_EQ(*ParseKvCacheDtype("auto"), std::nullopt);
  EXPECT_EQ(*ParseKvCacheDtype("float32"), ops::KvDtype::kFloat32);
  EXPECT_EQ(*ParseKvCacheDtype("bf16"), ops::KvDtype::kBf16);
  const auto bad = ParseKvCacheDtype("fp8");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), ::testing::HasSubstr("--kv-cache-dtype"));
  auto cpu = ops::CreateCpuBackend(1);
  EXPECT_EQ(KvPool::AutoDtype(*cpu), ops::KvDtype::kFloat32);  // the CPU stays bit for bit float32
  EXPECT_EQ(KvPool::Create(cpu.get(), 8, 4, 2, static_cast<ops::KvDtype>(9)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(KvPoolCreateTest, RejectsBadShapes) {
  auto backend = ops::CreateCpuBackend(1);
  EXPECT_EQ(KvPool::Create(backend.get(), 0, 4, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvPool::Create(backend.get(), 4, 0, 4).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvPool::Create(backend.get(), 1 << 20, 1 << 12, 1).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto pool = KvPool::Create(backend.get(), 8, 4, 2);
  ASSERT_TRUE(pool.ok()) << pool.status();
  EXPECT_EQ((*pool)->pages_free(), 8);
  EXPECT_EQ((*pool)->pages_used(), 0);
}

}  // namespace
}  // namespace kvgate::kv
