#include "kv_manager/plan_proto.h"

#include "absl/strings/str_cat.h"
#include "kv_manager/proto_convert.h"

namespace kvgate::kv {
namespace {

// proto3 enums are open: a value outside HeadBudget reaches us as a plain int.
absl::Status CheckHeadBudget(int value) {
  switch (value) {
    case v1::CompressionSpec::HEAD_BUDGET_UNSPECIFIED:
    case v1::CompressionSpec::UNIFORM:
    case v1::CompressionSpec::ADAPTIVE:
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("head_budget: unknown value ", value, " (HEAD_BUDGET_UNSPECIFIED, UNIFORM or ADAPTIVE)"));
  }
}

}  // namespace

absl::StatusOr<gates::EvictionSpec> EvictionSpecFromProto(const v1::CompressionSpec& proto) {
  absl::Status head_budget = CheckHeadBudget(static_cast<int>(proto.head_budget()));
  if (!head_budget.ok()) return head_budget;
  return FromProto(proto);
}

absl::StatusOr<gates::EvictionSpec> EvictionSpecFromPlan(const v1::EvictionPlan& plan) {
  absl::Status head_budget = CheckHeadBudget(static_cast<int>(plan.head_budget()));
  if (!head_budget.ok()) return head_budget;
  return FromProto(plan);
}

v1::EvictionPlan EvictionPlanToProto(const gates::EvictionSpec& spec) { return ToPlanProto(spec); }

}  // namespace kvgate::kv
