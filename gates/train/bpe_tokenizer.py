"""Byte-level BPE tokenizer for kvgate-tiny: trainer, encoder and tokenizer.json writer.

Pure Python (no HF `tokenizers`), so it runs on the CPU test machine. The file it
writes is a Hugging Face tokenizer.json of the Llama-3 shape, which both HF tokenizers
and the kvgate C++ tokenizer (engine/tokenizer*.cc) load:

  pre_tokenizer  Sequence[Split(Llama-3 regex, Isolated), ByteLevel(use_regex=false)]
  model          BPE, ignore_merges=true (a pre-token found whole in the vocab is one token)
  post_processor TemplateProcessing: <|bos|> $A
  decoder        ByteLevel

The Llama-3 regex splits numbers into groups of up to three digits. The trainer puts
every 1-, 2- and 3-digit group in the vocab first, so a 7-digit value such as 5821934 is
always the three tokens 582 193 4: short, and distinct enough for copying by induction.

`pretokenize` is a hand-written scanner with the regex's exact semantics (Python's `re`
has no \\p{L}); `Tokenizer.encode` must give the same ids as HF and the C++ tokenizer.
"""

from __future__ import annotations

import collections
import heapq
import json
import re
import unicodedata
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2

# Unicode White_Space (what PCRE2/Oniguruma \s means with Unicode properties).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")


def _is_letter(c: str) -> bool:
    return unicodedata.category(c)[0] == "L"


def _is_number(c: str) -> bool:
    return unicodedata.category(c)[0] == "N"


def _is_space(c: str) -> bool:
    return c in _WHITESPACE


def _is_other(c: str) -> bool:  # [^\s\p{L}\p{N}]
    return not (_is_space(c) or _is_letter(c) or _is_number(c))


def _match_at(s: str, i: int) -> int:
    """End of the LLAMA3_PATTERN match starting at s[i] (leftmost-first alternation)."""
    n = len(s)
    c = s[i]
    # 1. (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c == "'":
        for suffix in _CONTRACTIONS:
            if s[i + 1:i + 1 + len(suffix)].lower() == suffix:
                return i + 1 + len(suffix)
    # 2. [^\r\n\p{L}\p{N}]?\p{L}+
    j = i
    if c not in "\r\n" and not _is_letter(c) and not _is_number(c) and i + 1 < n and _is_letter(s[i + 1]):
        j = i + 1
    if _is_letter(s[j]):
        j += 1
        while j < n and _is_letter(s[j]):
            j += 1
        return j
    # 3. \p{N}{1,3}
    if _is_number(c):
        j = i + 1
        while j < n and j < i + 3 and _is_number(s[j]):
            j += 1
        return j
    # 4. ' ?[^\s\p{L}\p{N}]+[\r\n]*'
    j = i + 1 if (c == " " and i + 1 < n and _is_other(s[i + 1])) else i
    if j < n and _is_other(s[j]):
        j += 1
        while j < n and _is_other(s[j]):
            j += 1
        while j < n and s[j] in "\r\n":
            j += 1
        return j
    # 5..7 start with whitespace.
    if not _is_space(c):
        raise AssertionError("unreachable: every char is letter, number, space or other")
    end = i
    while end < n and _is_space(s[end]):
        end += 1
    # 5. \s*[\r\n]+ : up to and including the last newline of the whitespace run.
    last_nl = max(s.rfind("\r", i, end), s.rfind("\n", i, end))
    if last_nl >= 0:
        return last_nl + 1
    # 6. \s+(?!\S)
    if end == n:
        return end
    if end - i >= 2:
        return end - 1
    # 7. \s+
    return end


# The same pattern for ASCII text, where \p{L} = [A-Za-z], \p{N} = [0-9] and \s = the six
# ASCII white-space chars; Python's `re` runs it much faster than the scanner.
_WS = "\\t\\n\\x0b\\x0c\\r "
_ASCII_RE = re.compile(
    r"'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}|"
    r" ?[^" + _WS + r"A-Za-z0-9]+[\r\n]*|[" + _WS + r"]*[\r\n]+|[" + _WS + r"]+(?![^" + _WS + r"])|"
    r"[" + _WS + r"]+")
