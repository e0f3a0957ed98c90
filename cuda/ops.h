// File: argument structs of every compute op, shared by the CPU reference (<Op>Ref in
// cuda/cpu/reference_ops.h), the threaded CPU backend and the CUDA launchers
// (Launch<Op> in cuda/kernels/). Pointers are raw and live in the memory of the backend
// that runs the op ("backend memory": host for cpu, device for cuda); shapes travel
// here. All tensors are float32, row-major, contiguous, except where a field says
// otherwise (the bf16 ops below; KV rows, whose element type is a KvDtype).
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvgate::ops {

// bfloat16 storage: the upper 16 bits of an IEEE float32 (conversions in cuda/bf16.h).
using Bf16 = uint16_t;

// The element type of stored KV rows (KV pages, rows in transit between pools). float32
// is the CPU backend's, so that its results stay bit for bit those of the reference;
// bf16 halves the bytes every decode step reads and every transfer moves.
enum class KvDtype : uint8_t { kFloat32 = 0, kBf16 = 1 };

inline constexpr size_t KvDtypeBytes(KvDtype dtype) { return dtype == KvDtype::kBf16 ? 2 : 4; }
inline constexpr const char* KvDtypeName(KvDtype dtype) { return dtype == KvDtype::kBf16 ? "bf16" : "float32"; }

// out[t, :] = table[token_ids[t], :]. Ids are validated by the caller (engine).
struct EmbedArgs {
  const int32_t* token_ids = nullptr;  // [num_tokens], in, backend
  const float* table = nullptr;        // [vocab_size, dim], in, backend
  float* out = nullptr;                // [num_tokens, dim], out, backend
  int32_t num_tokens = 0, dim = 0, vocab_size = 0;
};

// y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]): the layout of a torch.nn.Linear weight.
struct MatMulArgs {
  const float* x = nullptr;     // [m, k], in, backend
  const float* w = nullptr;     // [n, k], in, backend
  const float* bias = nullptr;  // [n] or null, in, backend
  float* y = nullptr;           // [m, n], out, backend; must not alias x or w
  int32_t m = 0, n = 0, k = 0;
};

// out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]  (Llama RMSNorm).
struct RmsNormArgs {
  const float* x = nullptr;       // [rows, dim], in, backend
  const float* weight = nullptr;  // [dim], in, backend
  float* out = nullptr;           // [rows, dim], out, backend; may alias x
  int32_t rows = 0, dim = 0;
  float eps = 1e-6f;
};

// Rotary embedding in the Hugging Face "rotate_half" layout, in place. With
// half = head_dim / 2 and angle = positions[t] * inv_freq[i] (float32 product):
//   x[i]        <- x[i] * cos(angle) - x[i + half] * sin(angle)
//   x[i + half] <- x[i + half] * cos(angle) + x[i] * sin(angle)
struct RopeArgs {
  float* x = nullptr;                  // [num_tokens, num_heads, head_dim], in/out, backend
  const int32_t* positions = nullptr;  // [num_tokens], in, backend
  const float* inv_freq = nullptr;     // [head_dim / 2], in, backend
  int32_t num_tokens = 0, num_heads = 0, head_dim = 0;
};

// Writes the K and V rows of new tokens into a head-major contiguous cache:
// cache[h, start_row + t, :] = k[t, h, :].
struct StoreKvArgs {
  const float* k = nullptr;  // [num_tokens, num_kv_heads, head_dim], in, backend
  const float* v = nullptr;  // [num_tokens, num_kv_heads, head_dim], in, backend
  float* k_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], out, backend
  float* v_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], out, backend
  int32_t num_tokens = 0, num_kv_heads = 0, head_dim = 0;
  int32_t capacity_tokens = 0;
  int32_t start_row = 0;  // first cache row written; start_row + num_tokens <= capacity
};

