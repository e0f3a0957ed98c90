// File: memory-mapped reader of Hugging Face safetensors checkpoints, single-file
// (model.safetensors) or sharded (model.safetensors.index.json). Every header field is
// checked against the file before any byte is read, so a truncated file or a header
// that lies about sizes is an error, never an out-of-bounds read.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvgate::engine {

enum class DType { kF32, kF16, kBF16, kOther };

struct TensorView {
  std::string name;
  std::string dtype_name;  // as written in the header: "F32", "BF16", ...
  DType dtype = DType::kOther;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // inside the mapping; unaligned in general
  size_t bytes = 0;
  std::string file;  // the file it lives in, for messages
};

// One mapped .safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  void* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory.
class CheckpointTensors {
 public:
  static absl::StatusOr<std::unique_ptr<CheckpointTensors>> Open(const std::string& model_dir);

  bool Contains(const std::string& name) const;
  // Resolves `name` directly or through a `__metadata__` alias (the TinyStories
  // checkpoint stores only lm_head.weight and maps model.embed_tokens.weight onto it).
  absl::StatusOr<const TensorView*> Find(const std::string& name) const;
  // Reads a tensor as float32 (F32, F16 and BF16 are converted exactly), checking its
  // shape.
  absl::StatusOr<std::vector<float>> ReadFloat32(const std::string& name,
                                                 const std::vector<int64_t>& expected_shape) const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
  std::map<std::string, std::string> aliases_;
};

// Exact conversions used by ReadFloat32 (exposed for tests).
float Bf16ToFloat(uint16_t bits);
float F16ToFloat(uint16_t bits);

}  // namespace kvgate::engine
