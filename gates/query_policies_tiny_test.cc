// SAGE-KV and SnapKV on the real models/kvgate-tiny, against an independent PyTorch
// implementation of each paper's rule (bench/sage_snapkv_diagnosis.py `fixture`, written
// from docs/eviction-methods.md, not from sage_kv.cc/snapkv.cc). The fixture holds the
// prompt ids of two `kvgate eval` samples (seed 1234, essay haystack, context 1024) and the
// keep sets PyTorch chose at keep 0.3; here the C++ engine (CPU, fp32 weights) prefills the
// same ids, the policies plan from its capture, and the keep sets must be the same.
//
// This checks the whole scoring path on real activations: the engine's capture (post-RoPE
// queries and keys, their layout), the query head -> kv head mapping, sink/recent/window
// protection, the per-query-head top-k (SAGE-KV) and the softmax/mean/pool/group-mean
// (SnapKV). The two implementations compute in different orders (fp32 engine vs fp32
// PyTorch, then double scores), so a row may differ only where it is a near-tie at the
// cut: its C++ score within kSageLogitTol / kSnapKvProbTol of the C++ k-th best score.
#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "cuda/cpu/cpu_backend.h"
#include "engine/model.h"
#include "gates/eviction_spec.h"
#include "gates/policy.h"
#include "gates/sage_kv.h"
#include "gates/snapkv.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/paths.h"

namespace kvgate::gates {
namespace {

// Near-tie tolerances, in the scores' own units. Measured on the fixture: the largest
// |C++ score - C++ cut| of a row chosen differently is reported by the test output.
constexpr double kSageLogitTol = 1e-3;    // q.k/sqrt(d) logits, |value| ~ 1..20
constexpr double kSnapKvProbTol = 1e-7;   // pooled mean softmax probabilities, ~1e-4..1e-1

std::string FixturePath() {
  return (kvgate::testing::SourceDir() / "gates" / "testdata" / "query_policies_tiny.json").string();
}

// The k-th largest of `scores` over the rows `candidates` (k >= 1), or +inf when k == 0.
double KthBest(const std::vector<double>& scores, const std::vector<int32_t>& candidates, int64_t k) {
  if (k <= 0) return INFINITY;
  std::vector<double> v;
  for (int32_t p : candidates) v.push_back(scores[p]);
  k = std::min<int64_t>(k, static_cast<int64_t>(v.size()));
  std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<double>());
  return v[k - 1];
}

struct Mismatch {
  int64_t rows = 0;         // rows chosen by one implementation only
  int64_t selected = 0;     // rows chosen by score (not protected), over all heads
  double worst_margin = 0;  // max |score - cut| over the mismatched rows
};

// Compares one head's keep set; rows outside `candidates` must agree exactly.
void CompareHead(const std::set<int32_t>& cpp, const std::set<int32_t>& py, const std::vector<double>& scores,
                 const std::vector<int32_t>& candidates, int64_t k, double tol, const std::string& where,
                 Mismatch* m) {
  std::vector<uint8_t> is_candidate(scores.size(), 0);
  for (int32_t p : candidates) is_candidate[p] = 1;
  const double cut = KthBest(scores, candidates, k);
  m->selected += k;
  std::vector<int32_t> diff;
  std::set_symmetric_difference(cpp.begin(), cpp.end(), py.begin(), py.end(), std::back_inserter(diff));
  for (int32_t p : diff) {
    ASSERT_TRUE(p >= 0 && p < static_cast<int32_t>(scores.size()) && is_candidate[p])
        << where << ": protected row " << p << " kept by only one implementation";
    const double margin = std::fabs(scores[p] - cut);
    m->worst_margin = std::max(m->worst_margin, margin);
    EXPECT_LE(margin, tol) << where << ": row " << p << " (score " << scores[p] << ", cut " << cut << ") kept by "
                           << (cpp.count(p) ? "C++" : "PyTorch") << " only, not a near-tie";
    ++m->rows;
  }
}

class QueryPoliciesTinyTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::ifstream in(FixturePath());
    ASSERT_TRUE(in.good()) << "missing " << FixturePath();
    fixture_ = new nlohmann::json(nlohmann::json::parse(in));
    backend_ = ops::CreateCpuBackend(2).release();
    engine::LoadOptions options;
    options.weights = engine::WeightDType::kF32;  // PyTorch ran fp32 on the bf16 checkpoint
    auto model = engine::Model::Load(kvgate::testing::KvgateTinyDir(), backend_, options);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete backend_;
    delete fixture_;
  }

  // The engine's capture of a full prefill of `ids` (keys and the last `window` queries).
  static PrefillCapture Capture(const std::vector<int32_t>& ids, int32_t window) {
    PrefillCapture capture;
    auto cache = model_->NewCache(static_cast<int32_t>(ids.size()));
    EXPECT_TRUE(cache.ok()) << cache.status();
    engine::ForwardOptions forward;
    forward.capture_request.keys = true;
    forward.capture_request.last_queries = window;
    forward.capture = &capture;
    auto logits = model_->Forward(ids, cache->get(), forward);
    EXPECT_TRUE(logits.ok()) << logits.status();
    return capture;
  }

  static ResolvedBudget Budget(const Policy& policy, int32_t n, float keep_ratio) {
    EvictionSpec spec;
    spec.policy = std::string(policy.name());
    spec.keep_ratio = keep_ratio;
    auto budget = ResolveBudget(spec, n, policy.default_sink(), policy.default_recent());
    EXPECT_TRUE(budget.ok()) << budget.status();
    return *budget;
  }

  static nlohmann::json* fixture_;
  static ops::Backend* backend_;
  static engine::Model* model_;
};

