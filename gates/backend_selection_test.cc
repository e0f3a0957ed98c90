// The policies' plans from scores left on a backend (PrefillCapture::backend_window_probs:
// pooled and selected there by ops::PoolWindowScores / ops::SelectTop) equal the plans from
// the same scores on the host. Runs on the CPU backend, or on $KVGATE_TEST_BACKEND (cuda on
// the GPU machine), so the CUDA kernels meet the host selection here too.
#include "gates/backend_selection.h"

#include <cmath>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "cuda/backend.h"
#include "cuda/cpu/reference_ops.h"
#include "gates/eviction_spec.h"
#include "gates/internal/test_util.h"
#include "gates/policy.h"
#include "gates/selectors.h"
#include "gtest/gtest.h"

namespace kvgate::gates {
namespace {

using testing::RandomCapture;
using testing::Shape;

std::unique_ptr<ops::Backend> TestBackend() {
  const char* name = std::getenv("KVGATE_TEST_BACKEND");
  absl::StatusOr<std::unique_ptr<ops::Backend>> backend = ops::CreateBackend(name != nullptr ? name : "cpu");
  if (!backend.ok()) return nullptr;
  return std::move(*backend);
}

// The window scores of `c` (the reference WindowAttentionProbs of its last `w` queries, or
// the last query's logits) twice: per layer on the host, and [layers, q heads, n] on `backend`.
struct TwoCaptures {
  PrefillCapture host, on_backend;
};

TwoCaptures WindowScores(const PrefillCapture& c, int32_t w, bool logits, ops::Backend& backend) {
  const ModelShape& s = c.shape;
  const int32_t n = c.prompt_tokens;
  TwoCaptures out;
  for (PrefillCapture* capture : {&out.host, &out.on_backend}) {
    capture->shape = s;
    capture->prompt_tokens = n;
    capture->num_window_queries = w;
    capture->window_logits = logits;
  }
  std::vector<float> all;
  for (int32_t l = 0; l < s.num_layers; ++l) {
    const std::vector<float>& probs = out.host.window_probs.emplace_back(testing::ReferenceWindowScores(c, l, w, logits));
    all.insert(all.end(), probs.begin(), probs.end());
  }
  absl::StatusOr<ops::DeviceBuffer> buffer = backend.Alloc(all.size() * sizeof(float));
  EXPECT_TRUE(buffer.ok()) << buffer.status();
  EXPECT_TRUE(backend.CopyToBackend(buffer->data(), all.data(), all.size() * sizeof(float)).ok());
  out.on_backend.backend_window_probs = std::make_shared<const ops::DeviceBuffer>(std::move(*buffer));
  out.on_backend.backend = &backend;
  return out;
}

void ExpectSamePlan(const KeepPlan& want, const KeepPlan& got) {
  ASSERT_EQ(want.heads.size(), got.heads.size());
  for (size_t i = 0; i < want.heads.size(); ++i) {
    EXPECT_EQ(want.heads[i].positions, got.heads[i].positions) << "head " << i;
    EXPECT_EQ(want.heads[i].query_mask, got.heads[i].query_mask) << "head " << i;
  }
}

ResolvedBudget Budget(const Policy& policy, int32_t n, float keep, int32_t sink) {
  EvictionSpec spec;
  spec.policy = std::string(policy.name());
  spec.keep_ratio = keep;
  if (sink >= 0) spec.sink_tokens = sink;
  absl::StatusOr<ResolvedBudget> budget = ResolveBudget(spec, n, policy.default_sink(), policy.default_recent());
  EXPECT_TRUE(budget.ok()) << budget.status();
  return *budget;
}

TEST(BackendSelectionTest, SnapKvPlansEqualTheHostPlans) {
  std::unique_ptr<ops::Backend> backend = TestBackend();
  ASSERT_NE(backend, nullptr);
  const ModelShape shape = Shape(3, 8, 2, 16, 32);
  PolicyOptions options;
  options.snapkv_window = 16;
  absl::StatusOr<std::unique_ptr<Policy>> policy = CreatePolicy("snapkv", options, shape);
  ASSERT_TRUE(policy.ok()) << policy.status();
  for (const auto& [n, keep, sink, seed] : {std::tuple{300, 0.3f, -1, 1u}, std::tuple{1000, 0.1f, 4, 2u},
                                            std::tuple{77, 0.5f, 0, 3u}, std::tuple{2048, 0.3f, 8, 4u}}) {
    const ResolvedBudget budget = Budget(**policy, n, keep, sink);
    const int32_t w = std::min(16, std::max(1, budget.keep_per_head / 2));
    const PrefillCapture c = RandomCapture(shape, n, w, false, seed);
    const TwoCaptures scored = WindowScores(c, w, false, *backend);
    for (HeadBudget head_budget : {HeadBudget::kPolicyDefault, HeadBudget::kAdaptive}) {
      absl::StatusOr<KeepPlan> want = (*policy)->Plan(scored.host, budget, head_budget);
      absl::StatusOr<KeepPlan> got = (*policy)->Plan(scored.on_backend, budget, head_budget);
      ASSERT_TRUE(want.ok() && got.ok()) << want.status() << got.status();
      ExpectSamePlan(*want, *got);
      EXPECT_LT(got->KeptEntries(), int64_t{n} * shape.num_layers * shape.num_kv_heads);
    }
  }
}

TEST(BackendSelectionTest, SageKvPlansEqualTheHostPlans) {
  std::unique_ptr<ops::Backend> backend = TestBackend();
  ASSERT_NE(backend, nullptr);
  for (const ModelShape& shape : {Shape(2, 8, 2, 16, 32), Shape(2, 16, 2, 8, 32), Shape(1, 3, 3, 8, 24)}) {
    absl::StatusOr<std::unique_ptr<Policy>> policy = CreatePolicy("sage_kv", {}, shape);
    ASSERT_TRUE(policy.ok()) << policy.status();
    for (const auto& [n, keep, seed] : {std::tuple{400, 0.3f, 5u}, std::tuple{1500, 0.1f, 6u}, std::tuple{33, 0.6f, 7u}}) {
      const ResolvedBudget budget = Budget(**policy, n, keep, -1);
      const PrefillCapture c = RandomCapture(shape, n, 1, false, seed);
      const TwoCaptures scored = WindowScores(c, 1, true, *backend);
      absl::StatusOr<KeepPlan> want = (*policy)->Plan(scored.host, budget, HeadBudget::kPolicyDefault);
      absl::StatusOr<KeepPlan> got = (*policy)->Plan(scored.on_backend, budget, HeadBudget::kPolicyDefault);
      ASSERT_TRUE(want.ok() && got.ok()) << want.status() << got.status();
      ExpectSamePlan(*want, *got);
    }
  }
}

// Ties everywhere (every score equal): the lower position wins, as on the host.
TEST(BackendSelectionTest, TiesGoToTheLowerPosition) {
  std::unique_ptr<ops::Backend> backend = TestBackend();
  ASSERT_NE(backend, nullptr);
  std::vector<float> scores(2 * 10, 1.0f);
  absl::StatusOr<ops::DeviceBuffer> buffer = backend->Alloc(scores.size() * sizeof(float));
  ASSERT_TRUE(buffer.ok());
  ASSERT_TRUE(backend->CopyToBackend(buffer->data(), scores.data(), scores.size() * sizeof(float)).ok());
  BackendSelection selection;
  selection.scores = buffer->as<float>();
  selection.rows = 2;
  selection.n = 10;
  selection.candidates = {0, 1, 1, 1, 1, 1, 1, 1, 1, 0};
  selection.need = 3;
  absl::StatusOr<std::vector<uint8_t>> keep = SelectOnBackend(*backend, selection);
  ASSERT_TRUE(keep.ok()) << keep.status();
  EXPECT_EQ(*keep, (std::vector<uint8_t>{0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0}));
  selection.rows_per_selection = 2;  // the pair competes: order = position * 2 + row
  keep = SelectOnBackend(*backend, selection);
  ASSERT_TRUE(keep.ok()) << keep.status();
  EXPECT_EQ(*keep, (std::vector<uint8_t>{0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0}));
  selection.candidates.pop_back();
  EXPECT_EQ(SelectOnBackend(*backend, selection).status().code(), absl::StatusCode::kInvalidArgument);
}

// A window of wider rows (row_stride), one selection over both rows, as Fast KVzip's
// chunk threshold takes it from the [layers, kv heads, n] scores: the same cut as
// SelectGlobalTopKCount on the window copied out.
TEST(BackendSelectionTest, AWindowOfWiderRowsEqualsTheGlobalCutOfItsCopy) {
  std::unique_ptr<ops::Backend> backend = TestBackend();
  ASSERT_NE(backend, nullptr);
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> level(0, 5);
  const int32_t layers = 2, heads = 3, n = 50, begin = 12, len = 30;
  std::vector<float> scores(size_t{1} * layers * heads * n);
  for (float& s : scores) s = static_cast<float>(level(rng));
  absl::StatusOr<ops::DeviceBuffer> buffer = backend->Alloc(scores.size() * sizeof(float));
  ASSERT_TRUE(buffer.ok());
  ASSERT_TRUE(backend->CopyToBackend(buffer->data(), scores.data(), scores.size() * sizeof(float)).ok());
  ScoreGrid grid{layers, heads, len, {}};
  for (int32_t row = 0; row < layers * heads; ++row) {
    grid.scores.insert(grid.scores.end(), scores.begin() + row * n + begin, scores.begin() + row * n + begin + len);
  }
  for (int64_t need : {int64_t{0}, int64_t{1}, int64_t{37}, int64_t{179}, int64_t{180}, int64_t{500}}) {
    BackendSelection selection;
    selection.scores = buffer->as<float>() + begin;
    selection.rows = layers * heads;
    selection.n = len;
    selection.row_stride = n;
    selection.rows_per_selection = layers * heads;
    selection.need = need;
    absl::StatusOr<std::vector<uint8_t>> keep = SelectOnBackend(*backend, selection);
    ASSERT_TRUE(keep.ok()) << keep.status();
    const KeepPlan want = SelectGlobalTopKCount(grid, need, std::vector<uint8_t>(len, 0));
    for (int32_t row = 0; row < layers * heads; ++row) {
      std::vector<int32_t> got;
      for (int32_t p = 0; p < len; ++p) {
        if ((*keep)[size_t{1} * row * len + p]) got.push_back(p);
      }
      EXPECT_EQ(got, want.heads[row].positions) << "need " << need << " row " << row;
    }
  }
}

// AdaKV's two stages on the backend keep exactly SelectAdaKv's rows (plus the protected
// ones, which the caller adds): scores with many ties, +inf and NaN, protected sinks and a
// recent window, safeguards from none to all of the budget, budgets from 0 to every row.
TEST(BackendSelectionTest, AdaKvEqualsTheHostSelection) {
  std::unique_ptr<ops::Backend> backend = TestBackend();
  ASSERT_NE(backend, nullptr);
  std::mt19937 rng(11);
  std::uniform_int_distribution<int> level(0, 6);
  const int32_t layers = 3, heads = 4, n = 90;
  std::vector<float> scores(size_t{1} * layers * heads * n);
  for (size_t i = 0; i < scores.size(); ++i) {
    scores[i] = static_cast<float>(level(rng)) * 0.25f;
    if (i % n >= n - 6) scores[i] = INFINITY;  // the observation window
    if (i % 41 == 9) scores[i] = NAN;
  }
  absl::StatusOr<ops::DeviceBuffer> buffer = backend->Alloc(scores.size() * sizeof(float));
  ASSERT_TRUE(buffer.ok());
  ASSERT_TRUE(backend->CopyToBackend(buffer->data(), scores.data(), scores.size() * sizeof(float)).ok());
  const ScoreGrid grid{layers, heads, n, scores};
  for (const int32_t protected_rows : {0, 7}) {
    std::vector<uint8_t> mask(n, 0);
    for (int32_t p = 0; p < protected_rows; ++p) mask[p < 4 ? p : n - 1 - p] = 1;  // sinks and recent rows
    for (const float safeguard : {0.0f, 0.2f, 0.5f, 1.0f}) {
      for (const int32_t keep : {0, 1, 5, 27, 60, 90}) {
        const KeepPlan want = SelectAdaKv(grid, keep, mask, safeguard);
        absl::StatusOr<std::vector<uint8_t>> got =
            SelectAdaKvOnBackend(*backend, buffer->as<float>(), layers, heads, n, keep, mask, safeguard);
        ASSERT_TRUE(got.ok()) << got.status();
        for (int32_t row = 0; row < layers * heads; ++row) {
          std::vector<int32_t> positions;
          for (int32_t p = 0; p < n; ++p) {
            if (mask[p] || (*got)[size_t{1} * row * n + p]) positions.push_back(p);
          }
          EXPECT_EQ(positions, want.heads[row].positions)
              << "protected " << protected_rows << " safeguard " << safeguard << " keep " << keep << " row " << row;
        }
      }
    }
  }
  EXPECT_EQ(SelectAdaKvOnBackend(*backend, buffer->as<float>(), layers, heads, n, 5, std::vector<uint8_t>(n - 1, 0), 0.2f)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace kvgate::gates
