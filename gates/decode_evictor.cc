#include "gates/decode_evictor.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace kvgate::gates::internal {
namespace {

constexpr uint32_t kStateVersion = 1;

void AppendWord(uint32_t word, std::string* out) {
  char bytes[4];
  for (int i = 0; i < 4; ++i) bytes[i] = static_cast<char>((word >> (8 * i)) & 0xff);
  out->append(bytes, 4);
}

uint32_t ReadWord(std::string_view bytes, size_t at) {
  uint32_t word = 0;
  for (int i = 0; i < 4; ++i) word |= static_cast<uint32_t>(static_cast<unsigned char>(bytes[at + i])) << (8 * i);
  return word;
}

}  // namespace

std::string PackState(std::string_view policy, std::initializer_list<int32_t> values, std::string_view tail) {
  std::string out(policy);
  out.push_back('\0');
  AppendWord(kStateVersion, &out);
  AppendWord(static_cast<uint32_t>(values.size()), &out);
  for (int32_t v : values) AppendWord(static_cast<uint32_t>(v), &out);
  out.append(tail);
  return out;
}

absl::StatusOr<PackedState> UnpackState(std::string_view bytes, std::string_view policy_name, size_t count) {
  const std::string policy(policy_name);  // this abseil's StrCat takes no std::string_view
  const size_t tag = policy.size() + 1;
  if (bytes.size() < tag || bytes.substr(0, policy.size()) != policy_name || bytes[policy.size()] != '\0') {
    return absl::InvalidArgumentError(absl::StrCat("decode eviction state is not one of policy ", policy));
  }
  const size_t head = tag + 8 + 4 * count;
  if (bytes.size() < tag + 8) {
    return absl::InvalidArgumentError(absl::StrCat(policy, " decode eviction state: ", bytes.size(), " bytes is truncated"));
  }
  const uint32_t version = ReadWord(bytes, tag), stored = ReadWord(bytes, tag + 4);
  if (version != kStateVersion || stored != count || bytes.size() < head) {
    return absl::InvalidArgumentError(absl::StrCat(policy, " decode eviction state: version ", version, " with ", stored,
                                                   " values in ", bytes.size(), " bytes; expected version ",
                                                   kStateVersion, " with ", count));
  }
  PackedState state;
  state.values.resize(count);
  for (size_t i = 0; i < count; ++i) state.values[i] = static_cast<int32_t>(ReadWord(bytes, tag + 8 + 4 * i));
  state.tail = bytes.substr(head);
  return state;
}

}  // namespace kvgate::gates::internal