nlohmann::json* QueryPoliciesTinyTest::fixture_ = nullptr;
ops::Backend* QueryPoliciesTinyTest::backend_ = nullptr;
engine::Model* QueryPoliciesTinyTest::model_ = nullptr;

TEST_F(QueryPoliciesTinyTest, SageKvKeepSetsMatchPyTorch) {
  for (const auto& c : (*fixture_)["cases"]) {
    const std::string name = c["task"].get<std::string>() + "#" + std::to_string(c["index"].get<int>());
    const auto ids = c["prompt_ids"].get<std::vector<int32_t>>();
    const int32_t n = static_cast<int32_t>(ids.size());
    const PrefillCapture capture = Capture(ids, 1);
    const ModelShape& shape = capture.shape;
    const int32_t group = shape.group_size();
    auto policy = CreatePolicy("sage_kv", PolicyOptions{}, capture.shape);
    ASSERT_TRUE(policy.ok()) << policy.status();
    const ResolvedBudget budget = Budget(**policy, n, c["keep_ratio"].get<float>());
    ASSERT_EQ(budget.keep_per_head, c["budget"].get<int32_t>()) << name;
    auto plan = (*policy)->Plan(capture, budget, HeadBudget::kPolicyDefault);
    ASSERT_TRUE(plan.ok()) << plan.status();
    auto scores = SageKvScores(capture);
    ASSERT_TRUE(scores.ok()) << scores.status();

    // Shared rows as the paper defines them (sink B/4, recent B/4 with the last token);
    // the middle rows are the candidates of every query head's top-k.
    std::vector<int32_t> middle;
    int64_t shared = 0;
    for (int32_t p = 0; p < n; ++p) {
      if (p < budget.keep_per_head / 4 || p >= n - std::max(1, budget.keep_per_head / 4)) {
        ++shared;
      } else {
        middle.push_back(p);
      }
    }
    const int64_t k = (budget.keep_per_head - shared) / group;
    Mismatch m;
    for (int32_t l = 0; l < shape.num_layers; ++l) {
      for (int32_t qh = 0; qh < shape.num_q_heads; ++qh) {
        const HeadKeep& head = plan->at(l, qh / group);
        std::set<int32_t> cpp;
        for (size_t i = 0; i < head.positions.size(); ++i) {
          if (head.query_mask.empty() || (head.query_mask[i] >> (qh % group)) & 1) cpp.insert(head.positions[i]);
        }
        const auto py_rows = c["sage_kv"][l][qh].get<std::vector<int32_t>>();
        const std::set<int32_t> py(py_rows.begin(), py_rows.end());
        std::vector<double> row(n);
        for (int32_t p = 0; p < n; ++p) row[p] = scores->at(l, qh, p);
        CompareHead(cpp, py, row, middle, k, kSageLogitTol,
                    name + " layer " + std::to_string(l) + " q head " + std::to_string(qh), &m);
        EXPECT_EQ(static_cast<int64_t>(cpp.size()), shared + k) << name << " layer " << l << " q head " << qh;
      }
    }
    std::cout << "[sage_kv " << name << "] n=" << n << " B=" << budget.keep_per_head << " k=" << k << ": "
              << m.rows << " of " << m.selected << " selected rows differ, worst |score - cut| "
              << m.worst_margin << "\n";
    EXPECT_LE(m.rows * 100, m.selected) << name << ": more than 1% of the selections differ";
  }
}

