#include "kv_manager/proto_convert.h"

namespace kvgate::kv {
namespace {

using kvgate::v1::CompressionSpec;

// CompressionSpec and EvictionPlan share field names and types, so one template fills
// either from a domain spec and reads either back.
template <typename Message>
void FillSpec(const gates::EvictionSpec& spec, Message* out) {
  out->set_policy(spec.policy);
  out->set_keep_ratio(spec.keep_ratio);
  out->set_budget_tokens(spec.budget_tokens);
  if (spec.sink_tokens.has_value()) out->set_sink_tokens(*spec.sink_tokens);
  if (spec.recent_tokens.has_value()) out->set_recent_tokens(*spec.recent_tokens);
  out->set_head_budget(ToProto(spec.head_budget));
  for (const gates::TokenRange& range : spec.protected_ranges) {
    kvgate::v1::TokenRange* r = out->add_protected_ranges();
    r->set_begin(range.begin);
    r->set_end(range.end);
  }
}

template <typename Message>
gates::EvictionSpec ReadSpec(const Message& in) {
  gates::EvictionSpec spec;
  spec.policy = in.policy();
  spec.keep_ratio = in.keep_ratio();
  spec.budget_tokens = in.budget_tokens();
  if (in.has_sink_tokens()) spec.sink_tokens = in.sink_tokens();
  if (in.has_recent_tokens()) spec.recent_tokens = in.recent_tokens();
  spec.head_budget = FromProto(in.head_budget());
  spec.protected_ranges.reserve(in.protected_ranges_size());
  for (const kvgate::v1::TokenRange& r : in.protected_ranges()) {
    spec.protected_ranges.push_back(gates::TokenRange{r.begin(), r.end()});
  }
  return spec;
}

}  // namespace

kvgate::v1::SamplingParams ToProto(const engine::GenerateOptions& options) {
  kvgate::v1::SamplingParams params;
  params.set_max_tokens(options.max_tokens);
  params.set_temperature(options.sampling.temperature);
  params.set_top_p(options.sampling.top_p);
  params.set_top_k(options.sampling.top_k);
  params.set_min_p(options.sampling.min_p);
  params.set_seed(options.sampling.seed);
  for (const std::string& stop : options.stop) params.add_stop(stop);
  for (int32_t id : options.stop_token_ids) params.add_stop_token_ids(id);
  params.set_ignore_eos(options.ignore_eos);
  return params;
}

engine::GenerateOptions FromProto(const kvgate::v1::SamplingParams& params) {
  engine::GenerateOptions options;
  options.max_tokens = params.max_tokens();
  options.sampling.temperature = params.temperature();
  // The contract: "0 (unset) means 1 (disabled)".
  options.sampling.top_p = params.top_p() == 0.0f ? 1.0f : params.top_p();
  options.sampling.top_k = params.top_k();
  options.sampling.min_p = params.min_p();
  options.sampling.seed = params.has_seed() ? params.seed() : 0;
  options.stop.assign(params.stop().begin(), params.stop().end());
  options.stop_token_ids.assign(params.stop_token_ids().begin(), params.stop_token_ids().end());
  options.ignore_eos = params.ignore_eos();
  return options;
}

CompressionSpec::HeadBudget ToProto(gates::HeadBudget head_budget) {
  switch (head_budget) {
    case gates::HeadBudget::kPolicyDefault:
      return CompressionSpec::HEAD_BUDGET_UNSPECIFIED;
    case gates::HeadBudget::kUniform:
      return CompressionSpec::UNIFORM;
    case gates::HeadBudget::kAdaptive:
      return CompressionSpec::ADAPTIVE;
  }
  return CompressionSpec::HEAD_BUDGET_UNSPECIFIED;
}

gates::HeadBudget FromProto(CompressionSpec::HeadBudget head_budget) {
  switch (head_budget) {
    case CompressionSpec::UNIFORM:
      return gates::HeadBudget::kUniform;
    case CompressionSpec::ADAPTIVE:
      return gates::HeadBudget::kAdaptive;
    default:  // HEAD_BUDGET_UNSPECIFIED and values outside the enum
      return gates::HeadBudget::kPolicyDefault;
  }
}

CompressionSpec ToProto(const gates::EvictionSpec& spec) {
  CompressionSpec out;
  FillSpec(spec, &out);
  return out;
}

gates::EvictionSpec FromProto(const CompressionSpec& spec) { return ReadSpec(spec); }

kvgate::v1::EvictionPlan ToPlanProto(const gates::EvictionSpec& spec) {
  kvgate::v1::EvictionPlan out;
  FillSpec(spec, &out);
  return out;
}

gates::EvictionSpec FromProto(const kvgate::v1::EvictionPlan& plan) { return ReadSpec(plan); }

}  // namespace kvgate::kv
