// File: the two credentials a kvgate server checks, header-only so that every service
// library can use them without linking the edge:
//
//   the client token   public kvgate.v1.Inference calls carry "authorization: Bearer T"
//                      (scheme case-insensitive, RFC 6750 / RFC 7235); checked in
//                      constant time.
//   the internal token internal services (KvManager, PrefillWorker, DecodeWorker,
//                      KvTransfer) of split roles require "kvgate-internal-token: T",
//                      which the components' channels add to every call (ChannelPool).
//
// An empty configured token means "no check": `serve` keeps its internal services on an
// in-process server with no listener at all, and mutual TLS may replace the internal token.
#pragma once

#include <cctype>
#include <cstddef>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

namespace kvgate {

// Metadata key of the internal token.
inline constexpr char kInternalTokenKey[] = "kvgate-internal-token";

// True when a == b, in time that depends only on the lengths (never on where the first
// difference is).
inline bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  const size_t n = a.size() > b.size() ? a.size() : b.size();
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

// The credentials of an "authorization" value with the Bearer scheme (any case, one or
// more spaces after it); empty when the value uses another scheme.
inline std::string_view BearerCredentials(std::string_view value) {
  constexpr std::string_view kScheme = "bearer";
  if (value.size() <= kScheme.size()) return {};
  for (size_t i = 0; i < kScheme.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(value[i])) != kScheme[i]) return {};
  }
  size_t i = kScheme.size();
  if (value[i] != ' ' && value[i] != '\t') return {};
  while (i < value.size() && (value[i] == ' ' || value[i] == '\t')) ++i;
  std::string_view credentials = value.substr(i);
  while (!credentials.empty() && (credentials.back() == ' ' || credentials.back() == '\t')) {
    credentials.remove_suffix(1);
  }
  return credentials;
}

// UNAUTHENTICATED unless the call carries "authorization: Bearer <token>"; OK when
// `token` is empty.
template <typename Context>
grpc::Status CheckClientToken(const Context& context, const std::string& token) {
  if (token.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata");
  }
  const std::string_view value(it->second.data(), it->second.size());
  if (!ConstantTimeEquals(BearerCredentials(value), token)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the bearer token is not valid");
  }
  return grpc::Status::OK;
}

// UNAUTHENTICATED unless the call carries the internal token; OK when `token` is empty.
template <typename Context>
grpc::Status CheckInternalToken(const Context& context, const std::string& token) {
  if (token.empty()) return grpc::Status::OK;
  const auto& metadata = context.client_metadata();
  auto it = metadata.find(kInternalTokenKey);
  if (it == metadata.end() || !ConstantTimeEquals(std::string_view(it->second.data(), it->second.size()), token)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "internal service: this call does not carry the components' internal token");
  }
  return grpc::Status::OK;
}

}  // namespace kvgate
