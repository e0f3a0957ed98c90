#!/usr/bin/env python3
"""A tokenizer for the gate trainers: Hugging Face `tokenizers` when importable, else a small
pure-Python reader of tokenizer.json.

The fallback implements what the Llama-family checkpoints we train gates for use:
- BPE models (merges as "a b" strings or [a, b] pairs, ``ignore_merges``), with
  ``byte_fallback`` (``<0xXX>`` tokens for characters outside the vocabulary; TinyStories,
  Llama 2, Mistral) and ``unk_token`` / ``fuse_unk``;
- normalizers Sequence / Prepend / Replace (string patterns) / NFC / NFD / NFKC / NFKD;
- pre-tokenizers: none, ByteLevel and Split with a regex (Llama 3 / Qwen 2 style; needs the
  ``regex`` package for ``\\p{L}``; without it such tokenizers raise at load);
- added (special) tokens matched in the raw text before normalization;
- post-processors TemplateProcessing (e.g. ``<s> $A``), ByteLevel, Sequence.

Merges are applied exactly like `tokenizers` (word.rs ``merge_all``): repeatedly the pair with
the lowest merge rank, the leftmost on ties. Encodings match tests/golden/tokenizers/*/cases.json
(``test_gate_trainers.py`` checks the TinyStories and sentencepiece cases).

    tok = load_tokenizer(model_dir)        # or a tokenizer.json path
    ids = tok.encode(text, add_special_tokens=False)
"""

import heapq
import json
import os
import unicodedata


def load_tokenizer(path, prefer_hf=True):
    """A tokenizer for `path` (a model directory or a tokenizer.json)."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if prefer_hf:
        try:
            import tokenizers  # noqa: F401
            return HfTokenizer(path)
        except ImportError:
            pass
    return SimpleTokenizer(path)


class HfTokenizer:
    name = "tokenizers"

    def __init__(self, path):
        import tokenizers
        self._tok = tokenizers.Tokenizer.from_file(path)

    def encode(self, text, add_special_tokens=False):
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)


def _bytes_to_unicode():
    """GPT-2's byte -> printable character map (ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


