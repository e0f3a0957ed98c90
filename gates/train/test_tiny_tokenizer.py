#!/usr/bin/env python3
"""Tests of bpe_tokenizer.py: the Llama-3 pre-tokenizer scanner, BPE training and the
tokenizer.json it writes. Needs no torch."""

import json
import os
import random
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bpe_tokenizer as bt  # noqa: E402
import tiny_data  # noqa: E402

REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
GOLDEN = os.path.join(REPO, "tests", "golden", "tokenizers")
TINY_MODEL = os.path.join(REPO, "models", "kvgate-tiny")
ESSAYS = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "pg-essays"))
KVGATE_BIN = None  # set by --kvgate PATH (the built C++ CLI)


class PretokenizeTest(unittest.TestCase):
    def test_llama3_splits(self):
        cases = {
            "Hello world": ["Hello", " world"],
            "falcon-472 is 5821934.": ["falcon", "-", "472", " is", " ", "582", "193", "4", "."],
            "blue.\nQuestion: x?\nAnswer:": ["blue", ".\n", "Question", ":", " x", "?\n", "Answer", ":"],
            "I'LL we're it's": ["I", "'LL", " we", "'re", " it", "'s"],
            "a  b   c": ["a", " ", " b", "  ", " c"],
            "x\n\n  y": ["x", "\n\n", " ", " y"],
            "end  ": ["end", "  "],
            "\u00e9t\u00e9 \u2014 ok": ["\u00e9t\u00e9", " \u2014", " ok"],
            "12345": ["123", "45"],
            "$100!": ["$", "100", "!"],
        }
        for text, want in cases.items():
            self.assertEqual(bt.pretokenize(text), want, text)

    def test_concatenation_is_lossless(self):
        rng = random.Random(3)
        alphabet = "ab Z9 .,'\n\t\u00e9\u2014-?"
        for _ in range(200):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            self.assertEqual("".join(bt.pretokenize(s)), s)


class GoldenFixtureTest(unittest.TestCase):
    def test_matches_hf_llama3_fixture(self):
        path = os.path.join(GOLDEN, "llama3_bytelevel")
        if not os.path.isdir(path):
            self.skipTest("no tests/golden/tokenizers/llama3_bytelevel")
        tok = bt.Tokenizer.load(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "cases.json"), encoding="utf-8") as f:
            cases = json.load(f)["cases"]
        for c in cases:
            self.assertEqual(tok.encode(c["text"]), c["ids_no_special"], c["text"][:60])


class TrainedTokenizerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        text = " ".join(tiny_data.DEFAULT_SENTENCES) * 3 + (
            " The quick brown fox jumps over the lazy dog. It's 1999, and we'll see! "
            "Startups grow fast; investors notice. \u00c9t\u00e9 \u2014 caf\u00e9.") * 20
        cls.tok = bt.train_tokenizer(tiny_data.tokenizer_corpus(text, random.Random(0), 300), 1700)

    def test_special_and_digit_ids(self):
        tok = self.tok
        self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id), (0, 1, 2))
        self.assertEqual(tok.vocab_size, 1700)
        for n in (0, 7, 42, 100, 999, 5, 50, 500):
            self.assertEqual(len(tok.encode(str(n))), 1, n)
            self.assertEqual(len(tok.encode("%03d" % n)), 1, n)
        ids = tok.encode(" 5821934")
        self.assertEqual([tok.id_to_token[i] for i in ids], ["\u0120", "582", "193", "4"])

    def test_roundtrip_and_specials(self):
        tok = self.tok
        text = "Key rocket-123 has value 4567890.\nQuestion: \u00e9t\u00e9?\nAnswer: x"
        ids = tok.encode(text, add_bos=True)
        self.assertEqual(ids[0], tok.bos_id)
        self.assertEqual(tok.decode(ids), text)
        self.assertEqual(tok.encode("a<|eos|>b"), tok.encode("a") + [tok.eos_id] + tok.encode("b"))
        self.assertEqual(tok.decode([tok.eos_id], skip_special=False), "<|eos|>")

    def test_training_is_deterministic(self):
        text = "alpha beta gamma delta. " * 50 + "beta gamma! " * 30
        a = bt.train_bpe([text], 1400)
        b = bt.train_bpe([text], 1400)
        self.assertEqual(a, b)

    def test_json_roundtrip(self):
        with tempfile.TemporaryDirectory() as d:
            self.tok.save(d)
            with open(os.path.join(d, "tokenizer.json"), encoding="utf-8") as f:
                j = json.load(f)
            self.assertEqual(j["model"]["type"], "BPE")
            self.assertTrue(j["model"]["ignore_merges"])
            self.assertEqual(j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"], bt.LLAMA3_PATTERN)
            self.assertEqual(j["post_processor"]["single"][0]["SpecialToken"]["id"], "<|bos|>")
            self.assertEqual([t["content"] for t in j["added_tokens"]], list(bt.SPECIAL_TOKENS))
            # Every merge names vocab tokens and yields one.
            vocab = j["model"]["vocab"]
            for a, b in j["model"]["merges"]:
                self.assertIn(a + b, vocab)
            loaded = bt.Tokenizer.load(d)
            text = "The sky is blue. VAR summit-101 = VAR raven-999."
            self.assertEqual(loaded.encode(text), self.tok.encode(text))


class CppParityTest(unittest.TestCase):
    """`kvgate tokenize` (the C++ tokenizer) gives bpe_tokenizer's ids on the checked-in
    models/kvgate-tiny/tokenizer.json, for retrieval prompts and essay text."""

    def test_cpp_tokenizer_matches(self):
        import subprocess
        if KVGATE_BIN is None or not os.path.exists(KVGATE_BIN):
            self.skipTest("give --kvgate PATH")
        if not os.path.exists(os.path.join(TINY_MODEL, "tokenizer.json")):
            self.skipTest("no models/kvgate-tiny/tokenizer.json")
        tok = bt.Tokenizer.load(TINY_MODEL)
        text = (tiny_data.read_text(ESSAYS) if os.path.isdir(ESSAYS)
                else "Startups grow fast.  Investors notice! Why? It's 1999\u2014no, 2024. " * 300)
        hay = tiny_data.Haystack(tiny_data.split_sentences(text), tok, "essays")
        rng = random.Random(5)
        texts = []
        for i in range(10):
            s = tiny_data.build_sample(tiny_data.TASKS[i % 5], rng,
                                       hay if i % 2 else tiny_data.Haystack.default(tok),
                                       (1024, 2048, 4096)[i % 3])
            texts.append(s.prompt_text + s.answer_text)
        for _ in range(6):
            k = rng.randrange(max(1, len(text) - 4000))
            texts.append(text[k:k + 4000])
        texts.append("caf\u00e9 \u2014 \x97 na\u00efve \u65e5\u672c \U0001F600 1234567 a<|eos|>b\n\n\tx  ")
        for t in texts:
            out = subprocess.run([KVGATE_BIN, "tokenize", "--model", TINY_MODEL, "--text", t, "--json"],
                                 capture_output=True, text=True, check=True)
            self.assertEqual(json.loads(out.stdout)["ids"], tok.encode(t, add_bos=True), t[:80])


if __name__ == "__main__":
    if "--kvgate" in sys.argv:
        i = sys.argv.index("--kvgate")
        KVGATE_BIN = sys.argv[i + 1]
        del sys.argv[i:i + 2]
    unittest.main()
