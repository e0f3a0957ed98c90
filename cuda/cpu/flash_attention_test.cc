// The tiled CPU attention (flash_attention.h) against AttentionRef, the specification,
// over odd shapes (1, 3, 54, 97, 129, 300 tokens: partial tiles and partial key blocks),
// MHA/GQA/MQA head layouts, past rows, sliding windows and both key-mask layouts, with a
// per-element error bound derived from float32 arithmetic (ErrorBounds below).
#include "cuda/cpu/flash_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda/cpu/cpu_backend.h"
#include "cuda/cpu/reference_ops.h"

namespace kvgate::ops {
namespace {

constexpr float kCanary = -7777.0f;
constexpr int kGuard = 16;
// Unit roundoff of float32 (round to nearest): every float op is exact times (1 + d),
// |d| <= kUnitRoundoff.
constexpr double kUnitRoundoff = 0x1p-24;

// gamma_n = n u / (1 - n u): the classic bound on the relative error of a float sum or
// dot product of n terms in ANY order (Higham, Accuracy and Stability, 3.1). Any order
// matters here: OpenBLAS picks its kernel (and so its summation order) per CPU.
double Gamma(int64_t n) { return n * kUnitRoundoff / (1.0 - n * kUnitRoundoff); }

std::vector<float> RandomVector(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

enum class MaskKind { kNone, kPerKvHead, kPerQueryHead };

struct FlashCase {
  int num_tokens, q_heads, kv_heads, head_dim, q_start_row, window;
  MaskKind mask = MaskKind::kNone;
  uint32_t seed = 1;
  std::string Name() const {
    return absl::StrCat("tokens=", num_tokens, " q_heads=", q_heads, " kv_heads=", kv_heads,
                        " head_dim=", head_dim, " q_start=", q_start_row, " window=", window,
                        " mask=", static_cast<int>(mask), " seed=", seed);
  }
};

// Inputs of one case, with NaN in every K/V row that no query may read (rows before the
// first query's window, after the last query, and evicted rows of earlier chunks that no
// query head of the group keeps), so that reading one shows up as NaN.
struct FlashInputs {
  std::vector<float> q, k, v;
  std::vector<uint8_t> mask;
  int capacity;
  AttentionArgs Args(float* out, const FlashCase& c) const {
    AttentionArgs a{q.data(), k.data(), v.data(), out, c.num_tokens, c.q_heads, c.kv_heads,
                    c.head_dim, capacity, c.q_start_row, c.window,
                    1.0f / std::sqrt(static_cast<float>(c.head_dim))};
    if (c.mask != MaskKind::kNone) {
      a.key_mask = mask.data();
      a.key_mask_per_query_head = c.mask == MaskKind::kPerQueryHead;
    }
    return a;
  }
};

FlashInputs MakeInputs(const FlashCase& c) {
  FlashInputs in;
  in.capacity = c.q_start_row + c.num_tokens + 3;
  in.q = RandomVector(size_t{1} * c.num_tokens * c.q_heads * c.head_dim, c.seed * 7 + 1);
  in.k = RandomVector(size_t{1} * c.kv_heads * in.capacity * c.head_dim, c.seed * 7 + 2);
  in.v = RandomVector(size_t{1} * c.kv_heads * in.capacity * c.head_dim, c.seed * 7 + 3);
  const int mask_rows = c.mask == MaskKind::kPerQueryHead ? c.q_heads : c.kv_heads;
  in.mask.assign(size_t{1} * mask_rows * in.capacity, 1);
  std::mt19937 rng(c.seed);
  std::uniform_int_distribution<int> percent(0, 99);
  if (c.mask != MaskKind::kNone) {
    for (uint8_t& m : in.mask) m = percent(rng) < 50 ? 1 : 0;
  }
  const int rows_per_kv_head = mask_rows / c.kv_heads;
  const int first_seen = c.window > 0 ? std::max(0, c.q_start_row - c.window + 1) : 0;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int h = 0; h < c.kv_heads; ++h) {
    for (int r = 0; r < in.capacity; ++r) {
      bool kept = false;
      for (int j = 0; j < rows_per_kv_head; ++j) {
        kept |= in.mask[size_t{1} * (h * rows_per_kv_head + j) * in.capacity + r] != 0;
      }
      if ((!kept && r < c.q_start_row) || r < first_seen || r >= c.q_start_row + c.num_tokens) {
        std::fill_n(in.k.begin() + (size_t{1} * h * in.capacity + r) * c.head_dim, c.head_dim, nan);
        std::fill_n(in.v.begin() + (size_t{1} * h * in.capacity + r) * c.head_dim, c.head_dim, nan);
      }
    }
  }
  return in;
}

// Error bound of one output element of the tiled float32 attention against the exact
// value (AttentionRef is double: its own error is far below these terms). With A =
// max over visible rows r of scale * sum_i |q_i k_ri|, n visible rows, B key blocks:
//  - each score is a float dot of head_dim terms, scaled: error <= gamma(head_dim+1) A;
//    shifting by the running max (|s - max| <= 2A) adds 2A u. A score error e changes
//    each normalised weight by a factor within exp(+-2e): expm1(2e) relative;
//  - every exp (FastExp) is off by kFastExpRelError (+ u to round), once per weight and
//    once per block for the online-softmax correction: (B + 1)(kFastExpRelError + u);
//  - the denominator and the P V sums are float sums of n terms: gamma(n) each; the final
//    division and scaling: 2u.
// All of it multiplies W = max over visible rows of |v_ri| (the output is a convex
// combination of those values); + u |ref| for rounding the reference to float.
// Returns the bound of every element i of output row (t, h), without the u |ref| term.
std::vector<double> ErrorBounds(const AttentionArgs& a, int t, int h) {
  const int group = a.num_q_heads / a.num_kv_heads, kv = h / group;
  const int last = a.q_start_row + t;
  const int first = a.sliding_window > 0 ? std::max(0, last - a.sliding_window + 1) : 0;
  const int mask_row = a.key_mask_per_query_head ? h : kv;
  const float* q = a.q + (size_t{1} * t * a.num_q_heads + h) * a.head_dim;
  double score_abs = 0.0;
  std::vector<double> v_abs(a.head_dim, 0.0);
  int visible = 0;
  for (int r = first; r <= last; ++r) {
    if (a.key_mask != nullptr && r != last &&
        a.key_mask[size_t{1} * mask_row * a.capacity_tokens + r] == 0) {
      continue;
    }
    ++visible;
    const float* k = a.k_cache + (size_t{1} * kv * a.capacity_tokens + r) * a.head_dim;
    const float* v = a.v_cache + (size_t{1} * kv * a.capacity_tokens + r) * a.head_dim;
    double sum = 0.0;
    for (int j = 0; j < a.head_dim; ++j) sum += std::fabs(static_cast<double>(q[j]) * k[j]);
    score_abs = std::max(score_abs, sum * a.scale);
    for (int j = 0; j < a.head_dim; ++j) v_abs[j] = std::max(v_abs[j], std::fabs(static_cast<double>(v[j])));
  }
  const int key_block = FlashAttentionKeyBlock(a.head_dim);
  const int blocks = (last - first + 1 + key_block - 1) / key_block + 1;
  const double score_error = Gamma(a.head_dim + 1) * score_abs + 2 * score_abs * kUnitRoundoff;
  const double relative = std::expm1(2 * score_error) +
                          (blocks + 1) * (kFastExpRelError + kUnitRoundoff) + 2 * Gamma(visible) +
                          2 * kUnitRoundoff;
  for (double& bound : v_abs) bound *= relative;
  return v_abs;
}

// NaN/Inf first, then |ref - out| <= ErrorBounds on every element (worst reported), then
// the canaries after the end.
void ExpectWithinBound(const AttentionArgs& a, const std::vector<float>& ref,
                       const std::vector<float>& out, const std::string& what) {
  const size_t n = size_t{1} * a.num_tokens * a.num_q_heads * a.head_dim;
  double worst_ratio = 0.0, worst_err = 0.0, worst_bound = 0.0;
  size_t worst = 0;
  std::vector<double> bounds;
  for (size_t e = 0; e < n; ++e) {
    ASSERT_TRUE(std::isfinite(out[e])) << what << ": non-finite at " << e;
    const int i = static_cast<int>(e % a.head_dim);
    const int h = static_cast<int>(e / a.head_dim % a.num_q_heads);
    const int t = static_cast<int>(e / a.head_dim / a.num_q_heads);
    if (i == 0) bounds = ErrorBounds(a, t, h);
    const double err = std::fabs(static_cast<double>(ref[e]) - out[e]);
    const double bound = bounds[i] + kUnitRoundoff * std::fabs(ref[e]);
    if (err / bound > worst_ratio) {
      worst_ratio = err / bound;
      worst_err = err;
      worst_bound = bound;
      worst = e;
    }
  }
  EXPECT_LE(worst_ratio, 1.0) << what << ": worst index " << worst << " ref " << ref[worst] << " out "
                              << out[worst] << " error " << worst_err << " bound " << worst_bound;
  for (size_t e = n; e < n + kGuard; ++e) ASSERT_EQ(out[e], kCanary) << what << ": wrote past end";
}

std::vector<FlashCase> AllCases() {
  struct Heads {
    int q, kv, dim;
  };
  const Heads heads[] = {{1, 1, 64}, {4, 4, 16}, {8, 2, 32}, {14, 2, 16}, {8, 1, 128}, {12, 4, 64}};
  struct Rows {
    int q_start, window;
  };
  const Rows rows[] = {{0, 0}, {37, 0}, {0, 45}, {130, 200}};
  std::vector<FlashCase> cases;
  uint32_t seed = 1;
  for (int tokens : {1, 3, 54, 97, 129, 300}) {
    for (const Heads& hd : heads) {
      for (const Rows& r : rows) {
        for (MaskKind mask : {MaskKind::kNone, MaskKind::kPerKvHead, MaskKind::kPerQueryHead}) {
          cases.push_back({tokens, hd.q, hd.kv, hd.dim, r.q_start, r.window, mask, seed++});
        }
      }
    }
  }
  return cases;
}

TEST(FlashAttentionTest, BackendMatchesReferenceWithinDerivedBound) {
  std::unique_ptr<Backend> backend = CreateCpuBackend(2);
  for (const FlashCase& c : AllCases()) {
    const FlashInputs in = MakeInputs(c);
    const size_t n = in.q.size();
    std::vector<float> ref(n + kGuard, kCanary), out(n + kGuard, kCanary);
    AttentionRef(in.Args(ref.data(), c));
    ASSERT_TRUE(backend->Attention(in.Args(out.data(), c)).ok());
    ExpectWithinBound(in.Args(out.data(), c), ref, out, c.Name());
    if (HasFatalFailure() || HasNonfatalFailure()) return;  // one failing case is enough
  }
}

// Each (kv head, query tile) is computed by one thread in a fixed order: the output is
// the same bits for any number of threads.
TEST(FlashAttentionTest, ThreadCountDoesNotChangeBits) {
  const FlashCase cases[] = {{300, 8, 2, 32, 0, 0},
                             {129, 14, 2, 16, 37, 0, MaskKind::kPerQueryHead, 5},
                             {97, 12, 4, 64, 130, 200, MaskKind::kPerKvHead, 6},
                             {300, 8, 1, 128, 0, 45}};
  for (const FlashCase& c : cases) {
    const FlashInputs in = MakeInputs(c);
    std::vector<std::vector<float>> outs;
    for (int threads : {1, 2, 3, 5}) {
      ThreadPool pool(threads);
      outs.emplace_back(in.q.size(), kCanary);
      FlashAttention(in.Args(outs.back().data(), c), pool);
    }
    for (size_t j = 1; j < outs.size(); ++j) {
      ASSERT_EQ(std::memcmp(outs[0].data(), outs[j].data(), outs[0].size() * sizeof(float)), 0)
          << c.Name() << ": pool " << j;
    }
  }
}

// A prompt in chunks (each chunk attending over the rows of the earlier ones) equals the
// prompt at once, within the same bound: chunk edges move tile edges, not the rule.
TEST(FlashAttentionTest, ChunkedPrefillMatchesReferenceOfWholePrompt) {
  const FlashCase whole{300, 8, 2, 32, 0, 0, MaskKind::kNone, 9};
  const FlashInputs in = MakeInputs(whole);
  const size_t n = in.q.size(), row = size_t{1} * whole.q_heads * whole.head_dim;
  std::vector<float> ref(n + kGuard, kCanary), out(n + kGuard, kCanary);
  AttentionRef(in.Args(ref.data(), whole));
  ThreadPool pool(2);
  for (int start = 0, chunk = 1; start < whole.num_tokens; start += chunk, chunk = chunk * 3 + 2) {
    FlashCase part = whole;
    part.q_start_row = start;
    part.num_tokens = std::min(chunk, whole.num_tokens - start);
    AttentionArgs a = in.Args(out.data() + start * row, part);
    a.q = in.q.data() + start * row;
    a.capacity_tokens = in.capacity;
    FlashAttention(a, pool);
  }
  ExpectWithinBound(in.Args(out.data(), whole), ref, out, "chunked " + whole.Name());
}

TEST(FlashAttentionTest, FastExpIsWithinItsBound) {
  EXPECT_EQ(FastExp(-INFINITY), 0.0f);
  EXPECT_EQ(FastExp(-100.0f), 0.0f);
  EXPECT_EQ(FastExp(0.0f), 1.0f);
  double worst = 0.0;
  float worst_x = 0.0f;
  for (float x = -87.0f; x <= 0.0f; x += std::max(1e-5f * std::fabs(x), 1e-6f)) {
    const double exact = std::exp(static_cast<double>(x));
    const double relative = std::fabs(FastExp(x) - exact) / exact;
    if (relative > worst) {
      worst = relative;
      worst_x = x;
    }
  }
  EXPECT_LE(worst, kFastExpRelError) << "at x = " << worst_x;
}

}  // namespace
}  // namespace kvgate::ops
