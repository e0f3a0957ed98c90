// DecodeStepTables on the CPU backend: every step, the tables in backend memory say what
// the layouts say (each seq head's page list, length and append rows), while only the
// changed ids move (a scatter of the new pages; nothing is rebuilt until the batch
// outgrows the buffer), sequences keep their slots as others leave and join, a
// compaction's rewritten lists arrive, and appends through the uploaded rows land where
// AppendDecodeRows puts them.
#include "kv/decode_step_tables.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <vector>

#include "cuda/backend.h"
#include "cuda/cpu/cpu_backend.h"
#include "engine/model.h"
#include "engine/model_config.h"
#include "kv/kv_test_util.h"

namespace kvgate::kv {
namespace {

using ::testing::ElementsAreArray;
using testing::CodedV;
using testing::CodedValue;
using testing::PlanOf;

class DecodeStepTablesTest : public ::testing::Test {
 protected:
  static constexpr int32_t kLayers = 2, kHeads = 2, kDim = 4, kCapacity = 40, kPageTokens = 2;

  void SetUp() override {
    // The GPU machine runs these with KVGATE_TEST_BACKEND=cuda (the scatter is a CUDA
    // CopyRows there).
    const char* backend_name = std::getenv("KVGATE_TEST_BACKEND");
    if (backend_name != nullptr && *backend_name != '\0') {
      auto backend = ops::CreateBackend(backend_name);
      ASSERT_TRUE(backend.ok()) << backend.status();
      backend_ = std::move(*backend);
    }
    auto model = engine::Model::CreateRandom(testing::SmallLlamaConfig(kLayers, 4, kHeads, kDim), 1, backend_.get());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto pool = KvPool::Create(backend_.get(), 1024, kPageTokens, kDim);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
  }

  // A prefill cache of `prompt` tokens whose rows hold the coded values of their position.
  std::unique_ptr<engine::KvCache> MakeCache(int32_t prompt) {
    auto cache = model_->NewCache(kCapacity);
    EXPECT_TRUE(cache.ok()) << cache.status();
    std::vector<int32_t> tokens(prompt, 3);
    EXPECT_TRUE(model_->Forward(tokens, cache->get()).ok());
    for (int32_t l = 0; l < kLayers; ++l) {
      std::vector<float> k(kHeads * kCapacity * kDim), v(k.size());
      for (int32_t h = 0; h < kHeads; ++h) {
        for (int32_t p = 0; p < kCapacity; ++p) {
          for (int32_t d = 0; d < kDim; ++d) {
            const size_t i = (static_cast<size_t>(h) * kCapacity + p) * kDim + d;
            k[i] = CodedValue(l, h, p, d);
            v[i] = CodedV(l, h, p, d);
          }
        }
      }
      EXPECT_TRUE(backend_->CopyToBackend((*cache)->k(l), k.data(), k.size() * 4).ok());
      EXPECT_TRUE(backend_->CopyToBackend((*cache)->v(l), v.data(), v.size() * 4).ok());
    }
    return std::move(*cache);
  }

  std::vector<int32_t> Read(const int32_t* device, size_t n) {
    std::vector<int32_t> host(n);
    EXPECT_TRUE(backend_->CopyToHost(host.data(), device, n * 4).ok());
    return host;
  }

  // The step's tables say what `layouts` and `steps` say, seq head by seq head.
  void ExpectTablesOf(const DecodeStepTables::Step& step, absl::Span<const SequenceLayout* const> layouts,
                      absl::Span<const AppendPlan* const> steps) {
    const size_t seq_heads = layouts.size() * kHeads;
    ASSERT_EQ(step.views.size(), static_cast<size_t>(kLayers));
    ASSERT_EQ(step.num_append_rows, static_cast<int32_t>(seq_heads));
    for (int32_t l = 0; l < kLayers; ++l) {
      SCOPED_TRACE(::testing::Message() << "layer " << l);
      const ops::HeadPagedKvView& view = step.views[l];
      EXPECT_EQ(view.page_tokens, kPageTokens);
      EXPECT_EQ(view.query_masks, nullptr);
      const std::vector<int32_t> indptr = Read(view.page_indptr, seq_heads + 1);
      const std::vector<int32_t> lengths = Read(view.lengths, seq_heads);
      ASSERT_NE(view.first_slots, nullptr);
      const std::vector<int32_t> first_slots = Read(view.first_slots, seq_heads);
      ASSERT_NE(view.gap_rows, nullptr);
      ASSERT_NE(view.gap_slots, nullptr);
      const std::vector<int32_t> gap_rows = Read(view.gap_rows, seq_heads);
      const std::vector<int32_t> gap_slots = Read(view.gap_slots, seq_heads);
      std::vector<int32_t> rows(seq_heads);
      std::iota(rows.begin(), rows.end(), 0);
      for (size_t s = 0; s < layouts.size(); ++s) {
        for (int32_t h = 0; h < kHeads; ++h) {
          const HeadPages& hp = layouts[s]->at(l, h);
          const size_t i = s * kHeads + h;
          EXPECT_EQ(lengths[i], hp.length) << "seq head " << i;
          EXPECT_EQ(first_slots[i], hp.first_slot) << "seq head " << i;
          EXPECT_EQ(gap_rows[i], hp.gap_row) << "seq head " << i;
          EXPECT_EQ(gap_slots[i], hp.gap_slots) << "seq head " << i;
          EXPECT_THAT(Read(view.page_ids + indptr[i], hp.page_ids.size()), ElementsAreArray(hp.page_ids))
              << "seq head " << i;
        }
        for (int32_t r : steps[s]->layer_rows(l)) rows.push_back(r);
      }
      EXPECT_THAT(Read(step.append_rows[l], rows.size()), ElementsAreArray(rows));
    }
  }

