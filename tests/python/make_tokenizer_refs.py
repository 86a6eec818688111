"""make_tokenizer_refs.py - builds the tokenizer_variants fixtures and their reference outputs.

    /usr/bin/python3 tests/python/make_tokenizer_refs.py variants   # here: writes *.json variants
    python3 tests/python/make_tokenizer_refs.py refs                # where `tokenizers` is
                                                                    # installed: writes expected.json

The variants reuse the vocab and merges of tests/fixtures/tokenizer_bpe (a real byte-level BPE
trained by tokenizers) under other pipelines: Qwen2-style (NFC + Split + ByteLevel without regex),
LLaMA-3-style (Split + template post-processor, ignore_merges, legacy "a b" merges), added-token
flags (lstrip / rstrip / single_word / normalized), every Split behavior, byte fallback, and unk
handling. `refs` encodes a fixed list of texts plus seeded random ones with the `tokenizers`
library and stores ids and decoded strings: tests/python/test_tokenizer.py checks qfuse against
them. Nothing here is computed by qfuse.
"""
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
BASE = os.path.join(FIX, "tokenizer_bpe", "tokenizer.json")
OUT = os.path.join(FIX, "tokenizer_variants")

QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def added(id, content, special, lstrip=False, rstrip=False, single_word=False, normalized=None):
    return {"id": id, "content": content, "single_word": single_word, "lstrip": lstrip,
            "rstrip": rstrip, "normalized": (not special) if normalized is None else normalized,
            "special": special}


def bytelevel(prefix=False, regex=True):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}


def split(pattern, behavior, kind="Regex", invert=False):
    return {"type": "Split", "pattern": {kind: pattern}, "behavior": behavior, "invert": invert}