// Causal grouped-query attention of new queries over a head-major contiguous cache
// that already holds their own K/V rows. Query t sits at cache row q_start_row + t and
// sees rows [lo, q_start_row + t], lo = max(0, row - sliding_window + 1) when
// sliding_window > 0, else 0. Query head h reads kv head h / (num_q_heads / num_kv_heads).
struct AttentionArgs {
  const float* q = nullptr;        // [num_tokens, num_q_heads, head_dim], in, backend
  const float* k_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], in, backend
  const float* v_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], in, backend
  float* out = nullptr;            // [num_tokens, num_q_heads, head_dim], out, backend
  int32_t num_tokens = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t capacity_tokens = 0;
  int32_t q_start_row = 0;
  int32_t sliding_window = 0;  // tokens; 0 = unlimited
  float scale = 1.0f;          // usually 1 / sqrt(head_dim)
  // Optional in-prefill eviction (Attention-Gate, Fast KVzip chunked prefill):
  // [num_kv_heads, capacity_tokens] (or [num_q_heads, capacity_tokens] with
  // key_mask_per_query_head), in, backend; 0 = the row is evicted and invisible to
  // every query except the query at that same row (a token always sees itself).
  // Null = every row is visible.
  const uint8_t* key_mask = nullptr;
  // false: key_mask is [num_kv_heads, capacity_tokens] and query head h reads row
  // h / (num_q_heads / num_kv_heads). true: key_mask is [num_q_heads, capacity_tokens]
  // and query head h reads row h, so the query heads of one group may see different
  // rows of their shared K/V (SAGE-KV's per-query-head selection; the contiguous twin of
  // HeadPagedKvView::query_masks). Ignored when key_mask is null.
  bool key_mask_per_query_head = false;
};

// SnapKV's observation window (docs eviction-methods.md) on the backend: for every query
// head h, the mean over the last `window` prompt queries of their causal softmax
// attention over the cache's first `length` rows. Query i (row i of q) sits at position
// pos_i = length - window + i and attends rows [0, pos_i]: out[h, j] = (1 / window) *
// sum_i softmax_j(scale * q_i . k_j) over the i with j <= pos_i. Query head h reads kv
// head h / (num_q_heads / num_kv_heads). No sliding window, no key mask. A reduction in a
// fixed order: the same inputs give the same bits on every run.
struct WindowAttentionProbsArgs {
  const float* q = nullptr;        // [window, num_q_heads, head_dim], in, backend
  const float* k_cache = nullptr;  // [num_kv_heads, capacity_tokens, head_dim], in, backend
  float* out = nullptr;            // [num_q_heads, length], out, backend
  int32_t window = 0;              // 1 <= window <= length
  int32_t length = 0;              // <= capacity_tokens
  int32_t num_q_heads = 0, num_kv_heads = 0, head_dim = 0;
  int32_t capacity_tokens = 0;
  float scale = 1.0f;
  // SAGE-KV's scores instead: the raw scaled logits of one query (window must be 1),
  // out[h, j] = scale * q_0 . k_j.
  bool logits = false;
};

// SnapKV's per-kv-head scores from the window means of WindowAttentionProbs (the pooling
// and group mean of gates/snapkv.cc, done where the means are). With m = n - window and
// pad = kernel / 2, for every layer l, kv head h and row j < m:
//   out[l, h, j] = float((sum over g = 0 .. group-1 in order of pooled(g, j) / kernel) / group),
//   pooled(g, j) = sum in double over t = max(0, j - pad) .. min(m - 1, j + pad) ascending
//                  of probs[l, h * group + g, t];
// rows j >= m (the window itself) score +inf. Double sums in this order: every backend
// gives the same bits.
struct PoolWindowScoresArgs {
  const float* probs = nullptr;  // [num_layers, num_q_heads, n], in, backend
  float* out = nullptr;          // [num_layers, num_kv_heads, n], out, backend
  int32_t num_layers = 0, num_q_heads = 0, num_kv_heads = 0;
  int32_t n = 0;
  int32_t window = 0;  // 1 <= window <= n
  int32_t kernel = 1;  // odd, >= 1
};

