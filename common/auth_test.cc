// common/auth.h: the bearer scheme in any case, and the constant-time comparison.
#include "common/auth.h"

#include <gtest/gtest.h>

namespace kvgate {
namespace {

TEST(AuthTest, BearerSchemeIsCaseInsensitive) {
  EXPECT_EQ(BearerCredentials("Bearer abc"), "abc");
  EXPECT_EQ(BearerCredentials("bearer abc"), "abc");
  EXPECT_EQ(BearerCredentials("BEARER   abc  "), "abc");
  EXPECT_EQ(BearerCredentials("bEaReR\tabc"), "abc");
}

TEST(AuthTest, OtherSchemesAndMalformedValuesCarryNoCredentials) {
  EXPECT_EQ(BearerCredentials("Basic abc"), "");
  EXPECT_EQ(BearerCredentials("Bearerabc"), "");
  EXPECT_EQ(BearerCredentials("Bearer"), "");
  EXPECT_EQ(BearerCredentials("abc"), "");
  EXPECT_EQ(BearerCredentials(""), "");
}

TEST(AuthTest, ConstantTimeEquals) {
  EXPECT_TRUE(ConstantTimeEquals("secret", "secret"));
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secreT"));
  EXPECT_FALSE(ConstantTimeEquals("secret", "secret2"));
  EXPECT_FALSE(ConstantTimeEquals("secret", ""));
  EXPECT_FALSE(ConstantTimeEquals(std::string_view("a\0b", 3), "a"));
}

}  // namespace
}  // namespace kvgate