def variants():
    base = json.load(open(BASE, encoding="utf-8"))
    vocab, merges = base["model"]["vocab"], base["model"]["merges"]
    n = len(vocab)

    def model(**kw):
        m = dict(base["model"])
        m["vocab"] = dict(vocab)
        m["merges"] = list(merges)
        m.update(kw)
        return m

    def tok(model_, added_, pre, post=None, dec=None, norm=None):
        return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_,
                "normalizer": norm, "pre_tokenizer": pre, "post_processor": post,
                "decoder": bytelevel(True) if dec is None else dec, "model": model_}

    specials = base["added_tokens"]
    v = {}
    v["qwen2"] = tok(model(), specials + [added(n, "<|im_start|>", True), added(n + 1, "<|im_end|>", True),
                                          added(n + 2, "caf\u00e9", False),
                                          added(n + 3, "hello world", False, normalized=False)],
                     {"type": "Sequence", "pretokenizers": [split(QWEN2_RE, "Isolated"),
                                                            bytelevel(False, False)]},
                     post=bytelevel(False), norm={"type": "NFC"})
    v["llama3"] = tok(model(ignore_merges=True, merges=[" ".join(m) for m in merges]), specials,
                      {"type": "Sequence", "pretokenizers": [split(LLAMA3_RE, "Isolated"),
                                                             bytelevel(False, False)]},
                      post={"type": "Sequence", "processors": [
                          bytelevel(True),
                          {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                                "tokens": ["<|endoftext|>"]}}}]})
    v["flags"] = tok(model(), [added(0, "<|endoftext|>", True),
                               added(1, "<image>", True, lstrip=True),
                               added(2, "<audio>", True, rstrip=True),
                               added(3, "<video>", True, lstrip=True, rstrip=True),
                               added(n, "the", False, single_word=True, normalized=False),
                               added(n + 1, "ab", False, single_word=True),
                               added(n + 2, "[MASK]", False, lstrip=True, rstrip=True)],
                     bytelevel(True, True))
    v["splits"] = tok(model(), specials,
                      {"type": "Sequence", "pretokenizers": [
                          split(" ", "MergedWithPrevious", kind="String"),
                          split(r"\d+", "MergedWithNext"),
                          split(r"[aeiou]", "Contiguous", invert=True),
                          split(r",", "Removed"),
                          split(r"x", "Isolated", kind="String", invert=True),
                          bytelevel(False, False)]})
    fb_vocab = dict(vocab)
    for b in range(256):
        fb_vocab["<0x%02X>" % b] = n + b
    v["fallback"] = tok(model(vocab=fb_vocab, byte_fallback=True), specials,
                        split(r"\s+", "Isolated"), dec=None)
    v["fallback"]["decoder"] = None
    v["unk_fused"] = tok(model(unk_token="<|endoftext|>", fuse_unk=True), specials,
                         split(r"\s+", "Removed"))
    v["unk_plain"] = tok(model(unk_token="<|endoftext|>", fuse_unk=False), specials,
                         split(r"\s+", "Removed"))
    os.makedirs(OUT, exist_ok=True)
    for name, t in v.items():
        with open(os.path.join(OUT, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(t, f, ensure_ascii=False, indent=1)
    print("wrote", ", ".join(sorted(v)), "to", OUT)


FIXED_TEXTS = [
    "", " ", "a", "Hello world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\nhere",
    "I'm sure they'll say it's FINE, we've DONE what's RIGHT'S", "x = 12345678901 + 3.14159",
    "caf\u00e9 cafe\u0301 CAF\u00c9", "na\u00efve \u00fcber stra\u00dfe \u0416\u0443\u043a \u03bb\u03cc\u03b3\u03bf\u03c2",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u662f\u6a21\u578b\u3002",
    "emoji \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 done",
    "nbsp\u00a0here\u3000ideographic\u2028line", "nel\u0085char", "mongolian\u180evowel",
    "<image> describe the emotion <audio>", "<image><audio><video>", "a<image>b", "  <image>  x",
    "<|im_start|>user\nhello world<|im_end|>", "the theory: the,the the", "ab abc cab ab",
    "[MASK] and   [MASK]   then", "x <video>   y", "hello worldly hello world",
    "def f(x):\n    return x**2 # comment", "    \n\n    \t", "!!!???...,,,", "1,234,567 apples",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "\u0000nul\u0000", "\ufeffbom",
    "eeeeee oooo xxx x1x2x3", "mixed\u00e9\u4f60\U0001f600end",
]

POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") +
        list(" \t\n!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") +
        ["  ", "\r\n", "\u00a0", "\u3000", "'s", "'LL", "'ve", "\u00e9", "e\u0301", "\u00df",
         "\u0416", "\u03bb", "\u4f60", "\u597d", "\u4e16", "\U0001f600", "\U0001f44d\U0001f3fd",
         "\u200d", "the", " the ", "hello world", "ab", "<image>", "<audio>", "<video>",
         "<|endoftext|>", "<|im_start|>", "<|im_end|>", "[MASK]", "caf\u00e9", "123", "    "])


def random_texts(seed, count):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        k = rng.randint(1, 24)
        out.append("".join(rng.choice(POOL) for _ in range(k)))
    return out


def refs():
    from tokenizers import Tokenizer
    import tokenizers
    expected = {"tokenizers_version": tokenizers.__version__, "variants": {}}
    names = sorted(f[:-5] for f in os.listdir(OUT) if f.endswith(".json") and f != "expected.json")
    for name in ["tokenizer_bpe"] + names:
        path = BASE if name == "tokenizer_bpe" else os.path.join(OUT, name + ".json")
        t = Tokenizer.from_file(path)
        texts = FIXED_TEXTS + random_texts(sum(map(ord, name)), 120)
        cases = []
        for text in texts:
            ids = t.encode(text).ids
            ids_plain = t.encode(text, add_special_tokens=False).ids
            cases.append({"text": text, "ids": ids, "ids_no_special": ids_plain,
                          "decoded": t.decode(ids, skip_special_tokens=False),
                          "decoded_skip": t.decode(ids, skip_special_tokens=True)})
        rng = random.Random(17)
        limit = t.get_vocab_size(with_added_tokens=True)
        dcases = []
        for _ in range(60):
            ids = [rng.randrange(limit) for _ in range(rng.randint(1, 8))]
            ids = [i for i in ids if t.id_to_token(i) is not None]
            dcases.append({"ids": ids, "decoded": t.decode(ids, skip_special_tokens=False),
                           "decoded_skip": t.decode(ids, skip_special_tokens=True)})
        expected["variants"][name] = {
            "vocab_size": t.get_vocab_size(with_added_tokens=False),
            "vocab_size_added": t.get_vocab_size(with_added_tokens=True),
            "cases": cases, "decode_cases": dcases}
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=True, indent=0)
    print("wrote expected.json with tokenizers", tokenizers.__version__)


if __name__ == "__main__":
    {"variants": variants, "refs": refs}[sys.argv[1] if len(sys.argv) > 1 else "variants"]()