// The exact "keep the best `need`" selection of gates/ (gates/internal/select_util.h),
// many selections in one call. A candidate (score, order) is better than another with a
// higher score, then a lower order; NaN is below every number and -0 equals +0.
// Selection s competes rows [s * rows_per_selection, (s + 1) * rows_per_selection) of
// `scores`: entry (r, p) is a candidate when candidates is null or candidates[p] != 0, with
// order p * rows_per_selection + (r - s * rows_per_selection) (position first, then row), and
// the min(need, #candidates) best candidates of each selection are selected. Output: byte
// keep[r / merge_rows, p] has bit r % merge_rows set when (r, p) is selected, every other
// bit 0 (merge_rows > 1, e.g. the query heads of a kv head, needs rows_per_selection 1).
// With `exclude`, entry (r, p) is no candidate either where exclude[r * n + p] != 0 (what
// an earlier selection already kept: AdaKV's second stage).
struct SelectTopArgs {
  const float* scores = nullptr;        // row r at scores + r * row_stride, n floats, in, backend
  const uint8_t* candidates = nullptr;  // [n] shared by every row, or null = every entry, in, backend
  const uint8_t* exclude = nullptr;     // [rows, n], or null = nothing excluded, in, backend
  uint8_t* keep = nullptr;              // [rows / merge_rows, n], out, backend
  int32_t rows = 0, n = 0;
  int64_t row_stride = 0;               // floats from one score row to the next; 0 = n
  int32_t rows_per_selection = 1;       // divides rows
  int32_t merge_rows = 1;               // 1 .. 8, divides rows
  int64_t need = 0;                     // per selection; <= 0 selects nothing
};

// Fast KVzip's low-rank sink-attention gate (gates/fast_kvzip.h states the math) over n
// tokens of one layer: for token t and kv head h,
//   q_g = RMSNorm(q_weight x_t + q_bias)[h, g] * q_norm,  k = RMSNorm(k_weight x_t)[h] * k_norm
//   (RMSNorm over `rank` values, eps), l_g = <k, q_g> / sqrt(rank) + b[h, g],
//   s_{g,r} = <k_base[h, r], q_g> / sqrt(rank),
//   out[h * out_stride + t] = mean over g of e^l_g / (e^l_g + sum_r e^s_{g,r}),
// fp32 throughout, each softmax shifted by its max. Projection rows are ordered [h][g][rank]
// for q and [h][rank] for k. With allow_tf32 a backend may run the two projections on
// TF32 tensor cores (inputs rounded to 10 mantissa bits, fp32 sums; the CUDA backend does,
// the CPU backend stays fp32), as PyTorch's allow_tf32 permits: ~8x the fp32 GEMM rate
// for a score that moves by about 1e-3, which only reorders near-ties of the selection.
// With x_bf16 instead of x (a bf16 model's normed layer input, which its q/k/v GEMMs read),
// both projections are one bf16 GEMM with fp32 sums against qk_weight_bf16, the bf16
// rounding of [q_weight; k_weight]; the rest is the fp32 math above. A prefill's gate then
// reads the layer input the model already made, at the bf16 GEMM rate.
struct SinkGateScoresArgs {
  const float* x = nullptr;         // [n, hidden], in, backend; null when x_bf16 is set
  const Bf16* x_bf16 = nullptr;     // [n, hidden], in, backend, or null
  const Bf16* qk_weight_bf16 = nullptr;  // [kv_heads * (group + 1) * rank, hidden], in, backend; with x_bf16
  const float* q_weight = nullptr;  // [kv_heads * group * rank, hidden], in, backend
  const float* q_bias = nullptr;    // [kv_heads * group * rank], in, backend
  const float* k_weight = nullptr;  // [kv_heads * rank, hidden], in, backend
  const float* q_norm = nullptr;    // [rank], in, backend
  const float* k_norm = nullptr;    // [rank], in, backend
  const float* k_base = nullptr;    // [kv_heads, sinks, rank], in, backend
  const float* b = nullptr;         // [kv_heads, group], in, backend
  float* out = nullptr;             // out[h * out_stride + t], t < n, out, backend
  int64_t out_stride = 0;           // >= n
  int32_t n = 0, hidden = 0, kv_heads = 0, group = 0;
  int32_t rank = 0;                 // 1 .. 64
  int32_t sinks = 0;                // 0 .. 64
  float eps = 1e-6f;
  bool allow_tf32 = false;          // the projections may round their inputs to TF32
};

