#include "engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "nlohmann/json.hpp"

namespace kvgate::engine {
namespace {

using json = nlohmann::json;

// A header beyond this is not a real checkpoint (the format's own limit is 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

absl::StatusOr<DType> ParseDType(const std::string& name, size_t* element_bytes) {
  if (name == "F32") { *element_bytes = 4; return DType::kF32; }
  if (name == "F16") { *element_bytes = 2; return DType::kF16; }
  if (name == "BF16") { *element_bytes = 2; return DType::kBF16; }
  static const std::map<std::string, size_t> kOthers = {
      {"F64", 8}, {"I64", 8}, {"U64", 8}, {"I32", 4}, {"U32", 4}, {"I16", 2}, {"U16", 2},
      {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}};
  auto it = kOthers.find(name);
  if (it == kOthers.end()) return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", name, "'"));
  *element_bytes = it->second;
  return DType::kOther;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

float Bf16ToFloat(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

float F16ToFloat(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000) << 16;
  uint32_t exponent = (bits >> 10) & 0x1f;
  uint32_t mantissa = bits & 0x3ff;
  uint32_t wide;
  if (exponent == 0x1f) {
    wide = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    wide = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    wide = sign;
  } else {
    // Subnormal half: normalise into a float32 normal.
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ff;
    wide = sign | (exponent << 23) | (mantissa << 13);
  }
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) munmap(mapping_, mapping_bytes_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat failed: ", std::strerror(errno)));
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": truncated safetensors file (", file_bytes, " bytes; the 8-byte header length is missing)"));
  }
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  void* mapping = mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapping == MAP_FAILED) {
    return absl::InternalError(absl::StrCat(path, ": mmap failed: ", std::strerror(errno)));
  }
  file->mapping_ = mapping;
  file->mapping_bytes_ = file_bytes;
  const uint8_t* base = static_cast<const uint8_t*>(mapping);

  uint64_t header_bytes = 0;
  std::memcpy(&header_bytes, base, 8);  // little-endian u64, as on every supported host
  if (header_bytes > kMaxHeaderBytes || header_bytes > file_bytes - 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": header claims ", header_bytes, " bytes but the file has only ", file_bytes - 8,
        " after the length field (truncated or not a safetensors file)"));
  }
  const uint64_t data_begin = 8 + header_bytes;
  const uint64_t data_bytes = file_bytes - data_begin;

  json header = json::parse(base + 8, base + data_begin, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(path, ": __metadata__ is not an object"));
      }
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (m.value().is_string()) file->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat(path, ": tensor '", name, "'");
    if (!entry.is_object() || !entry.contains("dtype") || !entry["dtype"].is_string() ||
        !entry.contains("shape") || !entry["shape"].is_array() ||
        !entry.contains("data_offsets") || !entry["data_offsets"].is_array() ||
        entry["data_offsets"].size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": header entry needs dtype, shape and data_offsets[2]"));
    }
    TensorView view;
    view.name = name;
    view.file = path;
    view.dtype_name = entry["dtype"].get<std::string>();
    size_t element_bytes = 0;
    auto dtype = ParseDType(view.dtype_name, &element_bytes);
    if (!dtype.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", dtype.status().message()));
    view.dtype = *dtype;
    uint64_t elements = 1;
    for (const json& d : entry["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": shape has a non-integer or negative dimension"));
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && elements > (1ull << 50) / dim) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": shape is absurdly large"));
      }
      elements *= dim;
      view.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& offsets = entry["data_offsets"];
    if (!offsets[0].is_number_unsigned() || !offsets[1].is_number_unsigned()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets must be non-negative integers"));
    }
    const uint64_t begin = offsets[0].get<uint64_t>(), end = offsets[1].get<uint64_t>();
    if (begin > end || end > data_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": data_offsets [", begin, ", ", end, ") exceed the ", data_bytes,
          " data bytes in the file (truncated file or lying header)"));
    }
    if (end - begin != elements * element_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          where, ": data_offsets span ", end - begin, " bytes but ", view.dtype_name, " ",
          ShapeString(view.shape), " needs ", elements * element_bytes));
    }
    view.data = base + data_begin + begin;
    view.bytes = end - begin;
    file->tensors_.emplace(name, std::move(view));
  }
  return file;
}

