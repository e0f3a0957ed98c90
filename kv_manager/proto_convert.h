// File: the one mapping between the wire messages of a generation request
// (kvgate.v1.SamplingParams, CompressionSpec, EvictionPlan) and the engine's domain
// structs (engine::GenerateOptions, gates::EvictionSpec). The router, the KV manager, the prefill worker
// and the decode worker all convert through here (house-style section 5).
//
// These are plain field-by-field mappings; they never validate (ValidateGenerateRequest
// in router/request_validation.h does, on the proto, before converting). The only proto
// "unset" value resolved here is the one whose meaning the contract fixes: top_p 0 means
// 1. Unset values whose meaning is the server's choice stay unset in the domain struct
// (max_tokens 0, an empty policy, keep_ratio 0, budget_tokens 0, an absent seed gives 0).
//
// Round trips: FromProto(ToProto(x)) == x for every domain value; ToProto(FromProto(p))
// == p for every proto that already holds resolved values (top_p != 0, seed set).
#pragma once

#include "engine/generator.h"
#include "gates/eviction_spec.h"
#include "kvgate/v1/inference.pb.h"
#include "kvgate/v1/kv_manager.pb.h"

namespace kvgate::kv {

// --- Sampling --------------------------------------------------------------------------
// ToProto always sets `seed` (a domain GenerateOptions always has one).
kvgate::v1::SamplingParams ToProto(const engine::GenerateOptions& options);
// top_p 0 -> 1; an absent seed -> 0 (check params.has_seed() to tell the two apart).
engine::GenerateOptions FromProto(const kvgate::v1::SamplingParams& params);

// --- Compression -----------------------------------------------------------------------
kvgate::v1::CompressionSpec::HeadBudget ToProto(gates::HeadBudget head_budget);
// Values outside the proto enum (proto3 enums are open) map to kPolicyDefault; the
// validator rejects them first.
gates::HeadBudget FromProto(kvgate::v1::CompressionSpec::HeadBudget head_budget);

kvgate::v1::CompressionSpec ToProto(const gates::EvictionSpec& spec);
// The policy string is copied as is (an empty one stays empty: "the server default").
gates::EvictionSpec FromProto(const kvgate::v1::CompressionSpec& spec);

// EvictionPlan is the CompressionSpec with the server defaults filled in (kv_manager).
kvgate::v1::EvictionPlan ToPlanProto(const gates::EvictionSpec& spec);
gates::EvictionSpec FromProto(const kvgate::v1::EvictionPlan& plan);

}  // namespace kvgate::kv
