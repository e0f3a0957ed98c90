#include "cuda/slab_ranges.h"

#include <gtest/gtest.h>

#include <random>
#include <vector>

namespace kvgate::ops {
namespace {

TEST(SlabRangesTest, NoSlabNoRange) {
  SlabRanges ranges(256, 1 << 20);
  EXPECT_FALSE(ranges.Take(1).has_value());
  EXPECT_FALSE(ranges.Take(0).has_value());
  EXPECT_EQ(ranges.NewSlabBytes(1), uint64_t{1} << 20);
  EXPECT_EQ(ranges.NewSlabBytes((3 << 20) + 1), (uint64_t{3} << 20) + 256) << "a large request gets its own slab";
}

TEST(SlabRangesTest, FirstFitAlignedAndMergedBack) {
  SlabRanges ranges(256, 4096);
  ASSERT_EQ(ranges.AddSlab(4096), 0);
  auto a = ranges.Take(100), b = ranges.Take(300), c = ranges.Take(256);
  ASSERT_TRUE(a && b && c);
  EXPECT_EQ(a->offset, 0u);
  EXPECT_EQ(a->bytes, 256u);
  EXPECT_EQ(b->offset, 256u);
  EXPECT_EQ(b->bytes, 512u);
  EXPECT_EQ(c->offset, 768u);
  EXPECT_EQ(ranges.free_bytes(), 4096u - 1024u);
  ranges.Give(*b);
  auto d = ranges.Take(200);  // lands in b's hole, the first fit
  ASSERT_TRUE(d);
  EXPECT_EQ(d->offset, 256u);
  ranges.Give(*a);
  ranges.Give(*c);
  ranges.Give(*d);
  EXPECT_EQ(ranges.free_bytes(), 4096u);
  auto whole = ranges.Take(4096);  // only possible once every neighbour merged again
  ASSERT_TRUE(whole);
  EXPECT_EQ(whole->offset, 0u);
  EXPECT_FALSE(ranges.Take(1).has_value());
}

TEST(SlabRangesTest, SecondSlabWhenTheFirstIsFull) {
  SlabRanges ranges(256, 1024);
  ranges.AddSlab(1024);
  auto a = ranges.Take(1024);
  ASSERT_TRUE(a);
  EXPECT_FALSE(ranges.Take(512).has_value());
  ASSERT_EQ(ranges.AddSlab(ranges.NewSlabBytes(512)), 1);
  auto b = ranges.Take(512);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->slab, 1);
  ranges.Give(*a);
  auto c = ranges.Take(512);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->slab, 0) << "the lowest slab with room comes first";
}

// Random takes and gives never hand out overlapping ranges, and all memory comes back.
TEST(SlabRangesTest, RandomTakesNeverOverlap) {
  SlabRanges ranges(64, 1 << 16);
  ranges.AddSlab(1 << 16);
  ranges.AddSlab(1 << 15);
  std::mt19937 rng(7);
  std::vector<SlabRanges::Range> held;
  for (int step = 0; step < 5000; ++step) {
    if (held.empty() || rng() % 3 != 0) {
      auto r = ranges.Take(1 + rng() % 3000);
      if (!r) continue;
      for (const auto& other : held) {
        if (other.slab != r->slab) continue;
        const bool disjoint = r->offset + r->bytes <= other.offset || other.offset + other.bytes <= r->offset;
        ASSERT_TRUE(disjoint) << "step " << step;
      }
      ASSERT_LE(r->offset + r->bytes, ranges.slab_bytes(r->slab));
      held.push_back(*r);
    } else {
      const size_t i = rng() % held.size();
      ranges.Give(held[i]);
      held.erase(held.begin() + static_cast<long>(i));
    }
  }
  for (const auto& r : held) ranges.Give(r);
  EXPECT_EQ(ranges.free_bytes(), uint64_t{(1 << 16) + (1 << 15)});
}

}  // namespace
}  // namespace kvgate::ops
