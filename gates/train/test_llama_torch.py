#!/usr/bin/env python3
"""llama_torch against the golden fixtures that transformers made (tests/golden).

Run: python3 -m unittest gates/train/test_llama_torch.py (needs torch; skipped without it).
"""

import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(REPO, "tests", "golden")
TINYSTORIES = os.environ.get("KVGATE_TINYSTORIES_DIR", os.path.join(REPO, "..", "shared", "models", "tinystories-656k"))
sys.path.insert(0, HERE)

try:
    import torch
    import llama_torch as lt
except ImportError:  # CI machines without torch
    torch = None

CASES = ["llama_gqa_untied", "llama3_rope_tied_bf16", "mistral_sliding_fp16_sharded", "qwen2_bias_tied",
         "qwen3_qknorm"]
ATOL = 1e-4


def _max_abs_err(model, expected):
    worst = 0.0
    device = next(model.parameters()).device
    for prompt in expected["prompts"]:
        ids = torch.tensor([prompt["ids"]], device=device)
        with torch.no_grad():
            logits = model(ids).logits[0].cpu()
        for pos, want in zip(prompt["logits_positions"], prompt["logits"]):
            want = torch.tensor(want, dtype=torch.float32)
            err = (logits[pos] - want).abs().max().item() / max(1.0, want.abs().max().item())
            worst = max(worst, err)
    return worst


def _greedy(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


@unittest.skipIf(torch is None, "needs torch")
class GoldenLogitsTest(unittest.TestCase):
    def check_case(self, case_dir):
        with open(os.path.join(case_dir, "expected.json")) as f:
            expected = json.load(f)
        model, config = lt.load_hf_checkpoint(case_dir)
        self.assertEqual(config.architecture, expected["architecture"])
        err = _max_abs_err(model, expected)
        self.assertLess(err, ATOL, "%s: max relative logit error %g" % (case_dir, err))
        # The first 8 greedy tokens of the first prompt (near ties excluded by the fixture's margins).
        prompt = expected["prompts"][0]
        n = 8
        if min(prompt["greedy_margins"][:n]) > 1e-3:
            self.assertEqual(_greedy(model, prompt["ids"], n), prompt["greedy"][:n])

    def test_random_cases(self):
        for case in CASES:
            with self.subTest(case=case):
                self.check_case(os.path.join(GOLDEN, "models", case))

    @unittest.skipUnless(torch is not None and torch.cuda.is_available(), "no CUDA device")
    def test_random_cases_cuda(self):
        """The same on the GPU (SDPA where the torch has it), TF32 off."""
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        for case in CASES:
            with self.subTest(case=case):
                case_dir = os.path.join(GOLDEN, "models", case)
                with open(os.path.join(case_dir, "expected.json")) as f:
                    expected = json.load(f)
                model, _ = lt.load_hf_checkpoint(case_dir, device="cuda")
                err = _max_abs_err(model, expected)
                self.assertLess(err, ATOL, "%s on cuda: max relative logit error %g" % (case, err))

    @unittest.skipUnless(os.path.exists(os.path.join(TINYSTORIES, "model.safetensors")), "no TinyStories model")
    def test_tinystories(self):
        with open(os.path.join(GOLDEN, "tinystories-656k", "expected.json")) as f:
            expected = json.load(f)
        model, _ = lt.load_hf_checkpoint(TINYSTORIES)
        err = _max_abs_err(model, expected)
        self.assertLess(err, ATOL, "tinystories: max relative logit error %g" % err)


@unittest.skipIf(torch is None, "needs torch")
class RoundTripTest(unittest.TestCase):
    def test_safetensors_dtypes(self):
        g = torch.Generator().manual_seed(0)
        tensors = {
            "a": torch.randn(3, 5, generator=g),
            "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.randn(2, 2, 2, generator=g).to(torch.float16),
            "d": torch.arange(6, dtype=torch.int64).view(2, 3),
            "e": torch.zeros(0, 4),
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "x.safetensors")
            lt.write_safetensors(path, tensors, {"k": "v"})
            back, meta = lt.read_safetensors(path)
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
            self.assertEqual(n % 8, 0)
        self.assertEqual(meta, {"k": "v"})
        self.assertEqual(sorted(back), sorted(tensors))
        for k, t in tensors.items():
            self.assertEqual(back[k].dtype, t.dtype, k)
            self.assertTrue(torch.equal(back[k], t), k)

    def test_save_load_checkpoint(self):
        for arch, kw in [("LlamaForCausalLM", dict(tie_word_embeddings=True)),
                         ("Qwen3ForCausalLM", dict(head_dim=16)),
                         ("Qwen2ForCausalLM", dict())]:
            with self.subTest(arch=arch):
                config = lt.tiny_random_config(architecture=arch, **kw)
                model = lt.init_random_(lt.LlamaModel(config), seed=1)
                ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
                with tempfile.TemporaryDirectory() as tmp:
                    lt.save_hf_checkpoint(model, config, tmp, dtype=torch.float32)
                    back, config2 = lt.load_hf_checkpoint(tmp)
                self.assertEqual(config2.to_hf_dict()["architectures"], [arch])
                with torch.no_grad():
                    self.assertTrue(torch.allclose(model(ids).logits, back(ids).logits, atol=1e-6))

    def test_extras_consistent(self):
        """Explicit attention == SDPA path; attention rows and q/k agree with the logits' forward."""
        config = lt.tiny_random_config(num_heads=4, num_kv_heads=2)
        model = lt.init_random_(lt.LlamaModel(config), seed=3).eval()
        ids = torch.randint(0, config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            base = model(ids)
            full = model(ids, return_layer_inputs=True, output_attentions_for=[9], return_qk=True)
            keep_all = model(ids, key_mask_fn=lambda layer, x: torch.ones(1, 2, 10))
        self.assertTrue(torch.allclose(base.logits, full.logits, atol=1e-5))
        self.assertTrue(torch.allclose(base.logits, keep_all.logits, atol=1e-5))
        self.assertEqual(len(full.layer_inputs), 2)
        self.assertEqual(tuple(full.attentions[0].shape), (1, 4, 1, 10))
        q, k = full.queries[1], full.keys[1]
        p = torch.softmax(q[:, :, 9:10] @ k.repeat_interleave(2, 1).transpose(2, 3) / q.shape[-1] ** 0.5, -1)
        self.assertTrue(torch.allclose(p, full.attentions[1], atol=1e-6))
        # A key masked out is invisible to later queries but a token still sees itself.
        with torch.no_grad():
            keep = torch.ones(1, 2, 10)
            keep[:, :, 3] = 0
            masked = model(ids, key_mask_fn=lambda layer, x: keep, output_attentions_for=[3, 7])
        self.assertEqual(float(masked.attentions[0][0, :, 1, 3].abs().max()), 0.0)
        self.assertGreater(float(masked.attentions[0][0, :, 0, 3].min()), 0.0)


if __name__ == "__main__":
    unittest.main()