TEST_F(QueryPoliciesTinyTest, SnapKvKeepSetsMatchPyTorch) {
  for (const auto& c : (*fixture_)["cases"]) {
    const std::string name = c["task"].get<std::string>() + "#" + std::to_string(c["index"].get<int>());
    const auto ids = c["prompt_ids"].get<std::vector<int32_t>>();
    const int32_t n = static_cast<int32_t>(ids.size());
    const PrefillCapture capture = Capture(ids, kSnapKvWindow);
    const ModelShape& shape = capture.shape;
    auto policy = CreatePolicy("snapkv", PolicyOptions{}, capture.shape);
    ASSERT_TRUE(policy.ok()) << policy.status();
    const ResolvedBudget budget = Budget(**policy, n, c["keep_ratio"].get<float>());
    ASSERT_EQ(budget.keep_per_head, c["budget"].get<int32_t>()) << name;
    auto plan = (*policy)->Plan(capture, budget, HeadBudget::kPolicyDefault);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int32_t window = std::min(kSnapKvWindow, std::max(1, budget.keep_per_head / 2));
    auto grid = SnapKvScores(capture, window, kSnapKvKernel);
    ASSERT_TRUE(grid.ok()) << grid.status();
    std::vector<int32_t> outside_window(n - window);
    for (int32_t p = 0; p < n - window; ++p) outside_window[p] = p;
    const int64_t k = budget.keep_per_head - window;
    Mismatch m;
    for (int32_t l = 0; l < shape.num_layers; ++l) {
      for (int32_t h = 0; h < shape.num_kv_heads; ++h) {
        const HeadKeep& head = plan->at(l, h);
        EXPECT_TRUE(head.query_mask.empty());
        const std::set<int32_t> cpp(head.positions.begin(), head.positions.end());
        const auto py_rows = c["snapkv"][l][h].get<std::vector<int32_t>>();
        const std::set<int32_t> py(py_rows.begin(), py_rows.end());
        std::vector<double> row(n);
        for (int32_t p = 0; p < n; ++p) row[p] = grid->at(l, h, p);
        CompareHead(cpp, py, row, outside_window, k, kSnapKvProbTol,
                    name + " layer " + std::to_string(l) + " kv head " + std::to_string(h), &m);
        EXPECT_EQ(static_cast<int32_t>(cpp.size()), budget.keep_per_head) << name << " layer " << l << " head " << h;
      }
    }
    std::cout << "[snapkv " << name << "] n=" << n << " B=" << budget.keep_per_head << " window=" << window << ": "
              << m.rows << " of " << m.selected << " selected rows differ, worst |score - cut| " << m.worst_margin
              << "\n";
    EXPECT_LE(m.rows * 100, m.selected) << name << ": more than 1% of the selections differ";
  }
}

}  // namespace
}  // namespace kvgate::gates
