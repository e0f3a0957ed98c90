#!/usr/bin/env python3
"""Build the tokenizer golden corpora: thousands of strings per tokenizer, encoded and decoded by HF.

For every distinct tokenizer.json under tests/golden/ and models/ (plus the TinyStories copy in
tests/golden/tokenizers/tinystories/ and the hand-made `edge_*` variants this script writes), it
builds a seeded corpus (whitespace runs, control characters, random code points from every plane,
emoji, combining marks, private-use and unassigned code points, the tokenizer's added tokens glued to
text, random vocabulary pieces, long words) and records what Hugging Face `tokenizers` answers:

    python3 tests/golden/make_tokenizer_corpus.py --repo . --out tests/golden/tokenizers

Needs only the Python `tokenizers` package (0.23.x; no network, no GPU). `--oracle node` uses the
Node.js binding (`npm install tokenizers`, `NODE_PATH` pointing at its node_modules) instead: the same
Rust core, handy for a local check, but committed corpora come from the Python package.

Output: <out>/<name>/corpus.jsonl, and <out>/<name>/tokenizer.json for the edge_* variants. The format is
described in tests/golden/README.md ("Tokenizer corpora"). The script checks its own output (every
file under MAX_FILE_BYTES, re-encoding is stable) and exits 1 with "FATAL: ..." otherwise.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile

# This script's folder holds tokenizers/, which Python would otherwise import as a namespace
# package when the real `tokenizers` is missing.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

FORMAT = "kvgate-tokenizer-corpus/1"
SEED = 20261204
MAX_FILE_BYTES = 1024 * 1024

# Corpus sizes per tokenizer (shared strings are the same for every tokenizer).
N_RANDOM_POOL = 1300   # strings drawn from weighted character pools
N_RANDOM_ANY = 300     # strings of uniformly random Unicode scalar values
N_WORDS = 300          # word-like text with punctuation and spacing
N_PIECES = 400         # concatenated vocabulary pieces (tokenizer-specific)
N_LONG = 12            # long strings (400..1200 chars)
N_DECODE = 300         # random id sequences to decode


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def fatal(msg):
    print("FATAL: " + msg, file=sys.stderr)
    sys.exit(1)


# --------------------------------------------------------------------------------------------------
# Character pools
# --------------------------------------------------------------------------------------------------

def rng_cp(r, lo, hi):
    while True:
        c = r.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


WHITESPACE = [" ", " ", " ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\u00a0", "\u2000", "\u2003",
              "\u200a", "\u3000", "\u1680", "\u0085", "\u2028", "\u2029", "\u202f", "\u205f", "\u180e"]
INVISIBLE = ["\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", "\ufe0f", "\ufe0e", "\u00ad", "\u061c",
             "\u200e", "\u200f", "\u202e", "\U000e0041", "\U000e007f"]
EMOJI = ["\U0001F600", "\U0001F44D\U0001F3FD", "\U0001F468\u200D\U0001F469\u200D\U0001F467",
         "\U0001F1EF\U0001F1F5", "1\ufe0f\u20e3", "\u2764\ufe0f", "\U0001F9D1\u200D\U0001F4BB",
         "\U0001FAE8", "\U0001FAF8", "\U0001F3F3\ufe0f\u200d\U0001F308", "\u263a", "\U0001F4A9"]
ASCII_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"

# (weight, generator) pairs: each generator returns one short piece of text.
def pool_pieces():
    return [
        (20, lambda r: r.choice("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
        (6, lambda r: r.choice("0123456789")),
        (6, lambda r: r.choice(ASCII_PUNCT)),
        (8, lambda r: r.choice(WHITESPACE)),
        (3, lambda r: r.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'LL", "n't"])),
        (3, lambda r: rng_cp(r, 0x00, 0x1F)),
        (1, lambda r: rng_cp(r, 0x7F, 0x9F)),
        (3, lambda r: rng_cp(r, 0xA0, 0xFF)),
        (3, lambda r: rng_cp(r, 0x100, 0x24F)),
        (3, lambda r: rng_cp(r, 0x300, 0x36F)),          # combining marks
        (2, lambda r: rng_cp(r, 0x370, 0x52F)),          # Greek, Cyrillic
        (2, lambda r: rng_cp(r, 0x590, 0x6FF)),          # Hebrew, Arabic
        (2, lambda r: rng_cp(r, 0x900, 0xDFF)),          # Indic
        (1, lambda r: rng_cp(r, 0xE00, 0xEFF)),          # Thai, Lao
        (1, lambda r: rng_cp(r, 0x1100, 0x11FF)),        # Hangul jamo
        (3, lambda r: rng_cp(r, 0x2000, 0x2BFF)),        # punctuation, symbols, arrows, math
        (3, lambda r: rng_cp(r, 0x3000, 0x30FF)),        # CJK punctuation, kana
        (3, lambda r: rng_cp(r, 0x4E00, 0x9FFF)),        # CJK
        (2, lambda r: rng_cp(r, 0xAC00, 0xD7A3)),        # Hangul syllables
        (1, lambda r: rng_cp(r, 0xE000, 0xF8FF)),        # private use
        (1, lambda r: rng_cp(r, 0xF900, 0xFFFF)),        # compatibility, specials, FFFE/FFFF
        (3, lambda r: rng_cp(r, 0x1F300, 0x1FAFF)),      # emoji
        (2, lambda r: r.choice(EMOJI)),
        (2, lambda r: r.choice(INVISIBLE)),
        (1, lambda r: rng_cp(r, 0x10000, 0x1FFFF)),      # SMP
        (1, lambda r: rng_cp(r, 0x20000, 0x3FFFF)),      # CJK ext, unassigned
        (1, lambda r: rng_cp(r, 0xE0000, 0x10FFFF)),     # tags, PUA planes
        (1, lambda r: r.choice(["\u0378", "\u0530", "\u08ff", "\U0001FFFE", "\U0010FFFF", "\ufffd",
                                "\u0295", "\U0001171E", "\U00031350", "\U0002EBF0", "\u1c89"])),
        (1, lambda r: r.choice(["\u2581", "\u0120", "\u010a", "<0x41>", "<0xE2>", "\u00c4", "\u0121"])),
    ]


def weighted_picker(pieces):
    total = sum(w for w, _ in pieces)
    cum = []
    acc = 0
    for w, g in pieces:
        acc += w
        cum.append((acc, g))

    def pick(r):
        x = r.random() * total
        for c, g in cum:
            if x < c:
                return g(r)
        return cum[-1][1](r)
    return pick


def rand_len(r):
    x = r.random()
    if x < 0.5:
        return r.randint(1, 8)
    if x < 0.85:
        return r.randint(9, 30)
    return r.randint(31, 90)


WORDS = ("the of and to in is was that for it with as his on be at by had are but from or have an they "
         "which one you were her all she there would their we him been has when who will more no if out so "
         "said what up its about into than them can only other new some could time these two may then do "
         "first any my now such like our over man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between both life being "
         "under never day same another know while last might us great old year off come since against go "
         "came right used take three Hello WORLD Python JSON kvgate GPU tokenizer naïve café résumé Zürich "
         "İstanbul ǅungla ﬁne straße ΣΊΣΥΦΟΣ Ελλάδα москва 東京 北京市 서울 हिन्दी عربى עברית").split()


def word_text(r):
    out = []
    for _ in range(r.randint(1, 14)):
        w = r.choice(WORDS)
        x = r.random()
        if x < 0.1:
            w = w.upper()
        elif x < 0.2:
            w = w.capitalize()
        elif x < 0.25:
            w = w + r.choice(["'s", "'t", "'re", "'ll", "'D", "n't"])
        elif x < 0.32:
            w = str(r.randint(0, 10 ** r.randint(1, 9)))
        elif x < 0.36:
            w = "%d.%d" % (r.randint(0, 999), r.randint(0, 99))
        out.append(w)
        out.append(r.choice([" ", " ", " ", " ", "  ", "\t", "\n", ", ", ". ", "! ", "? ", ": ", "; ",
                             " - ", "...", "\n\n", "\r\n", " (", ") ", "\"", "'", "   ", " \t", "/"]))
    s = "".join(out)
    if r.random() < 0.5:
        s = s.rstrip(" ")
    return s


def fixed_cases():
    """Hand-written edge cases shared by every tokenizer."""
    cases = ["", " ", "  ", "   ", " " * 17, "\t", "\t\t", "\t\t\t\t", " \t ", "\t \t", "\n", "\n\n",
             "\n\n\n\n\n", "\r", "\r\n", "\r\n\r\n", "\n\r", " \n", "\n ", " \n ", "\t\n", "\n\t",
             "a", "a ", " a", "  a", "a  ", "a b", "a  b", "a   b", "a\tb", "a\t\tb", "a \tb", "a\t b",
             "a\nb", "a\n\nb", "a\r\nb", "a \n b", "a\u00a0b", "a\u3000b", "a\u2003b", "a\x0bb", "a\x0cb",
             "\x00", "a\x00b", "\x00\x00\x00", "\x01\x02\x03", "\x1b[31mred\x1b[0m", "\x7f", "\x85",
             "\u200b", "a\u200bb", "\u200d", "\ufeffhello", "hello\ufeff", "\u2028", "\u2029",
             "e\u0301", "\u00e9", "e\u0301\u0301\u0301", "\u0301", " \u0301", "a\u0308o\u0308u\u0308",
             "\u1100\u1161\u11a8", "\uac01", "\ufb01", "\u2126", "\u212b", "\u1e9b\u0323", "\u0130",
             "\u03a3\u0391\u03a3", "\u00df", "\u1e9e", "\u01c5", "\u2160\u2161", "\u00bd", "\u2460",
             "\uff21\uff22\uff23", "\uff11\uff12", "\u3000\u3000",
             "Hello world", "Hello  world", " Hello world", "Hello world ", "Hello\tworld", "HELLO WORLD",
             "hello,world", "hello, world!", "Hello, World!!!", "???", "!!!", "...", "--", "---", "—",
             "don't", "DON'T", "I'm", "I'M", "we'll", "they've", "she'd", "it's", "IT'S", "'s", "'S",
             "''s", "s'", "'", "''", "'''", "' s", "o'clock", "rock 'n' roll",
             "1", "12", "123", "1234", "12345", "123456789012", "3.14159", "1,000,000", "-42", "+7",
             "0x1F", "1e-9", "2026-12-04", "12:34:56", "$100", "100%", "#1", "v1.2.3", "٣٤٥", "५६",
             "𝟏𝟐𝟑", "①②", "¹²³",
             "!@#$%^&*()", "<<>>", "<>", "</>", "{}", "[]", "()", "\\", "\\n", "\\\\", "//", "/* */",
             "a.b.c", "a-b_c", "__init__", "foo_bar_baz", "x+=1;", "if(x){y}", "<div>", "&amp;",
             "€", "£¥₹", "∑∫√∞≠≤≥", "→←↑↓", "©®™", "°C", "µs", "½", "§¶", "•", "…", "‰", "“quoted”",
             "‘single’", "«guillemets»", "„low“", "¿Qué?", "¡Hola!",
             "日本語", "中文字符", "한국어", "ไทย", "العربية", "עברית", "हिन्दी", "русский", "Ελληνικά",
             "Ⅻ", "ﷺ", "﷽", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𓀀", "🀄", "🂡",
             "😀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "🇺🇸🇬🇧", "1️⃣", "❤️", "🏳️‍🌈", "🧑‍💻", "🫨", "🫸", "😀😀😀",
             "a😀b", " 😀 ", "\U0010FFFF", "\U000E0001", "\U000F0000", "\ue000", "\uffff", "\ufffe",
             "\U0001FFFF", "\u0378", "\ufffd", "\ufffd\ufffd",
             "\u2581", "\u2581\u2581", " \u2581", "\u2581a", "a\u2581b", "\u0120", "\u0120a", "\u010a",
             "<0x41>", "<0x00>", "<0xFF>", "<0xZZ>", "<0x4>", "<unk>", "<s>", "</s>", "<pad>", "<mask>",
             "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
             "<|eot_id|>", "<|bos|>", "<|eos|>", "<|pad|>", "<|start_story|>", "<|end_story|>",
             "[CLS]", "[SEP]", "<|", "|>", "<|>", "<||>",
             "a" * 300, "ab" * 150, "abc " * 60, " " * 120, "\n" * 60, "\t" * 40, "9" * 100,
             "!" * 80, "😀" * 40, "é" * 80, "\u2581" * 30, "x" * 2 + " " * 50 + "y",
             "The quick brown fox jumps over the lazy dog.",
             "Once upon a time, there was a little girl named Lily. She loved to play outside.",
             "def f(x):\n    return x * 2\n\n\nprint(f(21))\n",
             "    indented\n\tand tabbed\n  \n",
             "line1\r\nline2\r\n\r\nline3",
             "https://example.com/path?q=1&r=two#frag",
             "user@example.com", "C:\\Users\\name\\file.txt", "{\"key\": [1, 2, 3]}",
             "Mixed 日本語 and English 123 😀!",
             "Zalgo: Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034da",
             ]
    # Unicode version edges: case pairs newer than utf8proc's tables, combining marks,
    # compositions and compatibility decompositions newer than Unicode 9 (HF's NFC/NFKC tables).
    cases += ["\u1c89", "\ua7cb", "\ua7cc", "\ua7ce", "\ua7d2", "\ua7d4", "\ua7da", "\ua7dc",
              "\U00010d50", "\U00010d65", "\U00016ea0", "\U00016eb8", "\u0130", "\u03a3a\u03a3",
              "\u0318\u0eba", "a\u0eba\u0301", "\u0301\u0eba\u0318", "\U00011935\U00011930",
              "\U000113c2\U000113c2", "\U00016d67\U00016d67", "\U00016121\U0001611e",
              "\u0915\u093c", "\u0958", "\ua7f2", "\U00010781", "\U0001e030", "\U0001ccf0",
              "\u1e0b\u0323", "\u0071\u0307\u0323", "\ufb2c", "\u2adc", "\U0001d15e"]
    # Every control character alone, between letters and after a space.
    for c in list(range(0x00, 0x20)) + [0x7F, 0x80, 0x9F, 0xA0, 0xAD]:
        ch = chr(c)
        cases += [ch, "x" + ch + "y", " " + ch, ch + " "]
    # Whitespace runs of each kind, alone and between words.
    for w in WHITESPACE + INVISIBLE:
        cases += [w * 3, "word" + w + "word", w + "lead", "trail" + w, " " + w + " "]
    return cases


# --------------------------------------------------------------------------------------------------
# Tokenizer discovery and the edge_* variants
# --------------------------------------------------------------------------------------------------

def find_tokenizers(repo):
    """Distinct tokenizer.json files under tests/golden and models, named after their first path."""
    found = []
    for top in ("tests/golden", "models"):
        for root, dirs, files in os.walk(os.path.join(repo, top)):
            dirs.sort()
            if "tokenizer.json" in files:
                found.append(os.path.relpath(os.path.join(root, "tokenizer.json"), repo))
    groups = {}
    for rel in found:
        with open(os.path.join(repo, rel), "rb") as f:
            h = fnv1a64(f.read())
        groups.setdefault(h, []).append(rel)
    out = []
    for h, paths in groups.items():
        # Prefer the copy in tests/golden/tokenizers/<name>/.
        paths.sort(key=lambda p: (not p.startswith("tests/golden/tokenizers/"), p))
        first = paths[0]
        parts = first.split("/")
        if first.startswith("tests/golden/tokenizers/"):
            name = parts[3]
        else:
            name = parts[-2].replace("-", "_")
        if name.startswith("edge_"):
            continue  # rebuilt below
        out.append({"name": name, "path": first, "paths": paths, "fnv1a64": h})
    out.sort(key=lambda t: t["name"])
    return out


def byte_token(b):
    return "<0x%02X>" % b


def make_variants(repo):
    """Hand-made tokenizer.json variants covering paths no checked-in tokenizer takes."""
    def load(name):
        with open(os.path.join(repo, "tests/golden/tokenizers", name, "tokenizer.json"), encoding="utf-8") as f:
            return json.load(f)

    variants = {}

    # 1. SentencePiece-style BPE without byte fallback: unknown chars become <unk>, fused.
    d = load("sentencepiece_bytefallback")
    d["model"]["byte_fallback"] = False
    d["model"]["fuse_unk"] = True
    variants["edge_unk_fused"] = d

    # 2. The same, unfused: one <unk> per unknown char.
    d = load("sentencepiece_bytefallback")
    d["model"]["byte_fallback"] = False
    d["model"]["fuse_unk"] = False
    variants["edge_unk_unfused"] = d

    # 3. Byte fallback with some byte tokens missing (holes in the id space): a char one of whose
    #    bytes has no <0xXX> token becomes <unk>.
    d = load("sentencepiece_bytefallback")
    for b in (0x80, 0x81, 0x9F, 0xA4, 0xC3, 0xE2, 0xF0):
        del d["model"]["vocab"][byte_token(b)]
    d["model"]["fuse_unk"] = True
    variants["edge_missing_bytes"] = d

    # 4. Added tokens with every flag, on the NFC byte-level tokenizer: lstrip/rstrip/single_word,
    #    normalized and not, special and not, one that is also a model token.
    d = load("qwen2_bytelevel")
    vocab = d["model"]["vocab"]
    next_id = max(max(vocab.values()), max(t["id"] for t in d["added_tokens"])) + 1
    in_vocab = sorted((t for t in vocab if len(t) >= 3 and t.isalpha()), key=lambda t: vocab[t])[0]

    def add(content, special, normalized, lstrip=False, rstrip=False, single_word=False, tid=None):
        nonlocal next_id
        if tid is None:
            tid = next_id
            next_id += 1
        d["added_tokens"].append({"id": tid, "content": content, "single_word": single_word,
                                  "lstrip": lstrip, "rstrip": rstrip, "normalized": normalized,
                                  "special": special})

    add("<mask>", True, False, lstrip=True)
    add("[SEP]", True, False, rstrip=True)
    add("<tool>", True, False, lstrip=True, rstrip=True)
    add("word", False, True, single_word=True)
    add("caf\u00e9", False, True)                 # NFC form: "cafe\u0301" normalizes into it
    add("\t\t", False, False)
    add("\U0001F600", False, False)
    add("ab", False, False, single_word=True)
    add("<|im_start|>user", True, False)          # overlaps the <|im_start|> special token
    add(in_vocab, False, True, tid=vocab[in_vocab])
    variants["edge_added_flags"] = d

    # 5. Metaspace pre-tokenizer (prepend_scheme "first", split) after NFKC + Lowercase, with a
    #    Metaspace decoder: the Llama/T5 sentencepiece layout in pre-tokenizer form.
    d = load("sentencepiece_bytefallback")
    d["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}
    d["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                          "split": True}
    d["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"},
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": True}]}
    next_id = max(d["model"]["vocab"].values()) + 1
    d["added_tokens"].append({"id": next_id, "content": "<sep>", "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": True, "special": True})
    variants["edge_metaspace_nfkc_lower"] = d

    # 6. GPT-2/RoBERTa layout: ByteLevel pre-tokenizer with its own regex and a prefix space,
    #    Strip + regex Replace normalizers, RobertaProcessing (<cls> $A <sep>).
    d = load("llama3_bytelevel")
    d["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Strip", "strip_left": False, "strip_right": True},
        {"type": "Replace", "pattern": {"Regex": "[0-9]{4,}"}, "content": "####"}]}
    d["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                          "use_regex": True}
    d["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|end_of_text|>", 510],
                           "cls": ["<|begin_of_text|>", 509], "trim_offsets": True, "add_prefix_space": True}
    d["model"]["ignore_merges"] = False
    variants["edge_gpt2_bytelevel"] = d

    # 7. Metaspace that always prepends and does not split, with a Strip normalizer in front and
    #    a normalized added token; decoder Metaspace after ByteFallback and Fuse.
    d = load("sentencepiece_bytefallback")
    d["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": False}
    d["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always",
                          "split": False}
    d["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": False}]}
    next_id = max(d["model"]["vocab"].values()) + 1
    d["added_tokens"].append({"id": next_id, "content": " <sep>", "single_word": False, "lstrip": False,
                              "rstrip": True, "normalized": True, "special": False})
    variants["edge_metaspace_always"] = d
    return variants


# --------------------------------------------------------------------------------------------------
# Per-tokenizer corpus
# --------------------------------------------------------------------------------------------------

BYTES_TO_UNICODE = None


def byte_decoder():
    global BYTES_TO_UNICODE
    if BYTES_TO_UNICODE is None:
        bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        BYTES_TO_UNICODE = {chr(c): b for b, c in zip(bs, cs)}
    return BYTES_TO_UNICODE


def surface(tok_json, token):
    """Text that tends to produce `token` again."""
    pre = json.dumps(tok_json.get("pre_tokenizer"))
    if "ByteLevel" in pre:
        table = byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token).decode("utf-8", errors="replace")
        return token
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        b = int(token[3:5], 16)
        return chr(b) if b < 0x80 else ""
    return token.replace("\u2581", " ")


def added_contents(tok_json):
    return [t["content"] for t in tok_json.get("added_tokens") or []]


def build_corpus(tok_json, name, seed=SEED, scale=1):
    shared = random.Random(seed)
    own = random.Random("%d/%s" % (seed, name))
    pick = weighted_picker(pool_pieces())
    texts = list(fixed_cases())
    for _ in range(N_RANDOM_POOL * scale):
        texts.append("".join(pick(shared) for _ in range(rand_len(shared))))
    for _ in range(N_RANDOM_ANY * scale):
        texts.append("".join(rng_cp(shared, 0, 0x10FFFF) for _ in range(shared.randint(1, 12))))
    for _ in range(N_WORDS * scale):
        texts.append(word_text(shared))
    for _ in range(N_LONG * scale):
        n = shared.randint(400, 1200)
        if shared.random() < 0.5:
            texts.append("".join(pick(shared) for _ in range(n)))
        else:
            s = ""
            while len(s) < n:
                s += word_text(shared) + shared.choice([" ", "\n", "\n\n", ". "])
            texts.append(s)

    # Tokenizer-specific: its added tokens glued to text on both sides.
    contents = added_contents(tok_json)
    glue = ["", " ", "  ", "\t", "\n", "x", "word", "\u00e9", "\U0001F600", "'s", "1", ".", "\u2581",
            "\u3000", "\u00a0", " \n "]
    for t in contents:
        texts += [t, t + t, t + " " + t, t[:-1], t[1:], t + t[:-1], t[:2] + t]
        for a in glue:
            for b in ("", " ", "x", "\n"):
                texts.append(a + t + b)
        for _ in range(6):
            left = "".join(pick(own) for _ in range(own.randint(0, 6)))
            right = "".join(pick(own) for _ in range(own.randint(0, 6)))
            texts.append(left + t + right)
    if len(contents) >= 2:
        for _ in range(30):
            parts = []
            for _ in range(own.randint(2, 6)):
                parts.append(own.choice(contents))
                parts.append(own.choice(glue + ["", ""]))
            texts.append("".join(parts))

    # Random vocabulary pieces (what the model knows), sometimes with added tokens among them.
    vocab = sorted(tok_json["model"]["vocab"].items(), key=lambda kv: kv[1])
    for _ in range(N_PIECES * scale):
        parts = []
        for _ in range(own.randint(1, 10)):
            if contents and own.random() < 0.05:
                parts.append(own.choice(contents))
            else:
                parts.append(surface(tok_json, own.choice(vocab)[0]))
            if own.random() < 0.2:
                parts.append(own.choice([" ", "  ", "\n", "\t", "-", "'"]))
        texts.append("".join(parts))

    # De-duplicate, keeping the first occurrence (stable order).
    seen = set()
    uniq = []
    for t in texts:
        if t not in seen:
            seen.add(t)
            uniq.append(t)

    # Random id sequences for decode, over every id (added tokens and byte tokens included).
    max_id = max(max(v for _, v in vocab), max([t["id"] for t in tok_json.get("added_tokens") or []] + [0]))
    special_ids = [t["id"] for t in tok_json.get("added_tokens") or []]
    byte_ids = [v for k, v in vocab if len(k) == 6 and k.startswith("<0x")]
    decode_ids = []
    for _ in range(N_DECODE * scale):
        seq = []
        for _ in range(own.randint(1, 24)):
            x = own.random()
            if x < 0.15 and special_ids:
                seq.append(own.choice(special_ids))
            elif x < 0.45 and byte_ids:
                seq.append(own.choice(byte_ids))
            else:
                seq.append(own.randint(0, max_id))
        decode_ids.append(seq)
    return uniq, decode_ids


# --------------------------------------------------------------------------------------------------
# Oracles: HF tokenizers from Python, or the Node.js binding of the same Rust core
# --------------------------------------------------------------------------------------------------

class PythonOracle:
    def __init__(self):
        try:
            import tokenizers
        except ImportError:
            fatal("the Python package `tokenizers` is not installed (or use --oracle node)")
        self.tokenizers = tokenizers
        self.version = tokenizers.__version__
        self.label = "python tokenizers " + self.version

    def run(self, tok_text, texts, decode_ids):
        tok = self.tokenizers.Tokenizer.from_str(tok_text)
        with_sp = [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
        plain = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        for i in range(0, len(texts), 97):  # encode_batch must equal encode
            assert tok.encode(texts[i], add_special_tokens=True).ids == with_sp[i]
        seqs = with_sp + decode_ids
        dec = tok.decode_batch(seqs, skip_special_tokens=False)
        dec_skip = tok.decode_batch(seqs, skip_special_tokens=True)
        reloaded = self.tokenizers.Tokenizer.from_str(tok.to_str())
        for i in range(0, len(texts), 13):
            if reloaded.encode(texts[i]).ids != with_sp[i]:
                fatal("tokenizer reloaded from to_str() encodes %r differently" % texts[i])
        return with_sp, plain, dec, dec_skip


NODE_SCRIPT = r"""
const {Tokenizer} = require('tokenizers');
const fs = require('fs');
(async () => {
  const req = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const tok = Tokenizer.fromString(req.tokenizer);
  const sp = await tok.encodeBatch(req.texts, {addSpecialTokens: true});
  const pl = await tok.encodeBatch(req.texts, {addSpecialTokens: false});
  const withSp = sp.map(e => Array.from(e.getIds()));
  const plain = pl.map(e => Array.from(e.getIds()));
  const seqs = withSp.concat(req.decode);
  const dec = await tok.decodeBatch(seqs, false);
  const decSkip = await tok.decodeBatch(seqs, true);
  fs.writeFileSync(process.argv[3], JSON.stringify({withSp, plain, dec, decSkip}));
})().catch(e => { console.error(e); process.exit(1); });
"""


class NodeOracle:
    def __init__(self):
        out = subprocess.run(["node", "-e", "console.log(require('tokenizers/package.json').version)"],
                             capture_output=True, text=True)
        if out.returncode != 0:
            fatal("node tokenizers binding not found (set NODE_PATH): " + out.stderr)
        self.version = out.stdout.strip()
        self.label = "node tokenizers " + self.version

    def run(self, tok_text, texts, decode_ids):
        with tempfile.TemporaryDirectory() as tmp:
            req = os.path.join(tmp, "req.json")
            resp = os.path.join(tmp, "resp.json")
            script = os.path.join(tmp, "oracle.js")
            with open(script, "w") as f:
                f.write(NODE_SCRIPT)
            with open(req, "w", encoding="utf-8") as f:
                json.dump({"tokenizer": tok_text, "texts": texts, "decode": decode_ids}, f, ensure_ascii=False)
            subprocess.run(["node", script, req, resp], check=True)
            with open(resp, encoding="utf-8") as f:
                r = json.load(f)
        return r["withSp"], r["plain"], r["dec"], r["decSkip"]


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def write_corpus(path, header, texts, decode_ids, with_sp, plain, dec, dec_skip, max_bytes):
    """JSON lines: a header, then encode cases, then decode cases (format in README.md)."""
    # The post-processor's fixed prefix/suffix: the empty string's encoding is prefix + suffix,
    # and the first non-empty encoding shows where the sequence goes between them.
    prefix, suffix = [], []
    empty = next((w for w, p in zip(with_sp, plain) if not p), None)
    if empty is not None:
        prefix = empty
        for w, p in zip(with_sp, plain):
            if p:
                for k in range(len(empty) + 1):
                    if w == empty[:k] + p + empty[k:]:
                        prefix, suffix = empty[:k], empty[k:]
                        break
                break
    header = dict(header, special_prefix=prefix, special_suffix=suffix,
                  num_encode=len(texts), num_decode=len(decode_ids))
    lines = [json.dumps(header, ensure_ascii=False, separators=(",", ":"))]
    n = len(texts)
    for i, t in enumerate(texts):
        rec = {"t": t, "n": plain[i]}
        if with_sp[i] != prefix + plain[i] + suffix:
            rec["s"] = with_sp[i]
        rec["d"] = dec[i]
        if dec_skip[i] != dec[i]:
            rec["k"] = dec_skip[i]
        lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
    for j, ids in enumerate(decode_ids):
        rec = {"i": ids, "d": dec[n + j]}
        if dec_skip[n + j] != dec[n + j]:
            rec["k"] = dec_skip[n + j]
        lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if max_bytes and len(data) > max_bytes:
        fatal("%s would be %d bytes (limit %d): lower the corpus sizes" % (path, len(data), max_bytes))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=".", help="repository root (default: .)")
    ap.add_argument("--out", required=True, help="output directory (tests/golden/tokenizers)")
    ap.add_argument("--oracle", choices=["python", "node"], default="python")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these corpora")
    ap.add_argument("--seed", type=int, default=SEED,
                    help="corpus seed; committed corpora use the default (other seeds: local stress runs)")
    ap.add_argument("--scale", type=int, default=1,
                    help="multiply the random parts; above 1 lifts the %d-byte file limit (stress runs only)"
                    % MAX_FILE_BYTES)
    args = ap.parse_args(argv)

    oracle = PythonOracle() if args.oracle == "python" else NodeOracle()
    targets = find_tokenizers(args.repo)
    variants = make_variants(args.repo)
    jobs = []
    for t in targets:
        with open(os.path.join(args.repo, t["path"]), encoding="utf-8") as f:
            text = f.read()
        jobs.append((t["name"], t["path"], t["paths"], text))
    for name, d in sorted(variants.items()):
        text = json.dumps(d, ensure_ascii=False, indent=2) + "\n"
        rel = "tests/golden/tokenizers/%s/tokenizer.json" % name
        path = os.path.join(args.out, name, "tokenizer.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        jobs.append((name, rel, [rel], text))

    total = 0
    for name, rel, paths, text in jobs:
        if args.only and name not in args.only:
            continue
        tok_json = json.loads(text)
        texts, decode_ids = build_corpus(tok_json, name, args.seed, args.scale)
        with_sp, plain, dec, dec_skip = oracle.run(text, texts, decode_ids)
        header = {"format": FORMAT, "name": name, "tokenizer": rel, "also": paths[1:],
                  "tokenizer_fnv1a64": fnv1a64(text.encode("utf-8")),
                  "oracle": oracle.label, "tokenizers_version": oracle.version,
                  "python_version": sys.version.split()[0], "seed": args.seed}
        size = write_corpus(os.path.join(args.out, name, "corpus.jsonl"), header, texts, decode_ids,
                            with_sp, plain, dec, dec_skip, MAX_FILE_BYTES if args.scale == 1 else 0)
        total += size
        n_ids = sum(len(x) for x in plain)
        print("%-28s %5d texts %5d decodes %7d ids %8d bytes  (%s)" %
              (name, len(texts), len(decode_ids), n_ids, size, rel))
    print("total %d bytes, %s" % (total, oracle.label))


if __name__ == "__main__":
    main()