class SimpleTokenizer:
    name = "gate_tokenizer (pure Python)"

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        if model.get("type", "BPE") != "BPE":
            raise NotImplementedError("only BPE tokenizer.json models are supported, not %s" % model.get("type"))
        self.vocab = dict(model["vocab"])
        self.byte_fallback = bool(model.get("byte_fallback"))
        self.unk = model.get("unk_token")
        self.fuse_unk = bool(model.get("fuse_unk"))
        self.ignore_merges = bool(model.get("ignore_merges"))
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise NotImplementedError("continuing_subword_prefix / end_of_word_suffix are not supported")
        self.merges = {}
        for rank, m in enumerate(model.get("merges", [])):
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a in self.vocab and b in self.vocab and (a + b) in self.vocab:
                self.merges[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[a + b])
        self.normalizer = spec.get("normalizer")
        # Added tokens: `normalized: false` ones match the raw text; `normalized: true` ones match
        # their own normalized form in the normalized text (as `tokenizers` does: with a
        # Prepend("▁") normalizer "<unk>" is looked for as "▁<unk>").
        self.raw_added, self.norm_added = {}, {}
        for t in spec.get("added_tokens", []):
            if t.get("normalized", not t.get("special", False)):
                self.norm_added[self._normalize(t["content"])] = t["id"]
            else:
                self.raw_added[t["content"]] = t["id"]
            self.vocab.setdefault(t["content"], t["id"])
        self.pre_tokenizer = spec.get("pre_tokenizer")
        self.post_processor = spec.get("post_processor")
        self._byte_map = _bytes_to_unicode()
        self._check_pre(self.pre_tokenizer)

    # ---- normalizers / pre-tokenizers ----------------------------------------------------

    def _normalize(self, text, spec=None):
        spec = self.normalizer if spec is None else spec
        if not spec:
            return text
        kind = spec["type"]
        if kind == "Sequence":
            for s in spec["normalizers"]:
                text = self._normalize(text, s)
            return text
        if kind == "Prepend":
            return spec["prepend"] + text if text else text
        if kind == "Replace":
            pattern = spec["pattern"]
            if "String" not in pattern:
                raise NotImplementedError("Replace normalizer with a regex pattern")
            return text.replace(pattern["String"], spec["content"])
        if kind in ("NFC", "NFD", "NFKC", "NFKD"):
            return unicodedata.normalize(kind, text)
        raise NotImplementedError("normalizer %s is not supported" % kind)

    def _check_pre(self, spec):
        if not spec:
            return
        kind = spec["type"]
        if kind == "Sequence":
            for s in spec["pretokenizers"]:
                self._check_pre(s)
        elif kind == "Split":
            if "Regex" in spec["pattern"]:
                try:
                    import regex  # noqa: F401
                except ImportError:
                    raise NotImplementedError("this tokenizer.json splits with a \\p{..} regex: install the `regex` or "
                                              "`tokenizers` package")
            if spec.get("behavior", "Isolated") != "Isolated" or spec.get("invert"):
                raise NotImplementedError("Split behavior %s" % spec.get("behavior"))
        elif kind == "ByteLevel":
            if spec.get("add_prefix_space") or spec.get("use_regex", True):
                # use_regex=True means GPT-2's own split
                if spec.get("use_regex", True):
                    try:
                        import regex  # noqa: F401
                    except ImportError:
                        raise NotImplementedError("ByteLevel(use_regex=true) needs the `regex` package")
        else:
            raise NotImplementedError("pre-tokenizer %s is not supported" % kind)

    def _pre(self, pieces, spec):
        if not spec:
            return pieces
        kind = spec["type"]
        if kind == "Sequence":
            for s in spec["pretokenizers"]:
                pieces = self._pre(pieces, s)
            return pieces
        if kind == "Split":
            import regex
            pat = spec["pattern"]
            rx = regex.compile(pat["Regex"]) if "Regex" in pat else regex.compile(regex.escape(pat["String"]))
            out = []
            for p in pieces:
                last = 0
                for m in rx.finditer(p):
                    if m.start() > last:
                        out.append(p[last:m.start()])
                    if m.end() > m.start():
                        out.append(m.group(0))
                    last = m.end()
                if last < len(p):
                    out.append(p[last:])
            return out
        if kind == "ByteLevel":
            if spec.get("use_regex", True):
                import regex
                rx = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
                pieces = [m.group(0) for p in pieces for m in rx.finditer(p)]
            if spec.get("add_prefix_space") and pieces and not pieces[0].startswith(" "):
                pieces[0] = " " + pieces[0]
            return ["".join(self._byte_map[b] for b in p.encode("utf-8")) for p in pieces]
        raise NotImplementedError(kind)

    # ---- BPE ----------------------------------------------------------------------------

    def _initial_symbols(self, word):
        ids = []
        unk_id = self.vocab.get(self.unk) if self.unk is not None else None
        for ch in word:
            if ch in self.vocab:
                ids.append(self.vocab[ch])
                continue
            if self.byte_fallback:
                bytes_ids = ["<0x%02X>" % b for b in ch.encode("utf-8")]
                if all(b in self.vocab for b in bytes_ids):
                    ids.extend(self.vocab[b] for b in bytes_ids)
                    continue
            if unk_id is None:
                raise ValueError("character %r is not in the vocabulary and there is no unk token" % ch)
            if self.fuse_unk and ids and ids[-1] == unk_id:
                continue
            ids.append(unk_id)
        return ids

    def _bpe(self, word):
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        sym = self._initial_symbols(word)
        n = len(sym)
        if n < 2:
            return sym
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            m = self.merges.get((sym[i], sym[i + 1]))
            if m is not None:
                heap.append((m[0], i, sym[i], sym[i + 1]))
        heapq.heapify(heap)
        while heap:
            rank, i, a, b = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j < 0 or sym[i] != a or sym[j] != b:
                continue  # stale entry
            sym[i] = self.merges[(a, b)][1]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prev[nxt[j]] = i
            p = prev[i]
            if p >= 0:
                m = self.merges.get((sym[p], sym[i]))
                if m is not None:
                    heapq.heappush(heap, (m[0], p, sym[p], sym[i]))
            if nxt[i] >= 0:
                m = self.merges.get((sym[i], sym[nxt[i]]))
                if m is not None:
                    heapq.heappush(heap, (m[0], i, sym[i], sym[nxt[i]]))
        return [s for s, ok in zip(sym, alive) if ok]

    # ---- public -------------------------------------------------------------------------

    @staticmethod
    def _split_added(text, table):
        """[(id or None, piece)]: the entries of `table` matched leftmost-longest in text."""
        if not table:
            return [(None, text)]
        ordered = sorted(table, key=len, reverse=True)
        out, i, start = [], 0, 0
        while i < len(text):
            hit = None
            for t in ordered:
                if text.startswith(t, i):
                    hit = t
                    break
            if hit is None:
                i += 1
                continue
            if i > start:
                out.append((None, text[start:i]))
            out.append((table[hit], hit))
            i += len(hit)
            start = i
        if start < len(text):
            out.append((None, text[start:]))
        return out

    def _post(self, ids, spec):
        if not spec:
            return ids
        kind = spec["type"]
        if kind == "Sequence":
            for s in spec["processors"]:
                ids = self._post(ids, s)
            return ids
        if kind == "ByteLevel":
            return ids
        if kind == "TemplateProcessing":
            out = []
            for item in spec["single"]:
                if "SpecialToken" in item:
                    name = item["SpecialToken"]["id"]
                    out.extend(spec["special_tokens"][name]["ids"])
                else:
                    out.extend(ids)
            return out
        raise NotImplementedError("post-processor %s is not supported" % kind)

    def encode(self, text, add_special_tokens=False):
        ids = []
        for raw_id, piece in self._split_added(text, self.raw_added):
            if raw_id is not None:
                ids.append(raw_id)
                continue
            for norm_id, normalized in self._split_added(self._normalize(piece), self.norm_added):
                if norm_id is not None:
                    ids.append(norm_id)
                    continue
                for word in self._pre([normalized], self.pre_tokenizer):
                    if word:
                        ids.extend(self._bpe(word))
        if add_special_tokens:
            ids = self._post(ids, self.post_processor)
        return ids
