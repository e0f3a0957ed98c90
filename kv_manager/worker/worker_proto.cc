#include "kv_manager/worker/worker_proto.h"

namespace kvgate::kv {

engine::GenerateOptions GenerateOptionsFromProto(const v1::SamplingParams& s) {
  engine::GenerateOptions options;
  if (s.max_tokens() > 0) options.max_tokens = s.max_tokens();
  options.sampling.temperature = s.temperature();
  options.sampling.top_p = s.top_p() == 0.0f ? 1.0f : s.top_p();
  options.sampling.top_k = s.top_k();
  options.sampling.min_p = s.min_p();
  options.sampling.seed = s.has_seed() ? s.seed() : 0;
  options.stop.assign(s.stop().begin(), s.stop().end());
  options.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  options.ignore_eos = s.ignore_eos();
  return options;
}

}  // namespace kvgate::kv