// Copies rows: dst[dst_rows[i], :] = src[src_rows[i], :], i < num_rows, converting the
// elements from src_dtype to dst_dtype (float32 -> bf16 rounds to nearest even, a NaN
// stays a NaN with an unspecified payload; bf16 -> float32 and same-type copies are
// exact). Moves KV rows from the contiguous prefill
// cache into pages, and between pages in compaction. Destination rows must be distinct
// and must not be read as sources in the same call. Row indices are validated by the
// caller (kv/); src and dst may be one buffer only when the dtypes are equal.
struct CopyRowsArgs {
  const void* src = nullptr;           // [*, row_elements] of src_dtype, in, backend
  void* dst = nullptr;                 // [*, row_elements] of dst_dtype, out, backend
  const int32_t* src_rows = nullptr;   // [num_rows], in, backend
  const int32_t* dst_rows = nullptr;   // [num_rows], in, backend
  int32_t num_rows = 0;
  int32_t row_elements = 0;
  KvDtype src_dtype = KvDtype::kFloat32;
  KvDtype dst_dtype = KvDtype::kFloat32;
  // [num_rows] >= 0, in, backend; null: 1 each. Entry i then copies the run_lengths[i]
  // consecutive rows from src_rows[i] on to those from dst_rows[i] on: a page of rows in
  // one entry instead of one entry a row (a 32k-token cache's lists shrink ~10x).
  const int32_t* run_lengths = nullptr;
};

// A head-paged KV cache: a page holds page_tokens rows of K and of V for ONE
// (sequence, layer, kv head); "seq head" i is one such (sequence, kv head) of the layer
// being attended. Row r of seq head i is slot
// s = first_slots[i] + r + (r >= gap_rows[i] ? gap_slots[i] : 0) of its pages: page
// page_ids[page_indptr[i] + s / page_tokens], slot s % page_tokens. Seq head i's list
// starts at page_indptr[i] and holds at least ceil((first_slots[i] + gap_slots[i] +
// lengths[i]) / page_tokens) ids; lists need not be adjacent nor in seq-head order (the decode step's
// tables keep one fixed-size list per batch slot).
struct HeadPagedKvView {
  const void* k_pages = nullptr;        // [num_pages, page_tokens, head_dim] of dtype, in, backend
  const void* v_pages = nullptr;        // [num_pages, page_tokens, head_dim] of dtype, in, backend
  const int32_t* page_indptr = nullptr; // [num_seq_heads + 1] list starts (last: the ids' end), in, backend
  const int32_t* page_ids = nullptr;    // [page_indptr[num_seq_heads]], in, backend
  const int32_t* lengths = nullptr;     // [num_seq_heads] rows kept, in, backend
  // Null, or [num_pages, page_tokens]: bit g of a row's byte set = the row is visible to
  // query head g of the kv head's group (SAGE-KV's per-query-head selection).
  const uint8_t* query_masks = nullptr;
  int32_t page_tokens = 0;
  int32_t head_dim = 0;
  // bf16 rows are widened to float32 as they are read; scores, softmax and the sums stay
  // float32, so a bf16 view computes exactly what a float32 view of the same (rounded)
  // values computes.
  KvDtype dtype = KvDtype::kFloat32;
  // Null (every head starts at slot 0), or [num_seq_heads] in [0, page_tokens): the slot
  // of a head's row 0 in its first page (a ring that dropped its oldest rows), in, backend.
  const int32_t* first_slots = nullptr;
  // Null together (no head has a gap), or [num_seq_heads] each: rows from gap_rows[i] on
  // sit gap_slots[i] >= 0 slots further (the unused slots a ring left behind a frozen
  // selection), in, backend.
  const int32_t* gap_rows = nullptr;
  const int32_t* gap_slots = nullptr;
};

// Decode attention of one new token per sequence over its own head-paged rows (which
// already include the new token's K/V). Sequence s, query head h reads seq head
// s * num_kv_heads + h / (num_q_heads / num_kv_heads), every row < length that its mask
// bit allows. Positions do not enter: keys are stored after RoPE. Preconditions (checked
// by the caller, not the op): seq head i's list holds ceil((first slot + gap slots + lengths[i]) /
// page_tokens) ids, each < num_pages; with query_masks, num_q_heads / num_kv_heads <= 8.
// A head that sees no row (length 0, or every mask bit clear; impossible in use, since a
// head always sees its new token) gets an output of zeros, never NaN.
struct HeadPagedDecodeAttentionArgs {
  const float* q = nullptr;  // [num_seqs, num_q_heads, head_dim], in, backend
  HeadPagedKvView kv;
  float* out = nullptr;      // [num_seqs, num_q_heads, head_dim], out, backend
  int32_t num_seqs = 0, num_q_heads = 0, num_kv_heads = 0;
  float scale = 1.0f;
};

