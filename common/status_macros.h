// File: status propagation macros used across kvgate.
//
// The pinned abseil (Debian 12: 20220623) has no ABSL_RETURN_IF_ERROR, so these are
// the few lines each; alias them to the ABSL_ ones once abseil >= 20260526.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define KVGATE_STATUS_CONCAT_INNER_(a, b) a##b
#define KVGATE_STATUS_CONCAT_(a, b) KVGATE_STATUS_CONCAT_INNER_(a, b)

#define KVGATE_RETURN_IF_ERROR(expr)                 \
  do {                                               \
    ::absl::Status kvgate_status_ = (expr);          \
    if (!kvgate_status_.ok()) return kvgate_status_; \
  } while (0)

#define KVGATE_ASSIGN_OR_RETURN(lhs, expr) \
  KVGATE_ASSIGN_OR_RETURN_IMPL_(KVGATE_STATUS_CONCAT_(kvgate_statusor_, __LINE__), lhs, expr)

#define KVGATE_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()
