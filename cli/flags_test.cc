#include "cli/flags.h"

#include <gtest/gtest.h>

namespace kvgate::cli {
namespace {

TEST(FlagsTest, ParsesValuesSwitchesAndLists) {
  auto flags = Flags::Parse({"--model", "m", "--json", "--max-tokens=5", "--ids", "1, 2,3"},
                            {"model", "max-tokens", "ids"}, {"json"});
  ASSERT_TRUE(flags.ok()) << flags.status();
  EXPECT_EQ(*flags->String("model"), "m");
  EXPECT_TRUE(flags->Has("json"));
  EXPECT_EQ(**flags->Int("max-tokens"), 5);
  EXPECT_EQ(**flags->IntList("ids"), (std::vector<int32_t>{1, 2, 3}));
  EXPECT_FALSE(flags->String("absent").has_value());
}

TEST(FlagsTest, ErrorsNameTheFlag) {
  EXPECT_NE(Flags::Parse({"--nope"}, {}, {}).status().message().find("--nope"), std::string::npos);
  EXPECT_NE(Flags::Parse({"--model"}, {"model"}, {}).status().message().find("needs a value"), std::string::npos);
  EXPECT_NE(Flags::Parse({"stray"}, {}, {}).status().message().find("stray"), std::string::npos);
  auto flags = Flags::Parse({"--n", "x1"}, {"n"}, {});
  ASSERT_TRUE(flags.ok());
  EXPECT_NE(flags->Int("n").status().message().find("--n"), std::string::npos);
  EXPECT_FALSE(flags->Double("n").ok());
  EXPECT_FALSE(flags->IntList("n").ok());
}

}  // namespace
}  // namespace kvgate::cli
