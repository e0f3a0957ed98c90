// File: reading and writing the gate weight files of gates/ (safetensors, one file per
// gate set; formats in gates/README.md). Every mismatch with the model is an
// INVALID_ARGUMENT that starts "gate weights do not fit the model: " and names the
// metadata key or tensor at fault.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace kvgate::engine {
class SafetensorsFile;
}

namespace kvgate::gates {

inline constexpr char kGateMismatch[] = "gate weights do not fit the model: ";

class GateWeightFile {
 public:
  // Opens `path` (a .safetensors file) and checks metadata["format"] == expected_format.
  // NOT_FOUND if the file cannot be opened; INVALID_ARGUMENT for a malformed file or a
  // different format.
  static absl::StatusOr<GateWeightFile> Open(const std::string& path,
                                             const std::string& expected_format);
  GateWeightFile(GateWeightFile&&) noexcept;
  GateWeightFile& operator=(GateWeightFile&&) noexcept;
  ~GateWeightFile();

  const std::string& path() const { return path_; }
  // Integer metadata value; INVALID_ARGUMENT if missing or not an integer.
  absl::StatusOr<int64_t> MetadataInt(const std::string& key) const;
  // Float metadata value, or `fallback` if the key is absent.
  absl::StatusOr<double> MetadataDouble(const std::string& key, double fallback) const;
  // Checks an integer metadata value against the model's.
  absl::Status ExpectMetadata(const std::string& key, int64_t model_value) const;
  // Reads a tensor (F32, F16 or BF16, converted exactly) of exactly `shape`.
  absl::StatusOr<std::vector<float>> ReadFloat32(const std::string& name,
                                                 const std::vector<int64_t>& shape);
  // INVALID_ARGUMENT naming the first tensor never read by ReadFloat32 (a file written
  // for another layout must not load silently).
  absl::Status ExpectAllRead() const;

 private:
  GateWeightFile() = default;
  std::string path_;
  std::unique_ptr<engine::SafetensorsFile> file_;
  std::set<std::string> read_;
};

struct NamedTensor {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;  // row-major, written as F32
};

// Writes a safetensors file of F32 tensors with string metadata.
absl::Status WriteSafetensorsF32(const std::string& path, const std::vector<NamedTensor>& tensors,
                                 const std::map<std::string, std::string>& metadata);

}  // namespace kvgate::gates
