// File: FromProto for the sampling parameters the workers receive, which the router
// already validated and completed (defaults filled in, seed chosen). The ticket's plan
// maps through kv_manager/manager/plan_proto.h.
#pragma once

#include "engine/generator.h"
#include "kvgate/v1/kv_manager.pb.h"

namespace kvgate::kv {

// max_tokens, sampling, stop strings and ids, ignore_eos; 0 / unset fields keep the
// engine defaults.
engine::GenerateOptions GenerateOptionsFromProto(const v1::SamplingParams& sampling);

}  // namespace kvgate::kv
