// File: the proto mapping of eviction specs (house-style section 5: FromProto/ToProto in
// one place). kvgate.v1.CompressionSpec (what a request asks) and kvgate.v1.EvictionPlan
// (what the KV manager fixed in the ticket) both map to gates::EvictionSpec, the domain
// type every policy consumes. The router validates with it, the KV manager fixes plans
// with it, and the prefill worker turns ticket.plan back into the spec it runs.
#pragma once

#include "absl/status/statusor.h"
#include "gates/eviction_spec.h"
#include "kvgate/v1/kv_manager.pb.h"

namespace kvgate::kv {

// Field by field; an empty policy stays empty (the caller fills its default). The only
// error is a head_budget value outside the enum (INVALID_ARGUMENT naming `head_budget`);
// the values themselves are checked by gates::ValidateEvictionSpec.
absl::StatusOr<gates::EvictionSpec> EvictionSpecFromProto(const v1::CompressionSpec& proto);
absl::StatusOr<gates::EvictionSpec> EvictionSpecFromPlan(const v1::EvictionPlan& plan);

v1::EvictionPlan EvictionPlanToProto(const gates::EvictionSpec& spec);

}  // namespace kvgate::kv
