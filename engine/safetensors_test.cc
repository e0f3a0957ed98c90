#include "engine/safetensors.h"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>

#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"

namespace kvgate::engine {
namespace {

using nlohmann::json;

// Writes a safetensors file with the given header and raw data bytes.
void WriteFile(const std::filesystem::path& path, const std::string& header, const std::string& data,
               uint64_t claimed_header_bytes = 0) {
  std::ofstream out(path, std::ios::binary);
  uint64_t n = claimed_header_bytes ? claimed_header_bytes : header.size();
  out.write(reinterpret_cast<const char*>(&n), 8);
  out << header << data;
}

std::string Floats(std::initializer_list<float> values) {
  std::string bytes(values.size() * 4, '\0');
  std::memcpy(bytes.data(), values.begin(), bytes.size());
  return bytes;
}

class SafetensorsTest : public ::testing::Test {
 protected:
  std::filesystem::path dir_ = testing::MakeTempDir("safetensors");
  void TearDown() override { std::filesystem::remove_all(dir_); }
};

TEST_F(SafetensorsTest, ReadsF32Bf16F16AndAliases) {
  // bf16 0x3f80 = 1.0, 0xc000 = -2.0; f16 0x3c00 = 1.0, 0x0001 = 2^-24 (subnormal).
  std::string data = Floats({1.5f, -2.0f});
  data += std::string("\x80\x3f\x00\xc0", 4);
  data += std::string("\x00\x3c\x01\x00", 4);
  json header = {{"__metadata__", {{"format", "pt"}, {"b.alias", "a"}}},
                 {"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
                 {"b", {{"dtype", "BF16"}, {"shape", {1, 2}}, {"data_offsets", {8, 12}}}},
                 {"c", {{"dtype", "F16"}, {"shape", {2}}, {"data_offsets", {12, 16}}}}};
  WriteFile(dir_ / "model.safetensors", header.dump(), data);
  auto checkpoint = CheckpointTensors::Open(dir_.string());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(*(*checkpoint)->ReadFloat32("a", {2}), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(*(*checkpoint)->ReadFloat32("b", {1, 2}), (std::vector<float>{1.0f, -2.0f}));
  EXPECT_EQ(*(*checkpoint)->ReadFloat32("c", {2}), (std::vector<float>{1.0f, std::ldexp(1.0f, -24)}));
  EXPECT_EQ(*(*checkpoint)->ReadFloat32("b.alias", {2}), (std::vector<float>{1.5f, -2.0f}));
  auto wrong_shape = (*checkpoint)->ReadFloat32("a", {3});
  EXPECT_EQ(wrong_shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong_shape.status().message().find("shape [2]"), std::string::npos) << wrong_shape.status();
  EXPECT_EQ((*checkpoint)->ReadFloat32("missing", {1}).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(SafetensorsTest, ReadsShardedCheckpoints) {
  json h1 = {{"x", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}}};
  json h2 = {{"y", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}}};
  WriteFile(dir_ / "part-1.safetensors", h1.dump(), Floats({3.0f}));
  WriteFile(dir_ / "part-2.safetensors", h2.dump(), Floats({4.0f}));
  std::ofstream(dir_ / "model.safetensors.index.json")
      << json{{"weight_map", {{"x", "part-1.safetensors"}, {"y", "part-2.safetensors"}}}}.dump();
  auto checkpoint = CheckpointTensors::Open(dir_.string());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ(*(*checkpoint)->ReadFloat32("y", {1}), (std::vector<float>{4.0f}));
}

struct BadFileCase {
  std::string name;
  std::string header;
  std::string data;
  uint64_t claimed_header_bytes;
  std::string expected_message;
};

TEST_F(SafetensorsTest, RejectsBrokenFilesWithClearErrors) {
  const std::string good_entry = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::vector<BadFileCase> cases = {
      {"truncated data", good_entry, Floats({1.0f}), 0, "exceed the 4 data bytes"},
      {"header longer than file", good_entry, "", 1000, "header claims 1000 bytes"},
      {"offsets lie about size", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", Floats({1, 2}), 0,
       "needs 12"},
      {"reversed offsets", R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", Floats({1, 2}), 0, "exceed"},
      {"not json", "{not json", "", 0, "not a JSON object"},
      {"unknown dtype", R"({"a":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", "x", 0, "unknown dtype"},
      {"negative dim", R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", Floats({1}), 0, "negative"},
      {"missing offsets", R"({"a":{"dtype":"F32","shape":[1]}})", Floats({1}), 0, "data_offsets"},
  };
  for (const BadFileCase& c : cases) {
    WriteFile(dir_ / "model.safetensors", c.header, c.data, c.claimed_header_bytes);
    auto checkpoint = CheckpointTensors::Open(dir_.string());
    ASSERT_FALSE(checkpoint.ok()) << c.name;
    EXPECT_EQ(checkpoint.status().code(), absl::StatusCode::kInvalidArgument) << c.name << ": " << checkpoint.status();
    EXPECT_NE(checkpoint.status().message().find(c.expected_message), std::string::npos)
        << c.name << ": " << checkpoint.status();
  }
  // A file shorter than the 8-byte length field.
  std::ofstream(dir_ / "model.safetensors") << "abc";
  EXPECT_NE(CheckpointTensors::Open(dir_.string()).status().message().find("truncated"), std::string::npos);
}

TEST_F(SafetensorsTest, MissingCheckpointIsNotFound) {
  auto checkpoint = CheckpointTensors::Open(dir_.string());
  EXPECT_EQ(checkpoint.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(checkpoint.status().message().find("model.safetensors"), std::string::npos);
}

TEST_F(SafetensorsTest, NonFloatWeightsAreRejectedWhenRead) {
  json header = {{"a", {{"dtype", "I64"}, {"shape", {1}}, {"data_offsets", {0, 8}}}}};
  WriteFile(dir_ / "model.safetensors", header.dump(), std::string(8, '\0'));
  auto checkpoint = CheckpointTensors::Open(dir_.string());
  ASSERT_TRUE(checkpoint.ok());
  EXPECT_NE((*checkpoint)->ReadFloat32("a", {1}).status().message().find("I64"), std::string::npos);
}

}  // namespace
}  // namespace kvgate::engine
