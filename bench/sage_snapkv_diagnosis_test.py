#!/usr/bin/env python3
"""Unit tests of bench/sage_snapkv_diagnosis.py's SAGE-KV and SnapKV rules (synthetic inputs,
no model, < 5 s). Skips without torch. Run: /usr/bin/python3 bench/sage_snapkv_diagnosis_test.py
"""

import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

import sage_snapkv_diagnosis as diag  # noqa: E402


def one_hot_keys(n, d, hot):
    """Keys [1, n, d]: key j is e_{hot[j]} scaled; queries then pick rows by dot product."""
    k = torch.zeros(1, n, d)
    for j, (axis, scale) in enumerate(hot):
        k[0, j, axis] = scale
    return k


@unittest.skipIf(torch is None, "torch is not installed")
class RulesTest(unittest.TestCase):
    def setUp(self):
        torch.set_num_threads(1)

    def test_topk_ties_go_to_the_lower_position(self):
        s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
        self.assertEqual(diag.topk_mask(s, 2)[0].tolist(), [False, True, True, False, False])
        self.assertEqual(diag.topk_mask(s, 0)[0].tolist(), [False] * 5)
        self.assertEqual(diag.topk_mask(s, 9)[0].tolist(), [True] * 5)

    def test_sage_kv_shared_rows_and_k(self):
        shared, free = diag.sage_kv_shared(40, 16)           # sink 4, recent 4 (with the last token)
        self.assertEqual(shared.nonzero()[:, 0].tolist(), [0, 1, 2, 3, 36, 37, 38, 39])
        self.assertEqual(free, 8)
        shared, free = diag.sage_kv_shared(40, 3)            # recent 0 still keeps the last token
        self.assertEqual(shared.nonzero()[:, 0].tolist(), [39])
        self.assertEqual(free, 2)

    def test_sage_kv_selects_per_query_head(self):
        # n = 40, B = 16, G = 2: sink 0-3, recent 36-39, k = 4 middle rows per query head.
        n, d = 40, 4
        hot = [(0, 0.1)] * n
        for j in (10, 11, 12, 13):
            hot[j] = (1, 5.0)     # query head 0 looks along axis 1
        for j in (20, 21, 22, 23):
            hot[j] = (2, 5.0)     # query head 1 along axis 2
        hot[2] = (1, 9.0)         # a sink row: shared, never a candidate
        keys = one_hot_keys(n, d, hot)
        q = torch.zeros(2, d)
        q[0, 1] = 1.0
        q[1, 2] = 1.0
        keep = diag.sage_kv_keep([q], [keys], n, 16, group=2)[0]
        shared = [0, 1, 2, 3, 36, 37, 38, 39]
        self.assertEqual(keep[0].nonzero()[:, 0].tolist(), sorted(shared + [10, 11, 12, 13]))
        self.assertEqual(keep[1].nonzero()[:, 0].tolist(), sorted(shared + [20, 21, 22, 23]))
        self.assertIsNone(diag.sage_kv_keep([q], [keys], n, 40, group=2))

    def test_sage_kv_min_keep(self):
        n = 100
        scores = torch.arange(n, dtype=torch.float64).flip(0)   # row 0 best ... row 99 worst
        grid = [round(0.01 * i, 2) for i in range(1, 101)]
        # Row 99 is the last token: always shared.
        self.assertEqual(diag.min_keep_sage(scores, 99, n, 1, grid), 0.01)
        # Row 50 (rank 50 - sink among the middle): kept once the sink reaches it or k covers it.
        r = diag.min_keep_sage(scores, 50, n, 1, grid)
        B = int(math.floor(r * n + 0.5))
        shared, free = diag.sage_kv_shared(n, B)
        self.assertTrue(bool(shared[50]) or 50 - B // 4 < free)
        Bm = int(math.floor((r - 0.01) * n + 0.5))
        shared, free = diag.sage_kv_shared(n, Bm)
        self.assertFalse(bool(shared[50]) or 50 - Bm // 4 < free)

    def test_snapkv_scores_match_a_loop(self):
        g = torch.Generator().manual_seed(3)
        n, d, w, G = 30, 8, 6, 2
        keys = torch.randn(2, n, d, generator=g)
        q = torch.randn(4, w, d, generator=g)
        got = diag.snapkv_scores(q, keys, n, G, kernel=5)
        m = n - w
        want = torch.zeros(2, m, dtype=torch.float64)
        for h in range(4):
            mean = [0.0] * m
            for i in range(w):
                pos = n - w + i
                lg = [float(q[h, i] @ keys[h // G, j]) / math.sqrt(d) for j in range(pos + 1)]
                mx = max(lg)
                e = [math.exp(x - mx) for x in lg]
                z = sum(e)
                for j in range(m):
                    mean[j] += e[j] / z / w
            for j in range(m):
                pooled = sum(mean[t] for t in range(max(0, j - 2), min(m, j + 3))) / 5
                want[h // G, j] += pooled / G
        self.assertTrue(torch.allclose(got, want, atol=1e-6), (got - want).abs().max())

    def test_snapkv_keep_protects_the_window_and_caps_it(self):
        g = torch.Generator().manual_seed(5)
        n, d = 50, 8
        keys = torch.randn(2, n, d, generator=g)
        q = torch.randn(4, 64, d, generator=g)
        keep = diag.snapkv_keep([q], [keys], n, 20, group=2)[0]      # window min(64, 20/2) = 10
        self.assertTrue(bool(keep[:, n - 10:].all()))
        self.assertEqual(keep.sum(1).tolist(), [20] * 4)
        self.assertTrue(torch.equal(keep[0], keep[1]) and torch.equal(keep[2], keep[3]))

    def test_rules_equal_the_probe_rules(self):
        # bench/query_policy_probe.py has its own PyTorch rules; both must choose the same rows.
        from query_policy_probe import sage_keep, snapkv_keep

        class Cfg:
            num_attention_heads, num_key_value_heads, num_hidden_layers, head_dim = 4, 2, 2, 8

        class Pre:
            pass

        g = torch.Generator().manual_seed(11)
        n = 120
        pre = Pre()
        pre.q = [torch.randn(4, n, 8, generator=g) for _ in range(2)]
        pre.k = [torch.randn(2, n, 8, generator=g) for _ in range(2)]
        for B in (10, 37, 60, 119):
            qs, ks = diag.capture(pre, n)
            mine = diag.sage_kv_keep([q[:, -1] for q in qs], ks, n, B, 2)
            theirs = sage_keep(pre, Cfg, n, B)
            for a, b in zip(mine, theirs):
                self.assertTrue(torch.equal(a, b), "sage_kv B=%d" % B)
            mine = diag.snapkv_keep(qs, ks, n, B, 2)
            theirs = snapkv_keep(pre, Cfg, n, B)
            for a, b in zip(mine, theirs):
                self.assertTrue(torch.equal(a, b), "snapkv B=%d" % B)


if __name__ == "__main__":
    unittest.main()
