// File: the specification of the bf16 ops of cuda/ops.h (the CUDA backend's device
// dtype): plain loops, double accumulation, rounding to bf16 exactly where the op says
// (cuda/bf16.h). The CUDA kernels are tested against these. All pointers are host memory.
#pragma once

#include "cuda/ops.h"

namespace kvgate::ops {

void EmbedBf16Ref(const EmbedBf16Args& args);
void GemmBf16Ref(const GemmBf16Args& args);
void RmsNormBf16Ref(const RmsNormBf16Args& args);
void SiluMulBf16Ref(const SiluMulBf16Args& args);
void CastToBf16Ref(const CastToBf16Args& args);
// AttentionRef on q, K and V rounded to bf16 (the probabilities are not rounded here:
// the kernel's rounding of them is inside the parity tolerance).
void AttentionBf16Ref(const AttentionArgs& args);

}  // namespace kvgate::ops