// out[r] = the column of row r's largest value, ties to the lowest column: greedy
// sampling on the backend, so a decode step returns token ids instead of logits. The
// rule is engine::ArgMax's (best = column 0, then each column strictly greater than the
// best so far): NaN never wins, except that a NaN in column 0 makes the answer 0.
struct ArgMaxRowsArgs {
  const float* x = nullptr;  // [rows, cols], in, backend
  int32_t* out = nullptr;    // [rows], out, backend
  int32_t rows = 0, cols = 0;
};

// out[i] = silu(gate[i]) * up[i], silu(x) = x / (1 + exp(-x)).
struct SiluMulArgs {
  const float* gate = nullptr;  // [n], in, backend
  const float* up = nullptr;    // [n], in, backend
  float* out = nullptr;         // [n], out, backend; may alias gate or up
  int64_t n = 0;
};

// x[i] += y[i] (residual connections).
struct AddArgs {
  float* x = nullptr;        // [n], in/out, backend
  const float* y = nullptr;  // [n], in, backend
  int64_t n = 0;
};

// ---------------------------------------------------------------------------------------
// bf16 ops: the device dtype of the CUDA backend (issue 10). The CPU backend keeps the
// fp32 ops above; the references of these ops (cuda/cpu/reference_bf16_ops.h) define
// them. Rounding to bf16 is round-to-nearest-even (cuda/bf16.h); accumulation is fp32 or
// wider.

// out[t, :] = float(table[token_ids[t], :]). Ids are validated by the caller (engine).
struct EmbedBf16Args {
  const int32_t* token_ids = nullptr;  // [num_tokens], in, backend
  const Bf16* table = nullptr;         // [vocab_size, dim], in, backend
  float* out = nullptr;                // [num_tokens, dim], out, backend
  int32_t num_tokens = 0, dim = 0, vocab_size = 0;
};

// y[m, n] = x[m, k] @ w[n, k]^T (+ bias[n]) with bf16 operands and fp32 accumulation
// (cuBLASLt on the GPU); y is fp32, or bf16 (rounded once, at the end) when y_bf16.
// With accumulate, y is fp32 and the product is added to it (fused residual add:
// y += x @ w^T). Preconditions: bias only with an fp32 y; y does not alias x or w.
struct GemmBf16Args {
  const Bf16* x = nullptr;      // [m, k], in, backend
  const Bf16* w = nullptr;      // [n, k], in, backend
  const float* bias = nullptr;  // [n] or null, in, backend
  void* y = nullptr;            // [m, n] float or Bf16, out (in/out with accumulate), backend
  int32_t m = 0, n = 0, k = 0;
  bool y_bf16 = false;
  bool accumulate = false;
};

// out[r, :] = bf16(x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]): RmsNormArgs with a
// bf16 output, the input of the next bf16 GEMM.
struct RmsNormBf16Args {
  const float* x = nullptr;       // [rows, dim], in, backend
  const float* weight = nullptr;  // [dim], in, backend
  Bf16* out = nullptr;            // [rows, dim], out, backend
  int32_t rows = 0, dim = 0;
  float eps = 1e-6f;
};

// out[i] = bf16(silu(gate[i]) * up[i]) on bf16 inputs, computed in fp32 (SwiGLU).
struct SiluMulBf16Args {
  const Bf16* gate = nullptr;  // [n], in, backend
  const Bf16* up = nullptr;    // [n], in, backend
  Bf16* out = nullptr;         // [n], out, backend; may alias gate or up
  int64_t n = 0;
};

// out[i] = bf16(x[i]).
struct CastToBf16Args {
  const float* x = nullptr;  // [n], in, backend
  Bf16* out = nullptr;       // [n], out, backend
  int64_t n = 0;
};

// AttentionBf16 takes AttentionArgs (same shapes, visible-row rule, key masks and
// q_start_row past) and computes it on tensor cores: q, K and V are rounded to bf16,
// scores and the softmax are fp32, the probabilities are rounded to bf16 before they
// multiply V, and the sums are fp32. Its reference is AttentionBf16Ref.

}  // namespace kvgate::ops