  // Writes the coded K/V of each sequence's step through the uploaded append rows.
  void AppendThroughTables(const DecodeStepTables::Step& step, absl::Span<const AppendPlan* const> steps) {
    for (int32_t l = 0; l < kLayers; ++l) {
      std::vector<int32_t> positions;
      for (const AppendPlan* s : steps) positions.push_back(s->position);
      const auto [k, v] = testing::CodedRowsAt(l, positions, kHeads, kDim);
      auto kb = backend_->Alloc(k.size() * 4), vb = backend_->Alloc(v.size() * 4);
      ASSERT_TRUE(kb.ok() && vb.ok());
      ASSERT_TRUE(backend_->CopyToBackend(kb->data(), k.data(), k.size() * 4).ok());
      ASSERT_TRUE(backend_->CopyToBackend(vb->data(), v.data(), v.size() * 4).ok());
      ASSERT_TRUE(
          pool_->AppendDecodeRowsAt(step.append_rows[l], step.num_append_rows, kb->as<float>(), vb->as<float>()).ok());
    }
  }

  // Every row of every head holds the coded values of its position.
  void ExpectCodedRows(const SequenceLayout& layout) {
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int32_t h = 0; h < kHeads; ++h) {
        auto rows = pool_->ReadRows(layout, l, h);
        ASSERT_TRUE(rows.ok()) << rows.status();
        for (size_t r = 0; r < rows->positions.size(); ++r) {
          for (int32_t d = 0; d < kDim; ++d) {
            ASSERT_EQ(rows->k[r * kDim + d], CodedValue(l, h, rows->positions[r], d));
            ASSERT_EQ(rows->v[r * kDim + d], CodedV(l, h, rows->positions[r], d));
          }
        }
      }
    }
  }

  std::unique_ptr<ops::Backend> backend_ = ops::CreateCpuBackend(2);
  std::unique_ptr<engine::Model> model_;
  std::unique_ptr<KvPool> pool_;
};

TEST_F(DecodeStepTablesTest, TablesFollowTheLayoutsAndOnlyNewPagesMove) {
  auto cache = MakeCache(5);
  SequenceLayout a, b;
  ASSERT_TRUE(pool_->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 5), &a).ok());
  ASSERT_TRUE(pool_->CommitPrefill(*cache, PlanOf(kLayers, kHeads, 5, {{1}, {2, 4}, {3}, {}}), &b).ok());
  DecodeStepTables tables(pool_.get());
  std::optional<std::array<uint64_t, 4>> first_key;
  int rebuilds = 0;
  for (int step = 0; step < 140; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    const int32_t pages_before = pool_->pages_used();
    auto step_a = pool_->ReserveDecodeStep(&a);
    auto step_b = pool_->ReserveDecodeStep(&b);
    ASSERT_TRUE(step_a.ok() && step_b.ok());
    const int32_t new_pages = pool_->pages_used() - pages_before;
    const SequenceLayout* layouts[] = {&a, &b};
    const AppendPlan* steps[] = {&*step_a, &*step_b};
    auto got = tables.Update(layouts, steps);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectTablesOf(**got, layouts, steps);
    AppendThroughTables(**got, steps);
    if (tables.last_upload().rebuilt) {
      ++rebuilds;
      first_key = (*got)->replay_key;
    } else {
      // Only this step's new pages were written, and the launches did not move.
      EXPECT_EQ(tables.last_upload().ids_scattered, new_pages);
      EXPECT_EQ((*got)->replay_key, *first_key);
    }
  }
  // The first step, then once when a's lists outgrew their stride of 64 ids (3 pages at
  // the start, 73 after 140 steps of 2-token pages).
  EXPECT_EQ(rebuilds, 2);
  ExpectCodedRows(a);
  ExpectCodedRows(b);
  ASSERT_TRUE(pool_->Release(&a).ok() && pool_->Release(&b).ok());
}

