#!/usr/bin/env python3
"""Tests of tiny_data.py: sentence splitting and the retrieval prompts of
bench/retrieval_tasks.md. Needs no torch."""

import os
import random
import re
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bpe_tokenizer as bt  # noqa: E402
import tiny_data as td  # noqa: E402

ESSAYS = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data", "pg-essays"))
ESSAY_TEXT = (
    "Startups are hard.  Most fail!\n\nWhy?\tBecause   founders give up. Numbers like 3.14 stay "
    "whole. The end is near... or is it?  \"Quoted.\" Done") * 6


class SplitTest(unittest.TestCase):
    def test_split_sentences(self):
        self.assertEqual(
            td.split_sentences("A b.  C\n d! E?F. G.\tH  i"),
            ["A b.", "C d!", "E?F.", "G.", "H i"])
        self.assertEqual(td.split_sentences("  \n "), [])
        self.assertEqual(td.split_sentences("Pi is 3.14 here. Ok."), ["Pi is 3.14 here.", "Ok."])

    def test_word_list(self):
        self.assertEqual(td.WORDS[0], "apple")
        self.assertEqual(td.WORDS[-1], "summit")
        self.assertEqual(len(set(td.WORDS)), len(td.WORDS))


class PromptTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        text = ESSAY_TEXT
        if os.path.isdir(ESSAYS):
            with open(os.path.join(ESSAYS, sorted(os.listdir(ESSAYS))[0]), encoding="utf-8") as f:
                text = f.read() + "\n" + ESSAY_TEXT
        cls.tok = bt.train_tokenizer(td.tokenizer_corpus(text, random.Random(0), 500), 1800)
        cls.essays = td.Haystack(td.split_sentences(text), cls.tok, "essays")
        cls.default = td.Haystack.default(cls.tok)

    def test_ids_equal_encoding_of_the_whole_prompt(self):
        rng = random.Random(7)
        for i in range(60):
            task = td.TASKS[i % len(td.TASKS)]
            hay = self.essays if i % 2 else self.default
            ctx = rng.choice([600, 1024, 2048])
            depth = rng.choice([None, 0.0, 0.5, 1.0]) if task == "niah_single" else None
            s = td.build_sample(task, rng, hay, ctx, depth=depth)
            self.assertEqual(s.prompt_ids, self.tok.encode(s.prompt_text, add_bos=True), (task, ctx))
            self.assertEqual(s.answer_ids, self.tok.encode(s.answer_text))
            total = len(s.prompt_ids) + len(s.answer_ids)
            self.assertLessEqual(total, ctx - td.LENGTH_MARGIN_TOKENS)
            self.assertGreater(total, ctx - td.LENGTH_MARGIN_TOKENS - 250)  # one long sentence

    def test_formats(self):
        rng = random.Random(11)
        key = r"[a-z]+-[1-9]\d\d"
        val = r"[1-9]\d{6}"
        s = td.build_sample("niah_single", rng, self.default, 300, depth=0.0)
        self.assertTrue(s.prompt_text.startswith("The special magic number for "))
        m = re.match(r"^The special magic number for (%s) is (%s)\. [A-Z]" % (key, val),
                     s.prompt_text[s.prompt_text.index("The special"):])
        self.assertIsNotNone(m)
        self.assertTrue(s.prompt_text.endswith(
            "\nQuestion: What is the special magic number for %s?\nAnswer:" % m.group(1)))
        self.assertEqual(s.answer_text, " " + m.group(2))

        s = td.build_sample("niah_single", rng, self.default, 300, depth=1.0)
        self.assertRegex(s.prompt_text, r"\. The special magic number for %s is %s\.\nQuestion:" % (key, val))

        s = td.build_sample("niah_multivalue", rng, self.essays, 800)
        vals = re.findall(r"One of the special magic numbers for %s is (%s)\." % (key, val), s.prompt_text)
        self.assertEqual(len(vals), 4)
        self.assertEqual(s.answer_text, " " + ", ".join(vals))

        s = td.build_sample("kv_lookup", rng, self.essays, 1024)
        pairs = re.findall(r"Key (%s) has value (%s)\." % (key, val), s.prompt_text)
        self.assertEqual(len(pairs), 24)
        self.assertEqual(len({k for k, _ in pairs}), 24)
        asked = re.search(r"What is the value of key (%s)\?\nAnswer:$" % key, s.prompt_text).group(1)
        self.assertEqual(s.answer_text, " " + dict(pairs)[asked])

        s = td.build_sample("vt", rng, self.default, 400)
        chain = re.findall(r"VAR (%s) = (?:VAR )?(%s|%s)\." % (key, key, val), s.prompt_text)
        self.assertEqual(len(chain), 4)
        self.assertRegex(chain[0][1], "^%s$" % val)
        for (a, _), (_, prev) in zip(chain, chain[1:]):
            self.assertEqual(a, prev)
        self.assertEqual(s.answer_text, " " + " ".join(a for a, _ in chain))
        self.assertTrue(s.prompt_text.endswith(
            "\nQuestion: Which variables are assigned the value %s?\nAnswer:" % chain[0][1]))

        s = td.build_sample("niah_multikey", rng, self.essays, 700)
        needles = re.findall(r"The special magic number for (%s) is (%s)\." % (key, val), s.prompt_text)
        self.assertEqual(len(needles), 4)
        asked = re.search(r"number for (%s)\?\nAnswer:$" % key, s.prompt_text).group(1)
        self.assertEqual(s.answer_text, " " + dict(needles)[asked])

    def test_default_haystack_order(self):
        s = td.build_sample("niah_single", random.Random(1), self.default, 200, depth=1.0, start=0)
        body = s.prompt_text.split(" The special magic")[0]
        self.assertTrue(body.startswith("The grass is green. The sky is blue. The sun is yellow. "
                                        "Here we go. There and back again. The grass is green."))

    def test_build_text(self):
        ids = td.build_text(random.Random(2), self.essays, 300)
        self.assertEqual(len(ids), 300)
        self.assertEqual(ids[0], self.tok.bos_id)


if __name__ == "__main__":
    unittest.main()
