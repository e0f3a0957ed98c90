// Crc32c: the published vectors and the bit-at-a-time definition, for the hardware path
// (crcutil) and the software one, at every length and alignment up to crcutil's largest
// stripe block (32 KiB) and past it.
#include "common/crc32c.h"

#include <gtest/gtest.h>

#include <random>
#include <string>

namespace kvgate {
namespace {

uint32_t BitwiseCrc32c(std::string_view data) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char byte : data) {
    crc ^= byte;
    for (int i = 0; i < 8; ++i) crc = (crc >> 1) ^ ((crc & 1u) ? 0x82F63B78u : 0u);
  }
  return ~crc;
}

using Crc32cFn = uint32_t (*)(std::string_view);

class Crc32cTest : public ::testing::TestWithParam<Crc32cFn> {};

TEST_P(Crc32cTest, KnownVectors) {
  const Crc32cFn crc = GetParam();
  EXPECT_EQ(crc("123456789"), 0xE3069283u);
  EXPECT_EQ(crc(""), 0u);
  // RFC 3720 (iSCSI) appendix B.4.
  EXPECT_EQ(crc(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(crc(std::string(32, '\xFF')), 0x62A8AB43u);
  std::string ascending(32, '\0'), descending(32, '\0');
  for (int i = 0; i < 32; ++i) ascending[i] = static_cast<char>(i), descending[i] = static_cast<char>(31 - i);
  EXPECT_EQ(crc(ascending), 0x46DD794Eu);
  EXPECT_EQ(crc(descending), 0x113FDB5Cu);
}

TEST_P(Crc32cTest, MatchesBitwiseDefinitionAtEveryLengthAndAlignment) {
  const Crc32cFn crc = GetParam();
  std::mt19937 rng(7);
  std::string data(300, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  for (size_t begin = 0; begin < 17; ++begin) {
    for (size_t size = 0; begin + size <= data.size(); size += 1 + size / 8) {
      const std::string_view part = std::string_view(data).substr(begin, size);
      ASSERT_EQ(crc(part), BitwiseCrc32c(part)) << "begin " << begin << " size " << size;
    }
  }
}

// crcutil switches to 3-stripe blocks of 512, 1024, 4096 and 32768 bytes: sizes around
// each boundary, from odd offsets.
TEST_P(Crc32cTest, MatchesBitwiseDefinitionAcrossStripeBlocks) {
  const Crc32cFn crc = GetParam();
  std::mt19937 rng(11);
  std::string data(3 * 32768 + 64, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  for (size_t block : {512u, 1024u, 4096u, 32768u, 65536u}) {
    for (size_t size : {block - 1, block, block + 1, block + 7, 2 * block + 3}) {
      for (size_t begin : {0u, 1u, 5u}) {
        if (begin + size > data.size()) continue;
        const std::string_view part = std::string_view(data).substr(begin, size);
        ASSERT_EQ(crc(part), BitwiseCrc32c(part)) << "begin " << begin << " size " << size;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, Crc32cTest, ::testing::Values(&Crc32c, &Crc32cSoftware),
                         [](const ::testing::TestParamInfo<Crc32cFn>& info) {
                           return info.index == 0 ? std::string("Selected") : std::string("Software");
                         });

// Every x86-64 CPU since 2008 (Nehalem, Bulldozer) has SSE4.2; this machine class must
// take the hardware path, or the checksum costs several times the transfer.
TEST(Crc32cHardwareTest, X86CpusWithSse42UseTheInstruction) {
#if defined(__x86_64__)
  if (!__builtin_cpu_supports("sse4.2")) GTEST_SKIP() << "this CPU has no SSE4.2";
  EXPECT_TRUE(Crc32cIsHardwareAccelerated());
#else
  GTEST_SKIP() << "not x86-64";
#endif
}

}  // namespace
}  // namespace kvgate
