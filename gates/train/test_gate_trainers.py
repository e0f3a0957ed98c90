#!/usr/bin/env python3
"""Tests of the gate trainers (gates/train), CPU only, a few seconds.

- gate_tokenizer's pure-Python BPE against the golden tokenizer cases (no torch needed);
- the KVzip target scores against a brute-force transcription of gates/kvzip.cc KvzipScores;
- the Fast KVzip gate module against the authors' formula (convert_fastkvzip.reference_scores);
- the Attention-Gate module is causal (prefix-stable flags);
- both trainers run a few steps on a golden random checkpoint and export files that our
  readers load, and, when KVGATE_BIN names the built `kvgate` binary, that the C++ loader
  accepts (`kvgate generate --policy fast_kvzip|attention_gate --gates FILE`), so a format drift
  fails here.

Run: python3 -m unittest discover -s gates/train -p 'test_*.py' (ctest: gates_train_py).
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(REPO, "tests", "golden")
SHARED_TINYSTORIES = os.path.join(REPO, "..", "shared", "models", "tinystories-656k")
sys.path.insert(0, HERE)

import gate_tokenizer  # noqa: E402  (pure Python)

try:
    import torch
    import gate_common as gc
    import llama_torch as lt
except ImportError:  # machines without torch (CI): only the tokenizer tests run
    torch = None

MODEL = os.path.join(GOLDEN, "models", "llama_gqa_untied")  # 2 layers, GQA 4/2, D 64, sentencepiece tokenizer


def _write_text(path):
    """A small English text file (the golden README) as training data."""
    with open(os.path.join(GOLDEN, "README.md")) as src, open(path, "w") as dst:
        dst.write(src.read())


def _kvgate_bin():
    """The `kvgate` binary named by KVGATE_BIN (ctest sets it), or None when unset."""
    path = os.environ.get("KVGATE_BIN", "")
    if not path:
        return None
    if not os.access(path, os.X_OK):
        raise AssertionError("KVGATE_BIN=%s is not an executable (build the kvgate target first)" % path)
    return path


class TokenizerTest(unittest.TestCase):
    def check(self, tokenizer_json, cases_json):
        tok = gate_tokenizer.SimpleTokenizer(tokenizer_json)
        with open(cases_json) as f:
            cases = json.load(f)["cases"]
        for case in cases:
            self.assertEqual(tok.encode(case["text"], add_special_tokens=True), case["ids"], repr(case["text"]))
            self.assertEqual(tok.encode(case["text"], add_special_tokens=False), case["ids_no_special"], repr(case["text"]))

    def test_sentencepiece_bytefallback(self):
        d = os.path.join(GOLDEN, "tokenizers", "sentencepiece_bytefallback")
        self.check(os.path.join(d, "tokenizer.json"), os.path.join(d, "cases.json"))

    @unittest.skipUnless(os.path.exists(os.path.join(SHARED_TINYSTORIES, "tokenizer.json")), "no TinyStories model")
    def test_tinystories(self):
        self.check(os.path.join(SHARED_TINYSTORIES, "tokenizer.json"),
                   os.path.join(GOLDEN, "tokenizers", "tinystories", "cases.json"))


def _kvzip_brute(queries, keys, n, begin, end, sink):
    """gates/kvzip.cc KvzipScores, transcribed loop by loop, in double."""
    hq, total, d = queries.shape
    hkv = keys.shape[0]
    group, q_len, c = hq // hkv, total - n, end - begin
    out = [[0.0] * c for _ in range(hkv)]
    Q, K = queries.double().tolist(), keys.double().tolist()
    scale = 1.0 / math.sqrt(d)
    for h in range(hkv):
        subset_base = [K[h][j] for j in range(sink)] + [K[h][j] for j in range(begin, end)]
        for g in range(group):
            for i in range(q_len):
                q = Q[h * group + g][n + i]
                subset = subset_base + [K[h][n + j] for j in range(i + 1)]
                logits = [sum(a * b for a, b in zip(q, k)) * scale for k in subset]
                m = max(logits)
                denom = sum(math.exp(x - m) for x in logits)
                for j in range(c):
                    out[h][j] = max(out[h][j], math.exp(logits[sink + j] - m) / denom)
    return out


@unittest.skipIf(torch is None, "needs torch")
class ScoreTest(unittest.TestCase):
    def test_kvzip_layer_scores_match_cpp_definition(self):
        g = torch.Generator().manual_seed(0)
        n, q_len, hq, hkv, d = 12, 7, 4, 2, 8
        queries = torch.randn(hq, n + q_len, d, generator=g) * 2
        keys = torch.randn(hkv, n + q_len, d, generator=g) * 2
        for begin, end, sink in [(0, 12, 0), (5, 9, 4)]:
            got = gc.kvzip_layer_scores(queries, keys, n, begin, end, sink, query_block=3, dtype=torch.float64)
            want = torch.tensor(_kvzip_brute(queries, keys, n, begin, end, sink), dtype=torch.float64)
            self.assertTrue(torch.allclose(got, want, atol=1e-12), (begin, end, sink))

    def test_kvzip_scores_of_a_model(self):
        model, config = lt.load_hf_checkpoint(MODEL)
        prompt = list(range(3, 23))
        recon = [5, 6, 7]
        grid, feats = gc.kvzip_scores(model, prompt, recon, recon, chunk_tokens=8)  # 3 chunks
        self.assertEqual(tuple(grid.shape), (2, 2, 20))
        self.assertEqual(tuple(feats.shape), (2, 20, 64))
        self.assertTrue(bool((grid > 0).all()) and bool((grid <= 1).all()))
        # chunk 1 = [8, 16): reconstruction = recon + prompt[0:8] + prompt[8:16], sink 4
        ids = torch.tensor([prompt + recon + prompt[0:8] + prompt[8:16]])
        out = model(ids, return_qk=True)
        want = gc.kvzip_layer_scores(out.queries[1][0], out.keys[1][0], 20, 8, 16, 4)
        self.assertTrue(torch.allclose(grid[1, :, 8:16], want, atol=1e-6))

    def test_fast_kvzip_gate_matches_authors_formula(self):
        sys.path.insert(0, HERE)
        import convert_fastkvzip
        torch.manual_seed(1)
        layer = gc.FastKvzipGateLayer(32, 2, 3, rank=16, sinks=16)
        with torch.no_grad():
            layer.b.normal_()
            layer.q_norm_weight.uniform_(0.5, 1.5)
        x = torch.randn(9, 32)
        state = {"q_proj.weight": layer.q_proj.weight, "q_proj.bias": layer.q_proj.bias,
                 "k_proj.weight": layer.k_proj.weight, "q_norm.weight": layer.q_norm_weight,
                 "k_norm.weight": layer.k_norm_weight, "k_base": layer.k_base, "b": layer.b}
        with torch.no_grad():
            want = convert_fastkvzip.reference_scores(torch, state, x, 2, 3, 16, 16, 1e-6)  # [H, n]
            got = layer(x).t()
        self.assertTrue(torch.allclose(got, want, atol=1e-6))

    def test_attention_gate_is_causal(self):
        torch.manual_seed(2)
        layer = gc.AttentionGateLayer(32, 3, 2, 16, bias_init=0.0)
        x = torch.randn(1, 10, 32)
        y = x.clone()
        y[:, 6:] = torch.randn(1, 4, 32)
        with torch.no_grad():
            a, b = layer(x), layer(y)
        self.assertTrue(torch.allclose(a[..., :6], b[..., :6], atol=1e-6))
        self.assertFalse(torch.allclose(a[..., 6:], b[..., 6:], atol=1e-3))


@unittest.skipIf(torch is None, "needs torch")
class TrainerTest(unittest.TestCase):
    def run_kvgate(self, policy, gates_path):
        binary = _kvgate_bin()
        if binary is None:
            return None
        cmd = [binary, "generate", "--model", MODEL, "--prompt", "The old robot slowly opened the heavy wooden door",
               "--max-tokens", "3", "--policy", policy, "--gates", gates_path, "--keep-ratio", "0.5"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        self.assertEqual(res.returncode, 0, "kvgate rejected the %s gates:\n%s%s" % (policy, res.stdout, res.stderr))
        return res

    def test_fast_kvzip_trainer(self):
        import train_fast_kvzip_gate
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "fast_kvzip.safetensors")
            text = os.path.join(tmp, "text.txt")
            _write_text(text)
            rec = train_fast_kvzip_gate.main(["--model", MODEL, "--data", text, "--context-tokens", "40",
                                              "--max-contexts", "3", "--steps", "6", "--log-every", "2",
                                              "--out", out, "--quiet"])
            self.assertTrue(math.isfinite(rec["val_loss"]))
            layers, meta = gc.load_fast_kvzip(out)
            self.assertEqual(meta["num_layers"], "2")
            self.assertEqual(meta["group_size"], "2")
            with open(gc.log_path_for(out)) as f:
                records = [json.loads(line) for line in f]
            steps = [r for r in records if "step" in r]
            self.assertEqual([r["step"] for r in steps], [0, 2, 4, 5])
            self.assertEqual(len(steps[0]["loss_per_layer"]), 2)
            self.run_kvgate("fast_kvzip", out)

    def test_attention_gate_trainer(self):
        import train_attention_gate
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "attention_gate.safetensors")
            text = os.path.join(tmp, "text.txt")
            _write_text(text)
            rec = train_attention_gate.main(["--model", MODEL, "--data", text, "--context-tokens", "32",
                                             "--max-contexts", "10", "--steps", "6", "--batch-size", "4",
                                             "--log-every", "2", "--out", out, "--quiet"])
            self.assertTrue(0.0 <= rec["val_keep"] <= 1.0)
            layers, meta = gc.load_attention_gate(out)
            self.assertEqual((meta["gate_heads"], meta["gate_head_dim"], meta["num_kv_heads"]), ("2", "16", "2"))
            with open(gc.log_path_for(out)) as f:
                records = [json.loads(line) for line in f]
            self.assertEqual([r["step"] for r in records if "step" in r], [0, 2, 4, 5])
            self.run_kvgate("attention_gate", out)

    def test_focus_mask_marks_answer_predictions(self):
        """--focus-text: the predictions of the tokens after the focus ids, through the next eos."""
        import train_attention_gate
        ids = torch.tensor([[1, 7, 8, 5, 6, 2, 9, 7, 8, 4]])   # focus [7, 8], eos 2
        mask = train_attention_gate.focus_mask(ids, [7, 8], 2)
        # targets 5, 6, 2 (positions 3..5) are predicted at 2..4; target 4 (position 9) at 8
        self.assertEqual(mask[0].tolist(), [False, False, True, True, True, False, False, False, True, False])
        w = torch.tensor([[1.0, 3.0]])
        ref = torch.log_softmax(torch.tensor([[[0.0, 1.0], [2.0, 0.0]]]), -1)
        logits = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
        per_pos = (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1)
        self.assertAlmostEqual(float(train_attention_gate.kl_full_vs(ref, logits, w)),
                               float((per_pos * w).sum() / w.sum()), places=6)
        self.assertAlmostEqual(float(train_attention_gate.kl_full_vs(ref, logits)), float(per_pos.mean()), places=6)

    def test_attention_gate_trainer_focus_and_time_budget(self):
        import train_attention_gate
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "attention_gate.safetensors")
            focus = gate_tokenizer.load_tokenizer(MODEL).encode("the", add_special_tokens=False)
            data = os.path.join(tmp, "contexts.json")
            with open(data, "w") as f:   # every context holds the focus text at position 10 + i
                json.dump([[1] + list(range(20, 29 + i)) + focus + list(range(40, 62 - i - len(focus)))
                           for i in range(10)], f)
            rec = train_attention_gate.main(["--model", MODEL, "--data", data, "--context-tokens", "32",
                                             "--steps", "1000", "--time-budget", "1e-9",
                                             "--batch-size", "4", "--focus-text", "the", "--focus-weight", "10",
                                             "--out", out, "--quiet"])
            self.assertEqual(rec["steps"], 8)   # the budget cuts the run to the minimum
            self.assertIn("val_kl_focus_gate", rec)

    def test_committed_tinystories_gates(self):
        """tests/golden/tinystories-656k/gates load (Python readers; C++ loader with the model)."""
        gdir = os.path.join(GOLDEN, "tinystories-656k", "gates")
        fk, fk_meta = gc.load_fast_kvzip(os.path.join(gdir, "fast_kvzip.safetensors"))
        ag, ag_meta = gc.load_attention_gate(os.path.join(gdir, "attention_gate.safetensors"))
        for meta in (fk_meta, ag_meta):  # TinyStories-656K: 2 layers, D 128, 4 kv heads (G 2)
            self.assertEqual((meta["num_layers"], meta["hidden_size"], meta["num_kv_heads"]), ("2", "128", "4"))
        self.assertEqual(fk_meta["group_size"], "2")
        binary = _kvgate_bin()
        if binary is None or not os.path.exists(os.path.join(SHARED_TINYSTORIES, "model.safetensors")):
            return
        for policy, name in (("fast_kvzip", "fast_kvzip.safetensors"), ("attention_gate", "attention_gate.safetensors")):
            res = subprocess.run([binary, "generate", "--model", SHARED_TINYSTORIES, "--prompt",
                                  "Once upon a time, there was a little girl named Lily. She", "--max-tokens", "4",
                                  "--policy", policy, "--gates", os.path.join(gdir, name), "--keep-ratio", "0.5"],
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(res.returncode, 0, "%s: %s%s" % (policy, res.stdout, res.stderr))

    def test_committed_kvgate_tiny_gates(self):
        """models/kvgate-tiny/gates load (Python readers; the C++ loader through `kvgate generate`)."""
        model = os.path.join(REPO, "models", "kvgate-tiny")
        gdir = os.path.join(model, "gates")
        fk, fk_meta = gc.load_fast_kvzip(os.path.join(gdir, "fast_kvzip.safetensors"))
        ag, ag_meta = gc.load_attention_gate(os.path.join(gdir, "attention_gate.safetensors"))
        for meta in (fk_meta, ag_meta):  # kvgate-tiny: 8 layers, D 256, 4 kv heads (G 2)
            self.assertEqual((meta["num_layers"], meta["hidden_size"], meta["num_kv_heads"]), ("8", "256", "4"))
        self.assertEqual(fk_meta["group_size"], "2")
        binary = _kvgate_bin()
        if binary is None:
            return
        prompt = "The special magic number for falcon-472 is 5821934. The sky is blue."
        for policy, name in (("fast_kvzip", "fast_kvzip.safetensors"), ("attention_gate", "attention_gate.safetensors")):
            res = subprocess.run([binary, "generate", "--model", model, "--prompt", prompt, "--max-tokens", "2",
                                  "--policy", policy, "--gates", os.path.join(gdir, name), "--keep-ratio", "0.5"],
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(res.returncode, 0, "%s: %s%s" % (policy, res.stdout, res.stderr))

    def test_gated_forward_hides_evicted_keys(self):
        """In the trainer's forward, a flagged-out key changes nothing before it and something after."""
        import train_attention_gate
        model, config = lt.load_hf_checkpoint(MODEL)
        ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(3))

        class Fixed:
            def __init__(self, drop):
                self.drop = drop

            def __call__(self, x):
                z = torch.full((1, 2, 16), 5.0)
                z[:, :, self.drop] = -5.0
                return z

        with torch.no_grad():
            full = model(ids).logits
            gf = train_attention_gate.GatedForward([Fixed(9)] * 2, 0.5, 4, "hard")
            gated = model(ids, key_mask_fn=gf).logits
            sink = train_attention_gate.GatedForward([Fixed(2)] * 2, 0.5, 4, "hard")  # inside the sink: kept
            kept = model(ids, key_mask_fn=sink).logits
        self.assertTrue(torch.allclose(full[:, :10], gated[:, :10], atol=1e-5))
        self.assertFalse(torch.allclose(full[:, 10:], gated[:, 10:], atol=1e-4))
        self.assertTrue(torch.allclose(full, kept, atol=1e-5))


if __name__ == "__main__":
    unittest.main()
