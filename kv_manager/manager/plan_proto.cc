#include "kv_manager/manager/plan_proto.h"

#include "absl/strings/str_cat.h"

namespace kvgate::kv {
namespace {

absl::StatusOr<gates::HeadBudget> HeadBudgetFromProto(int value) {
  switch (value) {
    case v1::CompressionSpec::HEAD_BUDGET_UNSPECIFIED:
      return gates::HeadBudget::kPolicyDefault;
    case v1::CompressionSpec::UNIFORM:
      return gates::HeadBudget::kUniform;
    case v1::CompressionSpec::ADAPTIVE:
      return gates::HeadBudget::kAdaptive;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("head_budget: unknown value ", value,
                       " (HEAD_BUDGET_UNSPECIFIED, UNIFORM or ADAPTIVE)"));
  }
}

v1::CompressionSpec::HeadBudget HeadBudgetToProto(gates::HeadBudget value) {
  switch (value) {
    case gates::HeadBudget::kPolicyDefault:
      return v1::CompressionSpec::HEAD_BUDGET_UNSPECIFIED;
    case gates::HeadBudget::kUniform:
      return v1::CompressionSpec::UNIFORM;
    case gates::HeadBudget::kAdaptive:
      return v1::CompressionSpec::ADAPTIVE;
  }
  return v1::CompressionSpec::HEAD_BUDGET_UNSPECIFIED;
}

// CompressionSpec and EvictionPlan carry the same fields under the same names.
template <typename Message>
absl::StatusOr<gates::EvictionSpec> SpecFrom(const Message& m) {
  gates::EvictionSpec spec;
  spec.policy = m.policy();
  spec.keep_ratio = m.keep_ratio();
  spec.budget_tokens = m.budget_tokens();
  if (m.has_sink_tokens()) spec.sink_tokens = m.sink_tokens();
  if (m.has_recent_tokens()) spec.recent_tokens = m.recent_tokens();
  auto head_budget = HeadBudgetFromProto(static_cast<int>(m.head_budget()));
  if (!head_budget.ok()) return head_budget.status();
  spec.head_budget = *head_budget;
  spec.protected_ranges.reserve(m.protected_ranges_size());
  for (const v1::TokenRange& r : m.protected_ranges()) {
    spec.protected_ranges.push_back(gates::TokenRange{r.begin(), r.end()});
  }
  return spec;
}

}  // namespace

absl::StatusOr<gates::EvictionSpec> EvictionSpecFromProto(const v1::CompressionSpec& proto) {
  return SpecFrom(proto);
}

absl::StatusOr<gates::EvictionSpec> EvictionSpecFromPlan(const v1::EvictionPlan& plan) {
  return SpecFrom(plan);
}

v1::EvictionPlan EvictionPlanToProto(const gates::EvictionSpec& spec) {
  v1::EvictionPlan plan;
  plan.set_policy(spec.policy);
  plan.set_keep_ratio(spec.keep_ratio);
  plan.set_budget_tokens(spec.budget_tokens);
  if (spec.sink_tokens.has_value()) plan.set_sink_tokens(*spec.sink_tokens);
  if (spec.recent_tokens.has_value()) plan.set_recent_tokens(*spec.recent_tokens);
  plan.set_head_budget(HeadBudgetToProto(spec.head_budget));
  for (const gates::TokenRange& r : spec.protected_ranges) {
    v1::TokenRange* out = plan.add_protected_ranges();
    out->set_begin(r.begin);
    out->set_end(r.end);
  }
  return plan;
}

}  // namespace kvgate::kv
