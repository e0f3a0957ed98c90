"""Haystack text and the RULER-style retrieval tasks of bench/retrieval_tasks.md.

The prompts are exactly those of that page (the C++ `kvgate eval` builds the same ones):
`<BOS>` + haystack sentences joined by one space, with the task's sentences inserted at
seeded depths, + the question; the answer follows, then `<EOS>` in training.

Prompts are assembled from token ids cached per sentence instead of encoding the whole
string: a sentence never ends in whitespace and the next one is encoded with its
leading space, so the Llama-3 pre-tokenizer cuts at every joint and the ids are those of
the full string. Only the last sentence is encoded together with the question, since a
final '.' and the question's leading newline form one pre-token. `test_tiny_data.py`
checks the equality on random prompts.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import List, Optional, Sequence, Tuple

WORDS = (
    "apple banana cherry dragon eagle falcon garden harbor island jacket kettle lemon "
    "marble needle orange pepper quartz river silver tiger umbrella violet walnut yellow "
    "zebra anchor bridge candle desert ember forest glacier hammer icicle jungle koala "
    "lantern meadow nickel oyster parrot quiver rocket saddle tulip velvet willow badger "
    "copper dolphin engine feather goblet hornet indigo jasper lizard mango nectar orchid "
    "pebble raven summit").split()
# bench/retrieval_tasks.md calls it "the 64-word list (index 0..63)" but lists 63 words;
# keys draw from the words as listed.
assert len(WORDS) == 63

DEFAULT_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.",
                     "Here we go.", "There and back again.")
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "kv_lookup", "vt")
LENGTH_MARGIN_TOKENS = 16
_ASCII_SPACE = " \t\n\r\f\v"


def split_sentences(text: str) -> List[str]:
    """Sentences end after '.', '!' or '?' followed by whitespace; inner whitespace runs
    become one space; empty sentences are dropped."""
    out = []
    start = 0
    n = len(text)
    for i, c in enumerate(text):
        if c in ".!?" and i + 1 < n and text[i + 1] in _ASCII_SPACE:
            out.append(text[start:i + 1])
            start = i + 1
    out.append(text[start:])
    sentences = []
    for s in out:
        words = _split_ascii_ws(s)
        if words:
            sentences.append(" ".join(words))
    return sentences


def _split_ascii_ws(s: str) -> List[str]:
    words, cur = [], []
    for c in s:
        if c in _ASCII_SPACE:
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(c)
    if cur:
        words.append("".join(cur))
    return words


def read_text(path: str) -> str:
    """A text file, or every *.txt of a folder (sorted by name) joined by newlines."""
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith(".txt"))
        parts = []
        for name in names:
            with open(os.path.join(path, name), encoding="utf-8") as f:
                parts.append(f.read())
        return "\n".join(parts)
    with open(path, encoding="utf-8") as f:
        return f.read()


class Haystack:
    """A cyclic list of filler sentences with their token ids cached."""

    def __init__(self, sentences: Sequence[str], tokenizer, name: str):
        if not sentences:
            raise ValueError("haystack has no sentences")
        self.name = name
        self.sentences = list(sentences)
        self.tok = tokenizer
        self.ids_first = [tokenizer.encode(s) for s in self.sentences]        # at the start
        self.ids_joined = [tokenizer.encode(" " + s) for s in self.sentences]  # after a space

    @classmethod
    def default(cls, tokenizer) -> "Haystack":
        return cls(DEFAULT_SENTENCES, tokenizer, "default")

    @classmethod
    def from_path(cls, path: str, tokenizer) -> "Haystack":
        return cls(split_sentences(read_text(path)), tokenizer, os.path.basename(path.rstrip("/")))

    def __len__(self) -> int:
        return len(self.sentences)


@dataclasses.dataclass
class Sample:
    task: str
    prompt_ids: List[int]   # <BOS> + body + question
    answer_ids: List[int]   # answer tokens, without <EOS>
    prompt_text: str        # body + question (no <BOS>)
    answer_text: str        # with its leading space


def make_keys(rng: random.Random, n: int) -> List[str]:
    keys: List[str] = []
    while len(keys) < n:
        k = f"{WORDS[rng.randrange(len(WORDS))]}-{rng.randint(100, 999)}"
        if k not in keys:
            keys.append(k)
    return keys


def make_values(rng: random.Random, n: int) -> List[str]:
    vals: List[str] = []
    while len(vals) < n:
        v = str(rng.randint(1000000, 9999999))
        if v not in vals:
            vals.append(v)
    return vals


def task_parts(task: str, rng: random.Random) -> Tuple[List[str], str, str]:
    """(inserted sentences in order of depth, question, answer with leading space)."""
    if task == "niah_single":
        k, = make_keys(rng, 1)
        v, = make_values(rng, 1)
        return ([f"The special magic number for {k} is {v}."],
                f"\nQuestion: What is the special magic number for {k}?\nAnswer:", f" {v}")
    if task == "niah_multikey":
        keys = make_keys(rng, 4)
        vals = make_values(rng, 4)
        j = rng.randrange(4)
        return ([f"The special magic number for {k} is {v}." for k, v in zip(keys, vals)],
                f"\nQuestion: What is the special magic number for {keys[j]}?\nAnswer:",
                f" {vals[j]}")
    if task == "niah_multivalue":
        k, = make_keys(rng, 1)
        vals = make_values(rng, 4)
        return ([f"One of the special magic numbers for {k} is {v}." for v in vals],
                f"\nQuestion: What are all the special magic numbers for {k}?\nAnswer:",
                " " + ", ".join(vals))
    if task == "kv_lookup":
        keys = make_keys(rng, 24)
        vals = make_values(rng, 24)
        j = rng.randrange(24)
        return ([f"Key {k} has value {v}." for k, v in zip(keys, vals)],
                f"\nQuestion: What is the value of key {keys[j]}?\nAnswer:", f" {vals[j]}")
    if task == "vt":
        names = make_keys(rng, 4)
        v, = make_values(rng, 1)
        lines = [f"VAR {names[0]} = {v}."]
        lines += [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 4)]
        return (lines, f"\nQuestion: Which variables are assigned the value {v}?\nAnswer:",
                " " + " ".join(names))
    raise ValueError(f"unknown task '{task}'")


def build_sample(task: str, rng: random.Random, hay: Haystack, context_tokens: int,
                 depth: Optional[float] = None, start: Optional[int] = None) -> Sample:
    """One prompt whose prompt + answer fills `context_tokens` minus the 16-token margin.

    The haystack grows sentence by sentence (from `start`, wrapping) while prompt +
    answer stays within the budget; inserted sentences go at sorted uniform depths (or
    at `depth` for niah_single).
    """
    tok = hay.tok
    inserted, question, answer = task_parts(task, rng)
    if start is None:
        start = rng.randrange(len(hay))
    depths = sorted(rng.random() for _ in inserted)
    if depth is not None:
        depths = [float(depth)] * len(inserted)
    ins_ids = [tok.encode(" " + s) for s in inserted]
    q_ids = tok.encode(question)
    a_ids = tok.encode(answer)
    budget = context_tokens - LENGTH_MARGIN_TOKENS - 1 - len(a_ids) - len(q_ids)
    budget -= sum(len(x) for x in ins_ids)
    n = 0
    used = 0
    m = len(hay)
    while True:
        nxt = len(hay.ids_joined[(start + n) % m])
        if used + nxt > budget:
            break
        used += nxt
        n += 1
    # Sentence list with insertions; an inserted sentence goes before haystack sentence
    # round(depth * n), after the ones inserted at the same place.
    order: List[Tuple[str, int]] = [("h", (start + i) % m) for i in range(n)]
    for k in reversed(range(len(inserted))):
        pos = min(n, max(0, int(round(depths[k] * n))))
        order.insert(pos, ("i", k))
    ids = [tok.bos_id]
    texts: List[str] = []
    for idx, (kind, k) in enumerate(order):
        text = hay.sentences[k] if kind == "h" else inserted[k]
        texts.append(text)
        last = idx == len(order) - 1
        if last:
            ids.extend(tok.encode((" " if idx else "") + text + question))
        elif kind == "h":
            ids.extend(hay.ids_joined[k] if idx else hay.ids_first[k])
        else:
            ids.extend(ins_ids[k] if idx else tok.encode(text))
    if not order:
        ids.extend(q_ids)
    return Sample(task, ids, a_ids, " ".join(texts) + question, answer)


def build_text(rng: random.Random, hay: Haystack, context_tokens: int) -> List[int]:
    """<BOS> + consecutive haystack sentences, `context_tokens` ids at most (LM data)."""
    tok = hay.tok
    m = len(hay)
    k = rng.randrange(m)
    ids = [tok.bos_id] + hay.ids_first[k]
    while len(ids) < context_tokens:
        k = (k + 1) % m
        ids.extend(hay.ids_joined[k])
    return ids[:context_tokens]


def tokenizer_corpus(essay_text: str, rng: random.Random, num_synthetic: int = 3000) -> List[str]:
    """Texts the BPE is trained on: the essays plus task sentences and questions, so that
    the key words and the task phrases become whole tokens."""
    texts = [essay_text, " ".join(DEFAULT_SENTENCES * 20)]
    for i in range(num_synthetic):
        inserted, question, answer = task_parts(TASKS[i % len(TASKS)], rng)
        texts.append(" ".join(inserted) + question + answer)
    return texts
