// File: the specification of every compute op: plain loops, float/double accumulation,
// no SIMD, no threads, the obvious loop order. The CPU backend and the CUDA kernels are
// both tested against these (<Op>Ref takes the same args struct as Launch<Op>).
// All pointers here are host memory.
#pragma once

#include <string>

#include "cuda/ops.h"

namespace kvgate::ops {

void EmbedRef(const EmbedArgs& args);
void MatMulRef(const MatMulArgs& args);
void RmsNormRef(const RmsNormArgs& args);
void RopeRef(const RopeArgs& args);
void StoreKvRef(const StoreKvArgs& args);
void AttentionRef(const AttentionArgs& args);
void SiluMulRef(const SiluMulArgs& args);
void AddRef(const AddArgs& args);
void CopyRowsRef(const CopyRowsArgs& args);
void HeadPagedDecodeAttentionRef(const HeadPagedDecodeAttentionArgs& args);
void ArgMaxRowsRef(const ArgMaxRowsArgs& args);
void WindowAttentionProbsRef(const WindowAttentionProbsArgs& args);
// The same for query heads [head_begin, head_end) only (the CPU backend's threads).
void WindowAttentionProbsRefHeads(const WindowAttentionProbsArgs& args, int32_t head_begin, int32_t head_end);
// The argument checks every implementation makes: empty when `args` is valid, else why not.
std::string WindowAttentionProbsArgsError(const WindowAttentionProbsArgs& args);
void PoolWindowScoresRef(const PoolWindowScoresArgs& args);
std::string PoolWindowScoresArgsError(const PoolWindowScoresArgs& args);
void SelectTopRef(const SelectTopArgs& args);
std::string SelectTopArgsError(const SelectTopArgs& args);
// SelectTopRef of the output rows [group_begin, group_end) of keep only (rows / merge_rows
// when merge_rows > 1, else selections), for the CPU backend's threads.
void SelectTopRefGroups(const SelectTopArgs& args, int32_t group_begin, int32_t group_end);

}  // namespace kvgate::ops
