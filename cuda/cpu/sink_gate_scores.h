// File: SinkGateScores on the host (ops::SinkGateScoresArgs with host pointers): the CPU
// backend's op and the gate of gates/fast_kvzip on host inputs run this one function, so
// their scores are the same bits.
#pragma once

#include <string>

#include "cuda/ops.h"

namespace kvgate::ops {

// The projections run as OpenBLAS GEMMs over blocks of exactly this many tokens (the last
// one zero-padded): every call has the same shape, so a token's score does not depend on
// how many tokens are scored with it (chunked prefill scores equal whole-prompt scores).
inline constexpr int32_t kSinkGateRowBlock = 64;

void SinkGateScoresCpu(const SinkGateScoresArgs& args);

// The argument checks every implementation makes: empty when `args` is valid, else why not.
std::string SinkGateScoresArgsError(const SinkGateScoresArgs& args);

}  // namespace kvgate::ops
