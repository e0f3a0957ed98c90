// PagePool: exact ids after allocate/free sequences, all-or-nothing failures, and a
// randomised op sequence against a std::set model.
#include "kv/page_pool.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <string>

namespace kvgate::kv {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// One step of a table-driven case: allocate `count` (expect `ids`, or an error code) or
// free `ids` (expect ok or an error code).
struct Op {
  enum Kind { kAllocate, kFree } kind;
  int32_t count = 0;
  std::vector<int32_t> ids;
  absl::StatusCode code = absl::StatusCode::kOk;
  int32_t free_after = 0;
};

Op Alloc(int32_t count, std::vector<int32_t> ids, int32_t free_after) {
  return {Op::kAllocate, count, std::move(ids), absl::StatusCode::kOk, free_after};
}
Op AllocFails(int32_t count, absl::StatusCode code, int32_t free_after) {
  return {Op::kAllocate, count, {}, code, free_after};
}
Op Free(std::vector<int32_t> ids, int32_t free_after) {
  return {Op::kFree, 0, std::move(ids), absl::StatusCode::kOk, free_after};
}
Op FreeFails(std::vector<int32_t> ids, absl::StatusCode code, int32_t free_after) {
  return {Op::kFree, 0, std::move(ids), code, free_after};
}

struct PoolCase {
  std::string name;
  int32_t num_pages;
  std::vector<Op> ops;
};

class PagePoolCaseTest : public ::testing::TestWithParam<PoolCase> {};

TEST_P(PagePoolCaseTest, ExactIds) {
  const PoolCase& c = GetParam();
  PagePool pool(c.num_pages);
  for (size_t i = 0; i < c.ops.size(); ++i) {
    const Op& op = c.ops[i];
    SCOPED_TRACE(::testing::Message() << "op " << i);
    if (op.kind == Op::kAllocate) {
      auto ids = pool.Allocate(op.count);
      ASSERT_EQ(ids.status().code(), op.code) << ids.status();
      if (ids.ok()) {
        EXPECT_THAT(*ids, ElementsAreArray(op.ids));
      }
    } else {
      absl::Status s = pool.Free(op.ids);
      ASSERT_EQ(s.code(), op.code) << s;
    }
    EXPECT_EQ(pool.num_free(), op.free_after);
    EXPECT_EQ(pool.num_used(), c.num_pages - op.free_after);
    EXPECT_EQ(pool.num_total(), c.num_pages);
  }
}

constexpr auto kExhausted = absl::StatusCode::kResourceExhausted;
constexpr auto kPrecondition = absl::StatusCode::kFailedPrecondition;
constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;

INSTANTIATE_TEST_SUITE_P(
    Cases, PagePoolCaseTest,
    ::testing::Values(
        PoolCase{"LowestFirst", 8, {Alloc(3, {0, 1, 2}, 5), Alloc(2, {3, 4}, 3), Alloc(0, {}, 3)}},
        PoolCase{"ReuseLowestFreed",
                 8,
                 {Alloc(5, {0, 1, 2, 3, 4}, 3), Free({3, 1}, 5), Alloc(1, {1}, 4), Alloc(3, {3, 5, 6}, 1),
                  Alloc(1, {7}, 0), AllocFails(1, kExhausted, 0)}},
        PoolCase{"ShortIsAllOrNothing",
                 4,
                 {Alloc(3, {0, 1, 2}, 1), AllocFails(2, kExhausted, 1), Alloc(1, {3}, 0)}},
        PoolCase{"DoubleFree", 4, {Alloc(2, {0, 1}, 2), Free({1}, 3), FreeFails({1}, kPrecondition, 3)}},
        PoolCase{"BadBatchFreesNothing",
                 6,
                 {Alloc(4, {0, 1, 2, 3}, 2), FreeFails({0, 1, 5}, kPrecondition, 2),
                  FreeFails({2, 9}, kPrecondition, 2), FreeFails({3, -1}, kPrecondition, 2),
                  FreeFails({0, 2, 0}, kPrecondition, 2), Free({0, 1, 2, 3}, 6)}},
        PoolCase{"NegativeCount", 2, {AllocFails(-1, kInvalid, 2)}},
        PoolCase{"EmptyPool", 0, {Alloc(0, {}, 0), AllocFails(1, kExhausted, 0), Free({}, 0)}},
        PoolCase{"FreeNeverAllocated", 3, {FreeFails({2}, kPrecondition, 3)}}),
    [](const ::testing::TestParamInfo<PoolCase>& info) { return info.param.name; });

TEST(PagePoolTest, ExhaustedMessageHasNumbers) {
  PagePool pool(5);
  ASSERT_TRUE(pool.Allocate(3).ok());
  auto ids = pool.Allocate(4);
  ASSERT_EQ(ids.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(ids.status().message()), HasSubstr("4 pages requested, 2 free of 5"));
}

TEST(PagePoolTest, FailedFreeKeepsEveryIdAllocated) {
  PagePool pool(4);
  ASSERT_THAT(*pool.Allocate(4), ElementsAre(0, 1, 2, 3));
  ASSERT_FALSE(pool.Free({2, 3, 3}).ok());
  for (int32_t id = 0; id < 4; ++id) EXPECT_TRUE(pool.IsAllocated(id)) << id;
  EXPECT_THAT(*pool.Allocate(0), IsEmpty());
  ASSERT_TRUE(pool.Free({3, 2}).ok());
  EXPECT_THAT(*pool.Allocate(2), ElementsAre(2, 3));
}

// Random allocate/free (including bad frees) against a std::set of free ids: every
// allocation must be the lowest free ids, and every failure must change nothing.
TEST(PagePoolTest, RandomOpsMatchSetModel) {
  for (uint32_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE(::testing::Message() << "seed " << seed);
    std::mt19937 rng(seed);
    constexpr int32_t kPages = 40;
    PagePool pool(kPages);
    std::set<int32_t> model_free;
    for (int32_t i = 0; i < kPages; ++i) model_free.insert(i);
    std::vector<std::vector<int32_t>> held;
    for (int step = 0; step < 600; ++step) {
      const int kind = std::uniform_int_distribution<int>(0, 9)(rng);
      if (kind < 5) {
        const int32_t count = std::uniform_int_distribution<int32_t>(0, 12)(rng);
        auto ids = pool.Allocate(count);
        if (count > static_cast<int32_t>(model_free.size())) {
          ASSERT_EQ(ids.status().code(), absl::StatusCode::kResourceExhausted);
        } else {
          ASSERT_TRUE(ids.ok()) << ids.status();
          std::vector<int32_t> expected(model_free.begin(), std::next(model_free.begin(), count));
          ASSERT_EQ(*ids, expected);
          for (int32_t id : expected) model_free.erase(id);
          if (!ids->empty()) held.push_back(*ids);
        }
      } else if (kind < 9 && !held.empty()) {
        const size_t pick = std::uniform_int_distribution<size_t>(0, held.size() - 1)(rng);
        ASSERT_TRUE(pool.Free(held[pick]).ok());
        model_free.insert(held[pick].begin(), held[pick].end());
        held.erase(held.begin() + pick);
      } else {
        // A bad batch: a free id (or out-of-range id) mixed into held ids.
        std::vector<int32_t> bad = held.empty() ? std::vector<int32_t>{} : held.front();
        bad.push_back(model_free.empty() ? kPages : *model_free.begin());
        ASSERT_EQ(pool.Free(bad).code(), absl::StatusCode::kFailedPrecondition);
      }
      ASSERT_EQ(pool.num_free(), static_cast<int32_t>(model_free.size()));
      for (int32_t id = 0; id < kPages; ++id) ASSERT_EQ(pool.IsAllocated(id), !model_free.count(id)) << id;
    }
  }
}

}  // namespace
}  // namespace kvgate::kv