absl::StatusOr<std::unique_ptr<CheckpointTensors>> CheckpointTensors::Open(const std::string& model_dir) {
  namespace fs = std::filesystem;
  auto checkpoint = std::make_unique<CheckpointTensors>();
  const fs::path single = fs::path(model_dir) / "model.safetensors";
  const fs::path index = fs::path(model_dir) / "model.safetensors.index.json";
  std::vector<std::string> shard_paths;
  std::error_code ec;
  if (fs::exists(single, ec)) {
    shard_paths.push_back(single.string());
  } else if (fs::exists(index, ec)) {
    std::ifstream in(index);
    json parsed = json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (parsed.is_discarded() || !parsed.is_object() || !parsed.contains("weight_map") ||
        !parsed["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index.string(), ": expected a JSON object with a weight_map"));
    }
    std::set<std::string> shards;
    for (auto it = parsed["weight_map"].begin(); it != parsed["weight_map"].end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index.string(), ": weight_map['", it.key(), "'] is not a file name"));
      }
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos || shard.find("..") != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(index.string(), ": shard name '", shard, "' must be a plain file name"));
      }
      shards.insert(shard);
    }
    for (const std::string& shard : shards) shard_paths.push_back((fs::path(model_dir) / shard).string());
  } else {
    return absl::NotFoundError(absl::StrCat(
        model_dir, ": no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)"));
  }
  for (const std::string& path : shard_paths) {
    KVGATE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
    for (const auto& [name, view] : file->tensors()) {
      if (!checkpoint->by_name_.emplace(name, &view).second) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' appears in more than one shard"));
      }
    }
    for (const auto& [key, value] : file->metadata()) checkpoint->aliases_[key] = value;
    checkpoint->files_.push_back(std::move(file));
  }
  return checkpoint;
}

bool CheckpointTensors::Contains(const std::string& name) const { return Find(name).ok(); }

absl::StatusOr<const TensorView*> CheckpointTensors::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  if (it != by_name_.end()) return it->second;
  auto alias = aliases_.find(name);
  if (alias != aliases_.end()) {
    auto target = by_name_.find(alias->second);
    if (target != by_name_.end()) return target->second;
  }
  return absl::NotFoundError(absl::StrCat("checkpoint has no tensor '", name, "'"));
}

absl::StatusOr<std::vector<float>> CheckpointTensors::ReadFloat32(
    const std::string& name, const std::vector<int64_t>& expected_shape) const {
  KVGATE_ASSIGN_OR_RETURN(const TensorView* view, Find(name));
  if (view->shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' in ", view->file, " has shape ",
                                                   ShapeString(view->shape), ", the config implies ",
                                                   ShapeString(expected_shape)));
  }
  size_t elements = 1;
  for (int64_t d : view->shape) elements *= static_cast<size_t>(d);
  std::vector<float> out(elements);
  switch (view->dtype) {
    case DType::kF32:
      std::memcpy(out.data(), view->data, elements * 4);
      break;
    case DType::kBF16:
    case DType::kF16:
      for (size_t i = 0; i < elements; ++i) {
        uint16_t bits;
        std::memcpy(&bits, view->data + 2 * i, 2);
        out[i] = view->dtype == DType::kBF16 ? Bf16ToFloat(bits) : F16ToFloat(bits);
      }
      break;
    case DType::kOther:
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", name, "' has dtype ", view->dtype_name, "; only F32, F16 and BF16 weights are supported"));
  }
  return out;
}

}  // namespace kvgate::engine