_ASCII_OK = re.compile(r"[\t\n\x0b\x0c\r\x20-\x7e]*")


def pretokenize(text: str) -> List[str]:
    """Splits text the way the Llama-3 Split pre-tokenizer (behavior Isolated) does."""
    if text.isascii() and _ASCII_OK.fullmatch(text):
        return _ASCII_RE.findall(text)
    return pretokenize_slow(text)


def pretokenize_slow(text: str) -> List[str]:
    """pretokenize for any text: a scanner with the regex's exact semantics."""
    out = []
    i = 0
    n = len(text)
    while i < n:
        j = _match_at(text, i)
        out.append(text[i:j])
        i = j
    return out


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable char table (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = list(bs)
    k = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + k)
            k += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


_BYTE_TABLE = {b: BYTE_TO_CHAR[b] for b in range(256)}


def byte_level(piece: str) -> str:
    """UTF-8 bytes of piece as GPT-2's printable chars (via latin-1: one char per byte)."""
    return piece.encode("utf-8").decode("latin-1").translate(_BYTE_TABLE)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2
              ) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Learns a byte-level BPE vocab of `vocab_size` ids (specials and digits included).

    Ids: 0..2 the special tokens, 3..258 the 256 byte chars (in byte order), then the
    100 two-digit and 1000 three-digit groups, then learned merges in order. Merges that
    create digit groups come first, as "d d" and "dd d". Ties between equally frequent
    pairs go to the smaller pair of strings, so training is deterministic.
    """
    vocab: Dict[str, int] = {}
    for t in SPECIAL_TOKENS:
        vocab[t] = len(vocab)
    for b in range(256):
        vocab[BYTE_TO_CHAR[b]] = len(vocab)
    merges: List[Tuple[str, str]] = []
    for a in "0123456789":
        for b in "0123456789":
            merges.append((a, b))
            vocab[a + b] = len(vocab)
    for ab in (a + b for a in "0123456789" for b in "0123456789"):
        for c in "0123456789":
            merges.append((ab, c))
            vocab[ab + c] = len(vocab)
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(vocab)} fixed tokens")

    # Word frequencies over byte-level pre-tokens; digit groups are already whole tokens.
    word_freq: collections.Counter = collections.Counter()
    for text in texts:
        for piece in pretokenize(text):
            word_freq[byte_level(piece)] += 1
    words: List[List[str]] = []
    freqs: List[int] = []
    for w, f in word_freq.items():
        if w in vocab or len(w) < 2:
            continue
        words.append(list(w))
        freqs.append(f)

    pair_count: Dict[Tuple[str, str], int] = collections.defaultdict(int)
    pair_where: Dict[Tuple[str, str], set] = collections.defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_count[p] += f
            pair_where[p].add(wi)

    # Max-heap of (count, pair) with lazy deletion: an entry is live while its count is current.
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg:
            continue
        if -neg < min_frequency:
            break
        a, b = pair
        merged = a + b
        merges.append(pair)
        if merged not in vocab:
            vocab[merged] = len(vocab)
        touched = set()
        for wi in sorted(pair_where.pop(pair, ())):
            w = words[wi]
            f = freqs[wi]
            for p in zip(w, w[1:]):  # retract the word's old pairs
                pair_count[p] -= f
                touched.add(p)
            new_w = []
            k = 0
            while k < len(w):
                if k + 1 < len(w) and w[k] == a and w[k + 1] == b:
                    new_w.append(merged)
                    k += 2
                else:
                    new_w.append(w[k])
                    k += 1
            words[wi] = new_w
            for p in zip(new_w, new_w[1:]):
                pair_count[p] += f
                pair_where[p].add(wi)
                touched.add(p)
        pair_count.pop(pair, None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c <= 0:
                pair_count.pop(p, None)
            elif p != pair:
                heapq.heappush(heap, (-c, p))
    return vocab, merges


class Tokenizer:
    """Encoder/decoder with the semantics of the tokenizer.json this module writes."""

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]],
                 added: Optional[Dict[str, int]] = None):
        """added: special tokens -> id (default: <|pad|>, <|bos|>, <|eos|> of the vocab)."""
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        if added is None:
            added = {t: self.vocab[t] for t in SPECIAL_TOKENS}
        self.added = dict(added)
        self.id_to_token = {i: t for t, i in self.vocab.items()}
        self.id_to_token.update({i: t for t, i in self.added.items()})
        # Later duplicates replace earlier ones (as HF's HashMap collect and the C++ do).
        self.ranks = {m: r for r, m in enumerate(self.merges)}
        self.pad_id, self.bos_id, self.eos_id = (self.added.get(t) for t in SPECIAL_TOKENS)
        # Leftmost match, longest first among tokens starting at one place.
        self._specials = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))
        self._cache: Dict[str, Tuple[int, ...]] = {}        # byte-level word -> ids
        self._piece_cache: Dict[str, Tuple[int, ...]] = {}  # raw pre-token -> ids

    @property
    def vocab_size(self) -> int:
        return max(list(self.vocab.values()) + list(self.added.values())) + 1

    def _bpe(self, word: str) -> Tuple[int, ...]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        if word in self.vocab:  # ignore_merges
            ids = (self.vocab[word],)
        else:
            syms = list(word)
            while len(syms) > 1:
                best_rank, best_k = None, -1
                for k in range(len(syms) - 1):
                    r = self.ranks.get((syms[k], syms[k + 1]))
                    if r is not None and (best_rank is None or r < best_rank):
                        best_rank, best_k = r, k
                if best_k < 0:
                    break
                syms[best_k:best_k + 2] = [syms[best_k] + syms[best_k + 1]]
            ids = tuple(self.vocab[s] for s in syms)
        if len(self._cache) < 500000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        """Ids of `text`; special-token strings in text become their ids (as HF)."""
        ids = [self.bos_id] if add_bos else []
        for chunk, special in _split_specials(text, self._specials):
            if special is not None:
                ids.append(self.added[special])
                continue
            cache = self._piece_cache
            for piece in pretokenize(chunk):
                hit = cache.get(piece)
                if hit is None:
                    hit = self._bpe(byte_level(piece))
                    if len(cache) < 500000:
                        cache[piece] = hit
                ids.extend(hit)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            t = self.id_to_token[int(i)]
            if t in self.added:
                if not skip_special:
                    out += t.encode("utf-8")
                continue
            out += bytes(CHAR_TO_BYTE[c] for c in t)
        return out.decode("utf-8", errors="replace")

    def to_hf_json(self) -> dict:
        added = [{"id": self.vocab[t], "content": t, "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True} for t in SPECIAL_TOKENS]
        bos_entry = {"id": BOS, "ids": [self.bos_id], "tokens": [BOS]}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False}]},
            "post_processor": {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": BOS, "type_id": 1}},
                                        {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {BOS: bos_entry}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": dict(sorted(self.vocab.items(), key=lambda kv: kv[1])),
                      "merges": [list(m) for m in self.merges]},
        }

    def save(self, directory: str) -> None:
        """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        import os
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf_json(), f, ensure_ascii=False, indent=None)
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS,
                       "eos_token": EOS, "pad_token": PAD, "add_bos_token": True,
                       "model_max_length": 4096, "clean_up_tokenization_spaces": False}, f, indent=2)
        with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, f, indent=2)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        """Loads a tokenizer.json written by `save` (path: the file or its folder)."""
        import os
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        model = j["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
        added = {t["content"]: t["id"] for t in j.get("added_tokens") or []}
        return cls(model["vocab"], merges, added)


def _split_specials(text: str, specials) -> List[Tuple[str, Optional[str]]]:
    """Cuts special-token strings (the compiled alternation `specials`) out of text."""
    out: List[Tuple[str, Optional[str]]] = []
    start = 0
    for m in specials.finditer(text):
        if start < m.start():
            out.append((text[start:m.start()], None))
        out.append((m.group(0), m.group(0)))
        start = m.end()
    if start < len(text):
        out.append((text[start:], None))
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    vocab, merges = train_bpe(texts, vocab_size)
    return Tokenizer(vocab, merges)