TEST_F(DecodeStepTablesTest, SequencesKeepTheirSlotsAndRewrittenListsArrive) {
  auto cache = MakeCache(12);
  SequenceLayout a, b, c;
  for (SequenceLayout* s : {&a, &b, &c}) {
    ASSERT_TRUE(pool_->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 12), s).ok());
  }
  DecodeStepTables tables(pool_.get());
  auto run_step = [&](std::vector<SequenceLayout*> members) -> std::vector<int32_t> {
    std::vector<AppendPlan> plans;
    for (SequenceLayout* s : members) {
      auto plan = pool_->ReserveDecodeStep(s);
      EXPECT_TRUE(plan.ok()) << plan.status();
      plans.push_back(*std::move(plan));
    }
    std::vector<const SequenceLayout*> layouts(members.begin(), members.end());
    std::vector<const AppendPlan*> steps;
    for (const AppendPlan& p : plans) steps.push_back(&p);
    auto got = tables.Update(layouts, steps);
    EXPECT_TRUE(got.ok()) << got.status();
    if (!got.ok()) return {};
    ExpectTablesOf(**got, layouts, steps);
    AppendThroughTables(**got, steps);
    return Read((*got)->views[0].page_indptr, layouts.size() * kHeads);
  };
  const std::vector<int32_t> three = run_step({&a, &b, &c});
  // a leaves: b and c keep their lists where they were, nothing is rebuilt.
  const std::vector<int32_t> two = run_step({&b, &c});
  EXPECT_FALSE(tables.last_upload().rebuilt);
  EXPECT_THAT(two, ElementsAreArray(three.begin() + kHeads, three.end()));
  // A compaction rewrites b's lists (fresh pages): the next step carries them.
  ASSERT_TRUE(pool_->Compact(&b, PlanOf(kLayers, kHeads, 14, {{0, 5, 13}, {1}, {2, 3, 4, 9, 13}, {13}})).ok());
  run_step({&b, &c});
  EXPECT_FALSE(tables.last_upload().rebuilt);
  EXPECT_GT(tables.last_upload().ids_scattered, 0);
  // Drops in place: c's even heads lose their first rows (first slots advance, lists
  // lose their first page once it empties), its odd heads three rows after the first
  // (a gap); the next step carries both.
  RowDrops drops(c.heads.size());
  for (size_t i = 0; i < drops.size(); ++i) drops[i] = i % 2 == 0 ? std::vector<int32_t>{0, 1, 2} : std::vector<int32_t>{1, 2, 3};
  SequenceLayout* dropping[] = {&c};
  ASSERT_TRUE(pool_->DropRows(dropping, absl::MakeConstSpan(&drops, 1)).ok());
  ASSERT_NE(c.heads[0].first_slot, 0);
  ASSERT_NE(c.heads[1].gap_slots, 0);
  run_step({&b, &c});
  EXPECT_FALSE(tables.last_upload().rebuilt);
  // a comes back (in a's old slot or another free one), first in the batch.
  const std::vector<int32_t> again = run_step({&a, &b, &c});
  EXPECT_FALSE(tables.last_upload().rebuilt);
  EXPECT_THAT(std::vector<int32_t>(again.begin() + kHeads, again.end()), ElementsAreArray(two));
  for (const SequenceLayout* s : {&a, &b, &c}) ExpectCodedRows(*s);
  for (SequenceLayout* s : {&a, &b, &c}) ASSERT_TRUE(pool_->Release(s).ok());
  EXPECT_EQ(pool_->pages_used(), 0);
}

TEST_F(DecodeStepTablesTest, RejectsBatchesThatDoNotFitAndRecovers) {
  auto cache = MakeCache(4);
  SequenceLayout a;
  ASSERT_TRUE(pool_->CommitPrefill(*cache, gates::KeepPlan::KeepAll(kLayers, kHeads, 4), &a).ok());
  auto step_a = pool_->ReserveDecodeStep(&a);
  ASSERT_TRUE(step_a.ok());
  DecodeStepTables tables(pool_.get());
  const SequenceLayout* one[] = {&a};
  const AppendPlan* two_steps[] = {&*step_a, &*step_a};
  EXPECT_EQ(tables.Update(one, two_steps).status().code(), absl::StatusCode::kInvalidArgument);
  SequenceLayout empty;
  const SequenceLayout* with_empty[] = {&a, &empty};
  auto failed = tables.Update(with_empty, two_steps);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(failed.status().message()), ::testing::HasSubstr("sequence 1"));
  const AppendPlan* one_step[] = {&*step_a};
  auto got = tables.Update(one, one_step);
  ASSERT_TRUE(got.ok()) << got.status();
  ExpectTablesOf(**got, one, one_step);
  auto none = tables.Update({}, {});
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE((*none)->views.empty());
  ASSERT_TRUE(pool_->Release(&a).ok());
}

}  // namespace
}  // namespace kvgate::kv
