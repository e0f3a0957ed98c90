#!/usr/bin/env python3
"""Tests of train_tiny_model.py on the CPU: a few steps of a toy model, resume equality,
checkpoint packing, export in HF layout, and the training forward against llama_torch's.
Skipped without torch."""

import json
import os
import random
import shutil
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None

import bpe_tokenizer as bt  # noqa: E402
import tiny_data as td  # noqa: E402

TEXT = ("Startups are hard. Most of them fail! Why? Because founders give up too early. "
        "Good ideas look bad at first. Investors often miss them. The best founders are "
        "relentlessly resourceful. They keep going when others stop. ") * 40

TOY = ["--vocab_size", "1400", "--hidden", "32", "--ffn", "64", "--layers", "2", "--heads", "4",
       "--kv_heads", "2", "--head_dim", "8", "--max_context", "256", "--tokens_per_step", "512",
       "--device", "cpu", "--log_every", "2", "--seed", "5"]


@unittest.skipIf(torch is None, "needs torch")
class TrainTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        import train_tiny_model
        cls.tt = train_tiny_model
        cls.dir = tempfile.mkdtemp(prefix="tiny_train_test_")
        cls.hay = os.path.join(cls.dir, "hay.txt")
        with open(cls.hay, "w") as f:
            f.write(TEXT)
        tok = bt.train_tokenizer(td.tokenizer_corpus(TEXT, random.Random(0), 200), 1400)
        cls.tok_dir = os.path.join(cls.dir, "tok")
        tok.save(cls.tok_dir)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def run_main(self, work, *extra):
        args = TOY + ["--haystack", self.hay, "--tokenizer", os.path.join(self.tok_dir, "tokenizer.json"),
                      "--work", os.path.join(self.dir, work), "--out", os.path.join(self.dir, work + "_out"),
                      "--workers", "0", "--max_steps", "6"] + list(extra)
        self.assertEqual(self.tt.main(args), 0)
        return torch.load(os.path.join(self.dir, work, "ckpt.pt"), map_location="cpu")

    def test_resume_is_exact_and_export(self):
        straight = self.run_main("a", "--eval_samples", "1", "--eval_default_samples", "1",
                                 "--eval_contexts", "200")
        half = self.run_main("b", "--stop_at_step", "3", "--no_export")
        self.assertEqual(half["step"], 3)
        resumed = self.run_main("b", "--no_export", "--pack_ckpt", os.path.join(self.dir, "packed"))
        self.assertEqual(resumed["step"], 6)
        self.assertEqual(straight["step"], 6)
        for k, v in straight["model"].items():
            self.assertTrue(torch.equal(v, resumed["model"][k]), k)
        self.assertEqual(len(straight["history"]), 3)
        self.assertEqual([h["lm"] for h in straight["history"]], [h["lm"] for h in resumed["history"]])

        # Packed parts rebuild a loadable checkpoint.
        parts = os.path.join(self.dir, "packed")
        self.assertTrue(self.tt.unpack_checkpoint(parts, os.path.join(parts, "ckpt.pt")))
        packed = self.tt._torch_load(os.path.join(parts, "ckpt.pt"))
        self.assertEqual(packed["step"], 6)
        for k, v in straight["model"].items():
            self.assertTrue(torch.equal(v, packed["model"][k]), k)

        # The export is an HF checkpoint in bf16 with our tokenizer.
        out = os.path.join(self.dir, "a_out")
        for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
                     "README.md"):
            self.assertTrue(os.path.exists(os.path.join(out, name)), name)
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        self.assertEqual(cfg["architectures"], ["LlamaForCausalLM"])
        self.assertEqual((cfg["num_attention_heads"], cfg["num_key_value_heads"]), (4, 2))
        self.assertEqual(cfg["max_position_embeddings"], 256)
        self.assertEqual((cfg["bos_token_id"], cfg["eos_token_id"]), (1, 2))
        import llama_torch
        tensors, _ = llama_torch.read_safetensors(os.path.join(out, "model.safetensors"))
        self.assertTrue(all(t.dtype == torch.bfloat16 for t in tensors.values()))
        self.assertIn("| niah_single |", open(os.path.join(out, "README.md")).read())

    def test_training_forward_matches_llama_torch(self):
        import llama_torch
        tok = bt.Tokenizer.load(self.tok_dir)
        args = self.tt.parse_args(TOY)
        config = self.tt.build_config(args, tok)
        model = llama_torch.LlamaModel(config)
        self.tt.init_weights(model, 0)
        ids = torch.randint(0, tok.vocab_size, (2, 40))
        with torch.no_grad():
            ref = model(ids).logits
            got = model.lm_head(self.tt.forward_hidden(model, ids))
        self.assertLess(float((ref - got).abs().max()), 1e-4)

    def test_batches_are_a_function_of_the_step(self):
        tok = bt.Tokenizer.load(self.tok_dir)
        args = self.tt.parse_args(TOY)
        essays = td.Haystack(td.split_sentences(TEXT), tok, "t")
        self.tt.data_init(tok, essays, td.Haystack.default(tok), args)
        a = self.tt.make_batch(4, 10)
        b = self.tt.make_batch(4, 10)
        self.assertTrue((a[0] == b[0]).all() and (a[1] == b[1]).all())
        ids, kinds, ctx = a
        self.assertLessEqual(ids.shape[1], ctx)
        self.assertTrue(((kinds == self.tt.KIND_ANSWER).sum(1) > 0).any())


if __name__ == "__main__":
    unittest.main()
