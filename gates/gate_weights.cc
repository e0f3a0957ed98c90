#include "gates/gate_weights.h"

#include <cstring>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/safetensors.h"
#include "nlohmann/json.hpp"

namespace kvgate::gates {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

GateWeightFile::GateWeightFile(GateWeightFile&&) noexcept = default;
GateWeightFile& GateWeightFile::operator=(GateWeightFile&&) noexcept = default;
GateWeightFile::~GateWeightFile() = default;

absl::StatusOr<GateWeightFile> GateWeightFile::Open(const std::string& path,
                                                    const std::string& expected_format) {
  auto file = engine::SafetensorsFile::Open(path);
  if (!file.ok()) return file.status();
  GateWeightFile out;
  out.path_ = path;
  out.file_ = std::move(file).value();
  auto it = out.file_->metadata().find("format");
  if (it == out.file_->metadata().end()) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, path,
                                                   ": metadata 'format' is missing (expected '",
                                                   expected_format, "')"));
  }
  if (it->second != expected_format) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, path, ": metadata 'format' is '",
                                                   it->second, "', expected '", expected_format,
                                                   "'"));
  }
  return out;
}

absl::StatusOr<int64_t> GateWeightFile::MetadataInt(const std::string& key) const {
  auto it = file_->metadata().find(key);
  if (it == file_->metadata().end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kGateMismatch, path_, ": metadata '", key, "' is missing"));
  }
  int64_t value = 0;
  if (!absl::SimpleAtoi(it->second, &value)) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, path_, ": metadata '", key,
                                                   "' is '", it->second, "', not an integer"));
  }
  return value;
}

absl::StatusOr<double> GateWeightFile::MetadataDouble(const std::string& key, double fallback) const {
  auto it = file_->metadata().find(key);
  if (it == file_->metadata().end()) return fallback;
  double value = 0;
  if (!absl::SimpleAtod(it->second, &value)) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, path_, ": metadata '", key,
                                                   "' is '", it->second, "', not a number"));
  }
  return value;
}

absl::Status GateWeightFile::ExpectMetadata(const std::string& key, int64_t model_value) const {
  auto value = MetadataInt(key);
  if (!value.ok()) return value.status();
  if (*value != model_value) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, path_, ": metadata '", key,
                                                   "' is ", *value, ", the model has ",
                                                   model_value));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> GateWeightFile::ReadFloat32(const std::string& name,
                                                               const std::vector<int64_t>& shape) {
  auto it = file_->tensors().find(name);
  if (it == file_->tensors().end()) {
    return absl::InvalidArgumentError(
        absl::StrCat(kGateMismatch, "tensor '", name, "' is missing from ", path_));
  }
  const engine::TensorView& view = it->second;
  if (view.shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, "tensor '", name, "' in ", path_,
                                                   " has shape ", ShapeString(view.shape),
                                                   ", expected ", ShapeString(shape)));
  }
  size_t elements = 1;
  for (int64_t d : shape) elements *= static_cast<size_t>(d);
  std::vector<float> out(elements);
  switch (view.dtype) {
    case engine::DType::kF32:
      if (elements > 0) std::memcpy(out.data(), view.data, elements * 4);
      break;
    case engine::DType::kBF16:
    case engine::DType::kF16:
      for (size_t i = 0; i < elements; ++i) {
        uint16_t bits;
        std::memcpy(&bits, view.data + 2 * i, 2);
        out[i] = view.dtype == engine::DType::kBF16 ? engine::Bf16ToFloat(bits)
                                                    : engine::F16ToFloat(bits);
      }
      break;
    case engine::DType::kOther:
      return absl::InvalidArgumentError(absl::StrCat(kGateMismatch, "tensor '", name, "' in ", path_,
                                                     " has dtype ", view.dtype_name,
                                                     "; gate weights must be F32, F16 or BF16"));
  }
  read_.insert(name);
  return out;
}

absl::Status GateWeightFile::ExpectAllRead() const {
  for (const auto& [name, view] : file_->tensors()) {
    if (!read_.contains(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat(kGateMismatch, "unexpected tensor '", name, "' in ", path_));
    }
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensorsF32(const std::string& path, const std::vector<NamedTensor>& tensors,
                                 const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) {
    nlohmann::json meta = nlohmann::json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  uint64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    size_t elements = 1;
    for (int64_t d : t.shape) elements *= static_cast<size_t>(d);
    if (elements != t.data.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': shape ",
                                                     ShapeString(t.shape), " needs ", elements,
                                                     " values, got ", t.data.size()));
    }
    header[t.name] = {{"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + 4 * elements}}};
    offset += 4 * elements;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat(path, ": cannot open for writing"));
  const uint64_t header_bytes = text.size();
  out.write(reinterpret_cast<const char*>(&header_bytes), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const NamedTensor& t : tensors) {
    out.write(reinterpret_cast<const char*>(t.data.data()),
              static_cast<std::streamsize>(t.data.size() * sizeof(float)));
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

}  // namespace kvgate::gates
