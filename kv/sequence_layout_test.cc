// SequenceLayout plans without hardware: exact page ids and row lists for commit,
// append and compaction; failures that change nothing; the page-count invariant of
// compaction; and a randomised commit/append/compact/release sequence over several
// sequences, run on a host simulation of the pool rows and checked against a std::map
// model.
#include "kv/sequence_layout.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <set>
#include <tuple>

#include "kv/kv_test_util.h"

namespace kvgate::kv {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::IsEmpty;
using testing::PlanOf;

int32_t PagesFor(int64_t rows, int32_t page_tokens) {
  return static_cast<int32_t>((rows + page_tokens - 1) / page_tokens);
}

TEST(PlanCommitTest, ExactPagesAndRows) {
  PagePool pool(10);
  // 1 layer, 2 kv heads, capacity 8, page_tokens 4.
  auto plan = PlanCommit(PlanOf(1, 2, 6, {{0, 1, 2, 3, 4, 5}, {1, 3}}), 8, 4, &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const SequenceLayout& layout = plan->layout;
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
  EXPECT_EQ(layout.next_pos, 6);
  EXPECT_THAT(layout.at(0, 0).page_ids, ElementsAre(0, 1));
  EXPECT_THAT(layout.at(0, 1).page_ids, ElementsAre(2));
  EXPECT_EQ(layout.at(0, 1).length, 2);
  EXPECT_THAT(layout.at(0, 1).positions, ElementsAre(1, 3));
  ASSERT_EQ(plan->copies.size(), 1u);
  EXPECT_THAT(plan->copies[0].src_rows, ElementsAre(0, 1, 2, 3, 4, 5, 9, 11));
  EXPECT_THAT(plan->copies[0].dst_rows, ElementsAre(0, 1, 2, 3, 4, 5, 8, 9));
  EXPECT_EQ(pool.num_used(), 3);
  EXPECT_FALSE(layout.has_query_masks);
  EXPECT_FALSE(layout.has_scores);
}

TEST(PlanCommitTest, EmptyHeadHoldsNoPagesAndMasksFillAllVisible) {
  PagePool pool(10);
  gates::KeepPlan keep = PlanOf(2, 2, 5, {{0, 4}, {}, {}, {1, 2, 3}});
  keep.at(1, 1).query_mask = {0x1, 0x2, 0x3};
  auto plan = PlanCommit(keep, 5, 2, &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const SequenceLayout& layout = plan->layout;
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
  EXPECT_THAT(layout.at(0, 0).page_ids, ElementsAre(0));
  EXPECT_THAT(layout.at(0, 1).page_ids, IsEmpty());
  EXPECT_THAT(layout.at(1, 0).page_ids, IsEmpty());
  EXPECT_THAT(layout.at(1, 1).page_ids, ElementsAre(1, 2));
  EXPECT_TRUE(layout.has_query_masks);
  EXPECT_THAT(layout.at(0, 0).query_mask, ElementsAre(0xFF, 0xFF));
  EXPECT_THAT(layout.at(1, 1).query_mask, ElementsAre(0x1, 0x2, 0x3));
  EXPECT_THAT(plan->copies[0].src_rows, ElementsAre(0, 4));
  EXPECT_THAT(plan->copies[1].src_rows, ElementsAre(5 + 1, 5 + 2, 5 + 3));
  EXPECT_THAT(plan->copies[1].dst_rows, ElementsAre(2, 3, 4));
}

struct BadCommit {
  std::string name;
  gates::KeepPlan plan;
  int32_t capacity;
  absl::StatusCode code;
};

gates::KeepPlan WithMask(gates::KeepPlan plan, std::vector<uint8_t> mask) {
  plan.heads[0].query_mask = std::move(mask);
  return plan;
}
gates::KeepPlan WithScores(gates::KeepPlan plan, size_t head, std::vector<float> scores) {
  plan.heads[head].scores = std::move(scores);
  return plan;
}

class BadCommitTest : public ::testing::TestWithParam<BadCommit> {};

TEST_P(BadCommitTest, FailsAndAllocatesNothing) {
  PagePool pool(4);
  auto plan = PlanCommit(GetParam().plan, GetParam().capacity, 2, &pool);
  EXPECT_EQ(plan.status().code(), GetParam().code) << plan.status();
  EXPECT_EQ(pool.num_used(), 0);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadCommitTest,
    ::testing::Values(
        BadCommit{"Unsorted", PlanOf(1, 1, 4, {{2, 1}}), 4, absl::StatusCode::kInvalidArgument},
        BadCommit{"Duplicate", PlanOf(1, 1, 4, {{1, 1}}), 4, absl::StatusCode::kInvalidArgument},
        BadCommit{"PastPrompt", PlanOf(1, 1, 4, {{0, 4}}), 8, absl::StatusCode::kInvalidArgument},
        BadCommit{"Negative", PlanOf(1, 1, 4, {{-1, 0}}), 8, absl::StatusCode::kInvalidArgument},
        BadCommit{"PromptOverCapacity", PlanOf(1, 1, 9, {{0}}), 8, absl::StatusCode::kInvalidArgument},
        BadCommit{"HeadCount", PlanOf(1, 2, 4, {{0}}), 8, absl::StatusCode::kInvalidArgument},
        BadCommit{"MaskCount", WithMask(PlanOf(1, 1, 4, {{0, 1}}), {1}), 8, absl::StatusCode::kInvalidArgument},
        BadCommit{"ScoresOnSomeHeads", WithScores(PlanOf(1, 2, 4, {{0}, {1}}), 0, {0.5f}), 8,
                  absl::StatusCode::kInvalidArgument},
        // 3 + 3 + 1 pages of 2 tokens > 4 pages.
        BadCommit{"PoolShort", PlanOf(1, 3, 6, {{0, 1, 2, 3, 4}, {0, 1, 2, 3, 4}, {5}}), 8,
                  absl::StatusCode::kResourceExhausted}),
    [](const ::testing::TestParamInfo<BadCommit>& info) { return info.param.name; });

TEST(PlanAppendTest, ReservesOneSlotPerHeadAndAdvancesOnce) {
  PagePool pool(10);
  // 2 layers x 1 kv head, page_tokens 2: layer 0 keeps 2 rows (full page), layer 1 one.
  auto commit = PlanCommit(PlanOf(2, 1, 3, {{0, 2}, {1}}), 4, 2, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  EXPECT_THAT(layout.AllPages(), ElementsAre(0, 1));

  auto step = PlanAppend(&layout, &pool);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->position, 3);
  EXPECT_EQ(layout.next_pos, 4);
  EXPECT_THAT(step->new_pages, ElementsAre(2));        // layer 0's page was full
  EXPECT_THAT(step->layer_rows(0), ElementsAre(2 * 2));  // page 2, slot 0
  EXPECT_THAT(step->layer_rows(1), ElementsAre(1 * 2 + 1));
  EXPECT_THAT(layout.at(0, 0).positions, ElementsAre(0, 2, 3));
  EXPECT_THAT(layout.at(1, 0).positions, ElementsAre(1, 3));

  step = PlanAppend(&layout, &pool);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->position, 4);
  EXPECT_THAT(step->new_pages, ElementsAre(3));  // now layer 1's page was full
  EXPECT_THAT(step->dst_rows, ElementsAre(2 * 2 + 1, 3 * 2));
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
}

TEST(PlanAppendTest, ExtendsMasksAndScoresAndHeadsWithNoRows) {
  PagePool pool(4);
  gates::KeepPlan keep = PlanOf(1, 2, 2, {{0, 1}, {}});
  keep.at(0, 0).query_mask = {0x1, 0x2};
  keep.at(0, 0).scores = {0.25f, 0.5f};
  auto commit = PlanCommit(keep, 2, 4, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  auto step = PlanAppend(&layout, &pool);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_THAT(step->new_pages, ElementsAre(1));  // the empty head gets its first page
  EXPECT_THAT(step->dst_rows, ElementsAre(2, 4));
  EXPECT_THAT(layout.at(0, 0).query_mask, ElementsAre(0x1, 0x2, kAllQueryHeads));
  EXPECT_THAT(layout.at(0, 0).scores, ElementsAre(0.25f, 0.5f, kUnscoredRow));
  EXPECT_THAT(layout.at(0, 1).query_mask, ElementsAre(kAllQueryHeads));
  EXPECT_THAT(layout.at(0, 1).scores, ElementsAre(kUnscoredRow));
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
}

// A ring drop (1 layer, 2 kv heads, page_tokens 4): head 0 keeps two sinks and drops
// row 2, which becomes a gap of one slot (nothing moves); head 1 drops its first five
// rows, which advances its first slot, frees its first page and moves nothing; appends
// then go after the last row. A later drop far from the gap moves the rows after it.
TEST(PlanDropRowsTest, LeavesTheLargestSegmentsInPlaceAndFreesEmptyPages) {
  PagePool pool(10);
  gates::KeepPlan keep = PlanOf(1, 2, 7, {{0, 1, 2, 3, 4, 5, 6}, {0, 1, 2, 3, 4, 5, 6}});
  keep.at(0, 0).query_mask = {1, 2, 3, 4, 5, 6, 7};
  keep.at(0, 1).query_mask = {1, 2, 3, 4, 5, 6, 7};
  auto commit = PlanCommit(keep, 8, 4, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  ASSERT_THAT(layout.at(0, 0).page_ids, ElementsAre(0, 1));
  ASSERT_THAT(layout.at(0, 1).page_ids, ElementsAre(2, 3));
  const RowDrops drops = {{2}, {0, 1, 2, 3, 4}};
  const DropCost cost = CostOfDrop(layout, drops);
  EXPECT_EQ(cost.moved_in_place, 0);
  EXPECT_EQ(cost.moved_by_compaction, 6 + 2);
  auto plan = PlanDropRows(&layout, drops, &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
  EXPECT_EQ(plan->to_stage.size(), 0);
  EXPECT_EQ(plan->from_stage.size(), 0);
  EXPECT_EQ(plan->staged_rows, 0);
  EXPECT_THAT(plan->mask_pages, IsEmpty());
  EXPECT_THAT(plan->freed_pages, ElementsAre(2));
  const HeadPages& ring = layout.at(0, 0);
  EXPECT_EQ(ring.first_slot, 0);
  EXPECT_EQ(ring.gap_row, 2);
  EXPECT_EQ(ring.gap_slots, 1);
  EXPECT_EQ(ring.length, 6);
  EXPECT_THAT(ring.positions, ElementsAre(0, 1, 3, 4, 5, 6));
  EXPECT_THAT(ring.query_mask, ElementsAre(1, 2, 4, 5, 6, 7));
  EXPECT_EQ(layout.PoolRow(0, 0, 1), 1);
  EXPECT_EQ(layout.PoolRow(0, 0, 2), 3);  // position 3 did not move
  const HeadPages& window = layout.at(0, 1);
  EXPECT_THAT(window.page_ids, ElementsAre(3));
  EXPECT_EQ(window.first_slot, 1);
  EXPECT_EQ(window.gap_slots, 0);
  EXPECT_THAT(window.positions, ElementsAre(5, 6));
  EXPECT_EQ(pool.num_used(), 3);
  // Head 0 fills its second page (slot 7 of 8), head 1 its page's slot 3.
  auto step = PlanAppend(&layout, &pool);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_THAT(step->dst_rows, ElementsAre(1 * 4 + 3, 3 * 4 + 3));
  EXPECT_THAT(step->new_pages, IsEmpty());
  step = PlanAppend(&layout, &pool);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_THAT(step->new_pages, ElementsAre(2, 4));
  EXPECT_THAT(step->dst_rows, ElementsAre(2 * 4, 4 * 4));
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
  // Dropping position 7 (row 6, slot 7) leaves segments of 2, 4 and 1 rows: the first two
  // stay, with the gap between them, and the last row moves up one slot, which empties
  // page 2.
  ASSERT_THAT(layout.at(0, 0).page_ids, ElementsAre(0, 1, 2));
  plan = PlanDropRows(&layout, {{6}, {}}, &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->to_stage.src_rows, ElementsAre(2 * 4));
  EXPECT_THAT(plan->from_stage.dst_rows, ElementsAre(1 * 4 + 3));
  EXPECT_THAT(plan->from_stage.lengths, ElementsAre(1));
  EXPECT_THAT(plan->mask_pages, ElementsAre(1));
  EXPECT_THAT(plan->freed_pages, ElementsAre(2));
  EXPECT_EQ(layout.at(0, 0).first_slot, 0);
  EXPECT_EQ(layout.at(0, 0).gap_row, 2);
  EXPECT_EQ(layout.at(0, 0).gap_slots, 1);
  EXPECT_THAT(layout.at(0, 0).positions, ElementsAre(0, 1, 3, 4, 5, 6, 8));
  EXPECT_EQ(layout.PoolRow(0, 0, 6), 1 * 4 + 3);
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
  // Dropping every row of a head releases its pages and resets its first slot.
  const int32_t used = pool.num_used();
  plan = PlanDropRows(&layout, {{}, {0, 1, 2, 3}}, &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(layout.at(0, 1).length, 0);
  EXPECT_EQ(layout.at(0, 1).first_slot, 0);
  EXPECT_THAT(layout.at(0, 1).page_ids, IsEmpty());
  EXPECT_EQ(pool.num_used(), used - 2);
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
  // Malformed drops change nothing.
  const SequenceLayout before = layout;
  for (const RowDrops& bad : {RowDrops{{1, 1}, {}}, RowDrops{{7}, {}}, RowDrops{{-1}, {}}, RowDrops{{0}}}) {
    EXPECT_EQ(PlanDropRows(&layout, bad, &pool).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(layout.at(0, 0).positions, before.at(0, 0).positions);
    EXPECT_EQ(layout.AllPages(), before.AllPages());
  }
}

// A ring after a frozen selection (page_tokens 4, 3 frozen rows, a ring of 6): every step
// appends a row and drops the ring's oldest, which sits just after the gap. Nothing ever
// moves; the gap grows, and each page it wholly covers goes back to the pool, so the head
// holds at most the pages of its rows plus two.
TEST(PlanDropRowsTest, ARingAfterAFrozenSelectionMovesNothing) {
  PagePool pool(16);
  auto commit = PlanCommit(PlanOf(1, 1, 9, {{0, 2, 4, 5, 6, 7, 8}}), 9, 4, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  const int32_t frozen = 3, ring = 4;
  for (int step = 0; step < 40; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    ASSERT_TRUE(PlanAppend(&layout, &pool).ok());
    const HeadPages& hp = layout.at(0, 0);
    RowDrops drops = {{}};
    for (int32_t r = frozen; r < hp.length - ring; ++r) drops[0].push_back(r);
    auto plan = PlanDropRows(&layout, drops, &pool);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
    EXPECT_EQ(plan->staged_rows, 0);
    EXPECT_EQ(hp.length, frozen + ring);
    EXPECT_THAT(absl::MakeConstSpan(hp.positions.begin(), 3), ElementsAre(0, 2, 4));
    EXPECT_EQ(hp.positions[hp.length - 1], layout.next_pos - 1);
    EXPECT_LE(static_cast<int64_t>(hp.page_ids.size()), (frozen + ring + 3) / 4 + 2);
    EXPECT_EQ(layout.PoolRow(0, 0, 0), 0);  // the frozen rows never move
    EXPECT_EQ(layout.PoolRow(0, 0, 2), 2);
  }
  EXPECT_EQ(pool.num_used(), layout.NumPages());
}

TEST(PlanAppendTest, ShortPoolChangesNothing) {
  PagePool pool(2);
  auto commit = PlanCommit(PlanOf(1, 2, 2, {{0, 1}, {0}}), 2, 2, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  const SequenceLayout before = layout;
  auto step = PlanAppend(&layout, &pool);  // head 0 needs a page, none is free
  EXPECT_EQ(step.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(layout.next_pos, before.next_pos);
  EXPECT_EQ(layout.at(0, 1).length, 1);
  EXPECT_EQ(pool.num_used(), 2);
  SequenceLayout empty;
  EXPECT_EQ(PlanAppend(&empty, &pool).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(PlanCompactionTest, ExactMovesIntoFreshPages) {
  PagePool pool(12);
  auto commit = PlanCommit(PlanOf(1, 2, 5, {{0, 1, 2, 3, 4}, {0, 1, 2}}), 5, 2, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  ASSERT_THAT(layout.at(0, 0).page_ids, ElementsAre(0, 1, 2));
  ASSERT_THAT(layout.at(0, 1).page_ids, ElementsAre(3, 4));

  auto plan = PlanCompaction(&layout, PlanOf(1, 2, 5, {{1, 3, 4}, {0, 1, 2}}), &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->new_pages, ElementsAre(5, 6));
  EXPECT_THAT(plan->freed_pages, ElementsAre(0, 1, 2));
  EXPECT_EQ(plan->pages_freed(), 1);
  EXPECT_THAT(plan->copies[0].src_rows, ElementsAre(1, 3, 4));  // rows 1, 3, 4 of pages 0..2
  EXPECT_THAT(plan->copies[0].dst_rows, ElementsAre(10, 11, 12));
  EXPECT_THAT(plan->mask_pages, ElementsAre(5, 6));
  EXPECT_THAT(layout.at(0, 0).page_ids, ElementsAre(5, 6));
  EXPECT_THAT(layout.at(0, 0).positions, ElementsAre(1, 3, 4));
  EXPECT_THAT(layout.at(0, 1).page_ids, ElementsAre(3, 4));  // kept everything: untouched
  EXPECT_EQ(pool.num_used(), 4);
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
  // The freed ids are the lowest again.
  EXPECT_THAT(*pool.Allocate(1), ElementsAre(0));
}

TEST(PlanCompactionTest, KeepAllIsANoOp) {
  PagePool pool(8);
  auto commit = PlanCommit(PlanOf(2, 1, 3, {{0, 1, 2}, {1}}), 3, 2, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  const std::vector<int32_t> pages = layout.AllPages();
  auto plan = PlanCompaction(&layout, PlanOf(2, 1, 3, {{0, 1, 2}, {1}}), &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->copies[0].size() + plan->copies[1].size(), 0);
  EXPECT_THAT(plan->new_pages, IsEmpty());
  EXPECT_THAT(plan->freed_pages, IsEmpty());
  EXPECT_THAT(plan->mask_pages, IsEmpty());
  EXPECT_EQ(layout.AllPages(), pages);
  EXPECT_EQ(pool.num_used(), 3);
}

TEST(PlanCompactionTest, NewMasksOnUnmovedHeadRewriteItsPages) {
  PagePool pool(8);
  auto commit = PlanCommit(PlanOf(1, 2, 3, {{0, 1, 2}, {0, 2}}), 3, 2, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  gates::KeepPlan keep = PlanOf(1, 2, 3, {{0, 1, 2}, {2}});
  keep.at(0, 0).query_mask = {0xFF, 0x1, 0xFF};
  auto plan = PlanCompaction(&layout, keep, &pool);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_THAT(plan->mask_pages, ElementsAre(0, 1, 3));  // head 0 unmoved; head 1 fresh page 3
  EXPECT_TRUE(layout.has_query_masks);
  EXPECT_THAT(layout.at(0, 0).query_mask, ElementsAre(0xFF, 0x1, 0xFF));
  EXPECT_THAT(layout.at(0, 1).query_mask, ElementsAre(0xFF));
  EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
}

struct BadKeep {
  std::string name;
  gates::KeepPlan keep;
  int32_t pool_pages;
  absl::StatusCode code;
};

class BadKeepTest : public ::testing::TestWithParam<BadKeep> {};

TEST_P(BadKeepTest, LayoutUnchangedNoPageLeaked) {
  PagePool pool(GetParam().pool_pages);
  // 1 layer x 2 kv heads, page_tokens 2: 3 + 2 pages.
  auto commit = PlanCommit(PlanOf(1, 2, 6, {{0, 1, 2, 3, 5}, {1, 2, 4}}), 6, 2, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = std::move(commit->layout);
  const std::vector<int32_t> pages = layout.AllPages();
  const int32_t used = pool.num_used();
  auto plan = PlanCompaction(&layout, GetParam().keep, &pool);
  EXPECT_EQ(plan.status().code(), GetParam().code) << plan.status();
  EXPECT_EQ(pool.num_used(), used);
  EXPECT_EQ(layout.AllPages(), pages);
  EXPECT_THAT(layout.at(0, 0).positions, ElementsAre(0, 1, 2, 3, 5));
  EXPECT_THAT(layout.at(0, 1).positions, ElementsAre(1, 2, 4));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadKeepTest,
    ::testing::Values(
        BadKeep{"NotPresent", PlanOf(1, 2, 6, {{0, 4}, {1}}), 8, absl::StatusCode::kInvalidArgument},
        BadKeep{"Unsorted", PlanOf(1, 2, 6, {{0, 1}, {4, 2}}), 8, absl::StatusCode::kInvalidArgument},
        BadKeep{"Duplicate", PlanOf(1, 2, 6, {{1, 1}, {2}}), 8, absl::StatusCode::kInvalidArgument},
        BadKeep{"Shape", PlanOf(2, 1, 6, {{0}, {1}}), 8, absl::StatusCode::kInvalidArgument},
        BadKeep{"MaskCount", WithMask(PlanOf(1, 2, 6, {{0, 1}, {1}}), {1, 2, 3}), 8,
                absl::StatusCode::kInvalidArgument},
        // 2 + 1 fresh pages needed while 1 is free: fresh pages come before any free.
        BadKeep{"NoRoomForFreshPages", PlanOf(1, 2, 6, {{0, 1, 2}, {1}}), 6,
                absl::StatusCode::kResourceExhausted}),
    [](const ::testing::TestParamInfo<BadKeep>& info) { return info.param.name; });

TEST(ReleaseTest, FreesEverythingAndDetectsDoubleRelease) {
  PagePool pool(8);
  auto commit = PlanCommit(PlanOf(1, 2, 4, {{0, 1, 2}, {3}}), 4, 2, &pool);
  ASSERT_TRUE(commit.ok()) << commit.status();
  SequenceLayout layout = commit->layout;
  SequenceLayout stale = commit->layout;
  ASSERT_TRUE(Release(&layout, &pool).ok());
  EXPECT_EQ(pool.num_used(), 0);
  EXPECT_TRUE(layout.heads.empty());
  EXPECT_TRUE(Release(&layout, &pool).ok());  // empty: no-op
  EXPECT_EQ(Release(&stale, &pool).code(), absl::StatusCode::kInternal);
  EXPECT_EQ(pool.num_used(), 0);
}

// After compaction at keep ratio r the sequence holds, per head, ceil(r * n / pt)
// pages: within one page per head of r times the full count; the pages freed are the
// evicted rows rounded to pages per head.
TEST(PlanCompactionTest, PageCountFollowsKeepRatio) {
  constexpr int32_t kLayers = 2, kHeads = 4, kPrompt = 100;
  for (int32_t pt : {1, 3, 8, 16}) {
    for (double r : {1.0, 0.75, 0.5, 0.3, 0.2}) {
      SCOPED_TRACE(::testing::Message() << "page_tokens " << pt << " r " << r);
      std::mt19937 rng(static_cast<uint32_t>(pt * 100 + r * 10));
      PagePool pool(2 * kLayers * kHeads * PagesFor(kPrompt, pt));
      auto commit = PlanCommit(gates::KeepPlan::KeepAll(kLayers, kHeads, kPrompt), kPrompt, pt, &pool);
      ASSERT_TRUE(commit.ok()) << commit.status();
      SequenceLayout layout = std::move(commit->layout);
      const int32_t full = pool.num_used();
      ASSERT_EQ(full, kLayers * kHeads * PagesFor(kPrompt, pt));
      std::vector<std::vector<int32_t>> current;
      for (const HeadPages& hp : layout.heads) current.push_back(hp.positions);
      gates::KeepPlan keep = testing::RandomKeep(kLayers, kHeads, kPrompt, current, r, rng);
      int32_t expected_freed = 0;
      for (const gates::HeadKeep& h : keep.heads) {
        expected_freed += PagesFor(kPrompt, pt) - PagesFor(static_cast<int64_t>(h.positions.size()), pt);
      }
      auto plan = PlanCompaction(&layout, keep, &pool);
      ASSERT_TRUE(plan.ok()) << plan.status();
      EXPECT_EQ(plan->pages_freed(), expected_freed);
      EXPECT_EQ(pool.num_used(), full - expected_freed);
      EXPECT_LE(std::abs(pool.num_used() - r * full), kLayers * kHeads);
      EXPECT_EQ(layout.NumPages(), pool.num_used());
      if (r == 1.0) {
        EXPECT_THAT(plan->new_pages, IsEmpty());
      }
      EXPECT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
    }
  }
}

// ---- Randomised sequence against a std::map model -------------------------------
//
// The pool rows are simulated on the host (one float of K and of V per row), and every
// planned copy is applied to them, so the test checks the plans move the right data,
// not only the right ids.

struct ModelRow {
  int32_t position;
  float k, v;
  uint8_t mask;
  float score;
  bool operator==(const ModelRow&) const = default;
};
using Key = std::tuple<int, int32_t, int32_t>;  // (sequence, layer, kv head)

class RandomOps {
 public:
  static constexpr int kSeqs = 4;
  static constexpr int32_t kLayers = 2, kHeads = 3, kPt = 3, kPages = 48, kCapacity = 24;

  explicit RandomOps(uint32_t seed) : rng_(seed), pool_(kPages), k_(kPages * kPt), v_(kPages * kPt) {}

  void Step() {
    const int seq = Uniform(0, kSeqs - 1);
    if (layouts_[seq].heads.empty()) return Commit(seq);
    const int kind = Uniform(0, 9);
    if (kind < 5) return Append(seq);
    if (kind < 8) return Compact(seq);
    Release(seq);
  }

  void ReleaseAll() {
    for (int s = 0; s < kSeqs; ++s) {
      if (!layouts_[s].heads.empty()) Release(s);
    }
    EXPECT_EQ(pool_.num_used(), 0);
  }

  // Every sequence matches the model; pages are disjoint, all allocated, and are
  // exactly the pool's used pages.
  void Check() {
    std::set<int32_t> seen;
    for (int s = 0; s < kSeqs; ++s) {
      const SequenceLayout& layout = layouts_[s];
      ASSERT_TRUE(layout.CheckInvariants().ok()) << layout.CheckInvariants();
      for (int32_t p : layout.AllPages()) {
        ASSERT_TRUE(seen.insert(p).second) << "page " << p << " held twice";
        ASSERT_TRUE(pool_.IsAllocated(p)) << "page " << p;
      }
      if (layout.heads.empty()) continue;
      ASSERT_EQ(layout.next_pos, next_pos_[s]);
      for (int32_t l = 0; l < kLayers; ++l) {
        for (int32_t h = 0; h < kHeads; ++h) {
          const HeadPages& hp = layout.at(l, h);
          std::vector<ModelRow> actual;
          for (int32_t r = 0; r < hp.length; ++r) {
            const int32_t row = layout.PoolRow(l, h, r);
            actual.push_back({hp.positions[r], k_[row], v_[row],
                              layout.has_query_masks ? hp.query_mask[r] : kAllQueryHeads,
                              layout.has_scores ? hp.scores[r] : 0.0f});
          }
          ASSERT_EQ(actual, (model_[{s, l, h}])) << "seq " << s << " layer " << l << " head " << h;
        }
      }
    }
    ASSERT_EQ(static_cast<int32_t>(seen.size()), pool_.num_used());
  }

  int commits = 0, appends = 0, compactions = 0, releases = 0, exhausted = 0, invalid = 0;

 private:
  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  void Commit(int seq) {
    const int32_t prompt = Uniform(0, 20);
    std::vector<int32_t> all(prompt);
    for (int32_t i = 0; i < prompt; ++i) all[i] = i;
    const bool masks = Uniform(0, 2) == 0, scores = Uniform(0, 3) == 0;
    gates::KeepPlan plan{kLayers, kHeads, prompt, {}};
    int32_t need = 0;
    for (int32_t i = 0; i < kLayers * kHeads; ++i) {
      gates::HeadKeep keep;
      keep.positions = testing::RandomSubset(all, Uniform(0, prompt), rng_);
      if (masks && Uniform(0, 1)) {
        for (size_t r = 0; r < keep.positions.size(); ++r) keep.query_mask.push_back(Uniform(0, 255));
      }
      if (scores) {
        for (int32_t p : keep.positions) keep.scores.push_back(0.5f * p);
      }
      need += PagesFor(static_cast<int64_t>(keep.positions.size()), kPt);
      plan.heads.push_back(std::move(keep));
    }
    const int32_t free_before = pool_.num_free();
    auto commit = PlanCommit(plan, kCapacity, kPt, &pool_);
    if (need > free_before) {
      ASSERT_EQ(commit.status().code(), absl::StatusCode::kResourceExhausted) << commit.status();
      ASSERT_EQ(pool_.num_free(), free_before);
      ++exhausted;
      return;
    }
    ASSERT_TRUE(commit.ok()) << commit.status();
    // Apply the copies from a simulated contiguous cache of coded values.
    for (int32_t l = 0; l < kLayers; ++l) {
      const RowCopies& c = commit->copies[l];
      for (int32_t i = 0; i < c.size(); ++i) {
        const int32_t h = c.src_rows[i] / kCapacity, pos = c.src_rows[i] % kCapacity;
        k_[c.dst_rows[i]] = testing::CodedValue(l, h, pos, 0);
        v_[c.dst_rows[i]] = testing::CodedV(l, h, pos, 0);
      }
    }
    layouts_[seq] = std::move(commit->layout);
    next_pos_[seq] = prompt;
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int32_t h = 0; h < kHeads; ++h) {
        const gates::HeadKeep& keep = plan.at(l, h);
        std::vector<ModelRow>& rows = model_[{seq, l, h}];
        rows.clear();
        for (size_t r = 0; r < keep.positions.size(); ++r) {
          const int32_t p = keep.positions[r];
          rows.push_back({p, testing::CodedValue(l, h, p, 0), testing::CodedV(l, h, p, 0),
                          keep.query_mask.empty() ? kAllQueryHeads : keep.query_mask[r],
                          scores ? 0.5f * p : 0.0f});
        }
      }
    }
    ++commits;
  }

  void Append(int seq) {
    SequenceLayout& layout = layouts_[seq];
    if (next_pos_[seq] >= 990) return;  // keep coded values exact
    int32_t need = 0;
    for (const HeadPages& hp : layout.heads) need += hp.length % kPt == 0 ? 1 : 0;
    const int32_t free_before = pool_.num_free();
    auto step = PlanAppend(&layout, &pool_);
    if (need > free_before) {
      ASSERT_EQ(step.status().code(), absl::StatusCode::kResourceExhausted) << step.status();
      ASSERT_EQ(pool_.num_free(), free_before);
      ++exhausted;
      return;
    }
    ASSERT_TRUE(step.ok()) << step.status();
    const int32_t p = next_pos_[seq]++;
    ASSERT_EQ(step->position, p);
    ASSERT_EQ(static_cast<int32_t>(step->new_pages.size()), need);
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int32_t h = 0; h < kHeads; ++h) {
        const int32_t row = step->layer_rows(l)[h];
        k_[row] = testing::CodedValue(l, h, p, 0);
        v_[row] = testing::CodedV(l, h, p, 0);
        model_[{seq, l, h}].push_back({p, k_[row], v_[row], kAllQueryHeads,
                                       layout.has_scores ? kUnscoredRow : 0.0f});
      }
    }
    ++appends;
  }

  void Compact(int seq) {
    SequenceLayout& layout = layouts_[seq];
    std::vector<std::vector<int32_t>> current;
    for (const HeadPages& hp : layout.heads) current.push_back(hp.positions);
    const double ratio = Uniform(0, 10) / 10.0;
    gates::KeepPlan keep = testing::RandomKeep(kLayers, kHeads, next_pos_[seq], current, ratio, rng_);
    const bool new_masks = Uniform(0, 3) == 0;
    if (new_masks) {
      for (gates::HeadKeep& h : keep.heads) {
        for (size_t r = 0; r < h.positions.size(); ++r) h.query_mask.push_back(Uniform(0, 255));
      }
    }
    bool corrupt = false;
    if (Uniform(0, 5) == 0) {  // an invalid keep set
      gates::HeadKeep& h = keep.heads[Uniform(0, kLayers * kHeads - 1)];
      h.positions.push_back(next_pos_[seq] + 5);  // never held
      if (!h.query_mask.empty()) h.query_mask.push_back(1);
      corrupt = true;
    }
    int32_t need = 0;
    for (size_t i = 0; i < keep.heads.size(); ++i) {
      if (keep.heads[i].positions.size() != current[i].size()) {
        need += PagesFor(static_cast<int64_t>(keep.heads[i].positions.size()), kPt);
      }
    }
    const int32_t free_before = pool_.num_free();
    const std::vector<int32_t> pages_before = layout.AllPages();
    auto plan = PlanCompaction(&layout, keep, &pool_);
    if (corrupt || need > free_before) {
      ASSERT_EQ(plan.status().code(),
                corrupt ? absl::StatusCode::kInvalidArgument : absl::StatusCode::kResourceExhausted)
          << plan.status();
      ASSERT_EQ(pool_.num_free(), free_before);
      ASSERT_EQ(layout.AllPages(), pages_before);
      ++(corrupt ? invalid : exhausted);
      return;
    }
    ASSERT_TRUE(plan.ok()) << plan.status();
    // Sources and destinations never alias: apply in order, no snapshot needed.
    std::set<int32_t> src_rows, dst_rows;
    for (const RowCopies& c : plan->copies) {
      src_rows.insert(c.src_rows.begin(), c.src_rows.end());
      for (int32_t d : c.dst_rows) ASSERT_TRUE(dst_rows.insert(d).second) << "dst row " << d << " twice";
    }
    for (int32_t d : dst_rows) ASSERT_FALSE(src_rows.count(d)) << "row " << d << " is src and dst";
    for (const RowCopies& c : plan->copies) {
      for (int32_t i = 0; i < c.size(); ++i) {
        k_[c.dst_rows[i]] = k_[c.src_rows[i]];
        v_[c.dst_rows[i]] = v_[c.src_rows[i]];
      }
    }
    int32_t expected_freed = 0;
    for (size_t i = 0; i < keep.heads.size(); ++i) {
      expected_freed += PagesFor(static_cast<int64_t>(current[i].size()), kPt) -
                        PagesFor(static_cast<int64_t>(keep.heads[i].positions.size()), kPt);
    }
    ASSERT_EQ(plan->pages_freed(), expected_freed);
    ASSERT_EQ(pool_.num_free(), free_before + expected_freed);
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int32_t h = 0; h < kHeads; ++h) {
        const gates::HeadKeep& k = keep.at(l, h);
        std::vector<ModelRow>& rows = model_[{seq, l, h}];
        std::vector<ModelRow> kept;
        size_t j = 0;
        for (size_t r = 0; r < k.positions.size(); ++r) {
          while (rows[j].position != k.positions[r]) ++j;
          kept.push_back(rows[j]);
          if (!k.query_mask.empty()) kept.back().mask = k.query_mask[r];
        }
        rows = std::move(kept);
      }
    }
    ++compactions;
  }

  void Release(int seq) {
    const int32_t held = static_cast<int32_t>(layouts_[seq].NumPages());
    const int32_t free_before = pool_.num_free();
    ASSERT_TRUE(kv::Release(&layouts_[seq], &pool_).ok());
    ASSERT_EQ(pool_.num_free(), free_before + held);
    for (int32_t l = 0; l < kLayers; ++l) {
      for (int32_t h = 0; h < kHeads; ++h) model_.erase({seq, l, h});
    }
    ++releases;
  }

  std::mt19937 rng_;
  PagePool pool_;
  std::vector<float> k_, v_;  // simulated pool rows, [kPages * kPt]
  SequenceLayout layouts_[kSeqs];
  int32_t next_pos_[kSeqs] = {};
  std::map<Key, std::vector<ModelRow>> model_;
};

TEST(SequenceLayoutRandomTest, MatchesMapModel) {
  for (uint32_t seed : {7u, 8u, 9u, 10u}) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    RandomOps ops(seed);
    for (int step = 0; step < 400; ++step) {
      SCOPED_TRACE(::testing::Message() << "step " << step);
      ops.Step();
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
      ops.Check();
      ASSERT_FALSE(::testing::Test::HasFatalFailure());
    }
    ops.ReleaseAll();
    // Every kind of op, including the failures, was exercised.
    EXPECT_GT(ops.commits, 10);
    EXPECT_GT(ops.appends, 50);
    EXPECT_GT(ops.compactions, 10);
    EXPECT_GT(ops.releases, 5);
    EXPECT_GT(ops.exhausted, 0);
    EXPECT_GT(ops.invalid, 0);
  }
}

}  // namespace
}  // namespace kvgate::kv
