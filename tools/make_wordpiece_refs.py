#!/usr/bin/env python3
"""make_wordpiece_refs.py - BERT WordPiece tokenizer.json fixtures and their reference outputs
(tests/fixtures/tokenizer_wordpiece), plus an InstructBLIP processor + generate reference for
`qfuse run` on the instructblip_llama_0 fixture.

    python3 tools/make_wordpiece_refs.py OUT_DIR     # where `tokenizers` + `transformers` are
                                                      # installed (the device machine)
    /usr/bin/python3 tools/make_wordpiece_refs.py --split OUT_DIR/results.json
                                                      # here: writes the fixture files

Nothing here is computed by qfuse. The tokenizer.json files are written by hand below (a
hand-written vocab of ~400 entries: ## pieces for every letter and digit, accented, Greek,
Cyrillic, CJK, Hangul, kana, emoji, some whole words, a few tokens that only decode can reach),
then loaded by `tokenizers` (Tokenizer.from_str) and re-serialized by it (to_str): the fixture is
what tokenizers itself writes. One more, "hf_uncased", is what transformers' BertTokenizerFast
(from a vocab.txt of the same vocab, do_lower_case=True) writes with save_pretrained.
For each variant the results hold, per text: ids with and without special tokens (tokenizers'
Tokenizer.encode), the token strings, the normalizer's output (normalize_str), decode of those
ids with and without skip_special_tokens (Tokenizer.decode),
and the count of texts where transformers' PreTrainedTokenizerFast over the same file agrees
(decode with clean_up_tokenization_spaces=False, as tokenizers decodes).

Variants: normalizer BertNormalizer with lowercase on/off and strip_accents null/true/false,
clean_text and handle_chinese_chars off, max_input_chars_per_word 100 and 8, prefix "##" and
"@@", post_processor TemplateProcessing and BertProcessing, decoder cleanup on/off, added
tokens (special / normalized). "qformer" is a vocab of < 120 ids (the fixture Q-Former's
vocab_size is 120), "llm" a 170-id tokenizer whose id 160 is "<image>" (the fixture LLaMA's
vocab_size and image_token_index), for the end-to-end `qfuse run` test.

The InstructBLIP part builds transformers' InstructBlipProcessor (BlipImageProcessor at 32x32,
the "llm" tokenizer, the "qformer" tokenizer as BertTokenizerFast), saves it (the layout, with
qformer_tokenizer/tokenizer.json, is recorded), runs it on data/chelsea.png with two prompts and
runs InstructBlipForConditionalGeneration (the fixture's weights) greedy for 8 new tokens.
Every part runs in its own try block; failures are logged in results.json["errors"].
Run of 2026-11-23 (tokenizers 0.23.2, transformers 5.17.0): every variant loaded and
PreTrainedTokenizerFast agreed on every text; BertTokenizerFast(vocab_file=...) read no vocab
(5 tokens); the processor saved (the layout is recorded) but its __call__ failed, because the llm
tokenizer was made with extra_special_tokens (image_token a str where 5.17 wants an AddedToken):
the order of the attempts below now tries without it first (not yet run).
"""
import json
import os
import random
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ASCII_PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
WORDS = ["the", "a", "an", "of", "and", "to", "in", "is", "it", "this", "that", "what", "where", "who",
         "how", "why", "question", "answer", "describe", "picture", "photo", "image", "cat", "dog",
         "hello", "world", "play", "##ing", "##ed", "##s", "##er", "##ly", "un", "##able", "believ",
         "stop", "don", "t", "multiple", "spaces", "tabs", "new", "##lines", "control", "chars",
         "here", "zero", "width", "bom", "soft", "unknown", "emoji", "number", "mixed", "case",
         "words", "symbols", "math", "punct", "with", "space", "ends", "starts", "inside", "text",
         "lower", "llm", "token", "dotted", "capital", "sharp", "final", "sigma", "stacked", "marks",
         "ligature", "titlecase", "late", "hyphen", "ate", "##ated", "slash", "path", "back", "user",
         "tag", "under", "score", "please", "##ase", "##tion", "quotes", "low", "dash", "en",
         "ellipsis", "hola", "que", "combining", "accent", "private", "use", "unassigned",
         "replacement", "char", "vertical", "form", "feed", "ideographic", "line", "para", "nel",
         "nb", "##sp", "mongolian", "vowel", "separator", "istanbul", "tab", "and", "clock"]
CASED = ["Hello", "World", "Question", "Answer", "The", "Café", "Über", "MiXeD", "CAFÉ", "İstanbul",
         "Привет", "ΑΒΓ", "##É", "##Ï", "NAÏVE", "Describe", "I"]
ACCENTED = ["café", "cafe", "caf", "##é", "##e\u0301", "naïve", "naive", "##ï", "résumé", "resume",
            "über", "uber", "straße", "strasse", "##ß", "é", "è", "ê", "ü", "ö", "ä", "ñ", "ç",
            "hola", "qué", "##é", "i\u0307", "##\u0307", "ı", "##ı", "ß", "##ẞ"]
SCRIPTS = ["αβγ", "λ", "##λ", "α", "##β", "##γ", "Λ", "σ", "##σ", "ς", "##ς", "οδος", "##ος", "ο",
           "привет", "мир", "##т", "п", "##р", "##и", "##в", "##е",
           "你", "好", "世", "界", "中", "文", "日", "本", "語", "こん", "##にち", "##は", "と", "##と",
           "こ", "##ん", "##に", "##ち", "한", "##국", "##어", "텍", "##스", "##트",
           "😀", "👍", "##🏽", "❤", "##\ufe0f", "€", "£", "©", "∑", "∞", "≠", "≤", "°", "™", "®",
           "¡", "¿", "«", "»", "„", "“", "—", "–", "…", "ﬁ", "ﬀ", "k", "å", "ω",
           "\u2e4f", "\u2e5d", "\u0f85", "\u2e3a", "\u0345", "##\u0345", "ι", "##ι"]
DECODE_ONLY = ["do not", "n't", "'s", "'m", "'ve", "'re", "rock ' n", " ."]


def main_vocab():
    toks = list(SPECIALS)
    seen = set(toks)

    def add(t):
        if t not in seen:
            seen.add(t)
            toks.append(t)

    for t in ASCII_PUNCT:
        add(t)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789":
        add(c)
        if c != "q":  # "##q" absent: a word with q after its first char is [UNK]
            add("##" + c)
    for group in (WORDS, CASED, ACCENTED, SCRIPTS, DECODE_ONLY):
        for t in group:
            add(t)
    return toks


def qformer_vocab():
    """< 120 ids: the fixture Q-Former's vocab_size is 120."""
    toks = list(SPECIALS) + list(".,?!:'")
    for c in "abcdefghijklmnopqrstuvwxyz":
        toks.append(c)
    for c in "abcdefghijklmnopqrstuvwxyz":
        toks.append("##" + c)
    for w in ["question", "answer", "what", "is", "in", "the", "photo", "picture", "describe", "this",
              "image", "cat", "of", "please", "##ing", "caf", "##é", "é", "you", "see",
              "color", "animal", "##ed", "where", "how", "many"]:
        toks.append(w)
    assert len(toks) == len(set(toks)) and len(toks) < 120, len(toks)
    return toks


def llm_vocab():
    """170 ids, id 160 "<image>" (the fixture LLaMA: vocab_size 170, image_token_index 160)."""
    toks = ["<unk>", "<s>", "</s>"] + list(".,?!:;'\"()-") + list("abcdefghijklmnopqrstuvwxyz")
    toks += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    toks += list("0123456789")
    words = ["question", "answer", "what", "is", "in", "the", "photo", "picture", "describe", "this",
             "image", "cat", "a", "of", "please", "##s", "##ing", "you", "see", "color", "animal",
             "##ed", "where", "how", "many", "and", "to", "it", "that", "on", "with", "for", "as", "was",
             "at", "by", "an", "be", "from", "are", "or", "his", "her", "they", "we", "one", "two",
             "red", "blue", "green", "small", "big", "dog", "sits", "grass", "tree", "sky", "sun",
             "water", "house", "car", "road"]
    for w in words:
        if len(toks) == 160:
            break
        if w not in toks:
            toks.append(w)
    while len(toks) < 160:
        toks.append("w%d" % len(toks))
    toks.append("<image>")
    while len(toks) < 170:
        toks.append("x%d" % len(toks))
    assert len(toks) == len(set(toks)) == 170 and toks[160] == "<image>"
    return toks


def added(i, content, special=True, normalized=None, lstrip=False, rstrip=False, single_word=False):
    return {"id": i, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


def template(cls, cls_id, sep, sep_id):
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": cls, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": sep, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": cls, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": sep, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": sep, "type_id": 1}}],
            "special_tokens": {cls: {"id": cls, "ids": [cls_id], "tokens": [cls]},
                               sep: {"id": sep, "ids": [sep_id], "tokens": [sep]}}}


def bert_json(toks, lowercase=True, strip_accents=None, clean_text=True, chinese=True, max_chars=100,
              prefix="##", post="template", cleanup=True, extra_added=()):
    vocab = {t: i for i, t in enumerate(toks)}
    if prefix != "##":
        vocab = {(prefix + t[2:] if t.startswith("##") else t): i for t, i in vocab.items()}
    adds = [added(vocab[s], s) for s in SPECIALS if s in vocab] + list(extra_added)
    if post == "template":
        pp = template("[CLS]", vocab["[CLS]"], "[SEP]", vocab["[SEP]"])
    else:
        pp = {"type": "BertProcessing", "sep": ["[SEP]", vocab["[SEP]"]], "cls": ["[CLS]", vocab["[CLS]"]]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": adds,
            "normalizer": {"type": "BertNormalizer", "clean_text": clean_text, "handle_chinese_chars": chinese,
                           "strip_accents": strip_accents, "lowercase": lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": pp,
            "decoder": {"type": "WordPiece", "prefix": prefix, "cleanup": cleanup},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": prefix,
                      "max_input_chars_per_word": max_chars, "vocab": vocab}}


def llm_json():
    toks = llm_vocab()
    vocab = {t: i for i, t in enumerate(toks)}
    adds = [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"), added(160, "<image>")]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": adds,
            "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                           "strip_accents": None, "lowercase": True},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": {"type": "TemplateProcessing",
                               "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                          {"Sequence": {"id": "A", "type_id": 0}}],
                               "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                        {"Sequence": {"id": "A", "type_id": 0}},
                                        {"Sequence": {"id": "B", "type_id": 1}}],
                               "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": "<unk>", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}}


def variants():
    mv = main_vocab()
    n = len(mv)
    raw_added = [added(n, "<image>", special=True, rstrip=True),
                 added(n + 1, "New York", special=False, normalized=True),
                 added(n + 2, "[Keep]", special=False, normalized=False)]
    return {
        "uncased": bert_json(mv),
        "cased": bert_json(mv, lowercase=False, post="bert"),
        "cased_strip": bert_json(mv, lowercase=False, strip_accents=True),
        "uncased_keep": bert_json(mv, strip_accents=False, cleanup=False, post="bert"),
        "raw": bert_json(mv, clean_text=False, chinese=False, max_chars=8, cleanup=False, extra_added=raw_added),
        "prefix_at": bert_json(mv, prefix="@@"),
        "qformer": bert_json(qformer_vocab()),
        "llm": llm_json(),
    }


TEXTS = [
    "", " ", "Hello, world!", "hello world", "Question: what is in the picture? Answer:",
    "  multiple   spaces\tand\ttabs\nand\nnew lines\r\n ",
    "don't stop believing; it's 3.14 o'clock!!!",
    "Café naïve résumé Über straße", "CAFÉ NAÏVE", "cafe\u0301 (combining accent)",
    "İstanbul ı I \u0130\u0307 dotted", "ΑΒΓ αβγ Λ λ", "Σ final sigma ΟΔΟΣ", "Привет, мир",
    "你好世界 中文abc你好", "日本語とこんにちは", "한국어 텍스트",
    "emoji 😀 🥺 🫠 👍🏽 ❤️",
    "unknown xyzzyq øresund aq",
    "a" * 8, "a" * 9, "a" * 11, "a" * 12, "a" * 100, "a" * 101, "a" * 103, "a" * 104,
    "x" + "ab" * 49 + "c", "caf\u00e9" * 25 + "s",
    "control\x00chars\x07here\x1b[0m\u200bzero\u200dwidth\ufeffbom\u00adsoft",
    "replacement \ufffd char", "private \ue000\ue001\uf8ff\U000f0000 use", "unassigned \u0378 \U0001fff0 here",
    "punct: ¡hola! ¿qué? «quotes» „low“ — dash – en … ellipsis",
    "symbols $5 + 3 = 8 ^ ~ | ` < > € £ © ® ™ °", "math ∑ ∞ ≠ ≤",
    "late punct \u2e4f \u2e5d \u0f85 \u2e3a \u2e52",
    "under_score hyphen-ated slash/path back\\slash @user #tag",
    "[CLS] [SEP] [MASK] inside text", "[cls] lower-case specials", "<image> llm token <image>x",
    "New York new york NEW YORK [Keep] [keep]",
    "ends with space ", " starts with space",
    "\u3000ideographic\u00a0nbsp\u2028line\u2029para\u0085nel",
    "\u180e mongolian vowel separator", "tab\x0bvertical\x0cform feed",
    "number 12345 and 3,000.50", "MiXeD CaSe WoRdS", "ǅ ǈ titlecase Dž",
    "ﬁ ligature ﬀ", "\u212b \u00c5 \u2126 \u03a9 \u212a k", "ẞ capital sharp s",
    "a\u0300\u0301\u0302 stacked marks", "\u0345 ypogegrammeni \u0399\u0345",
    "Describe this Café picture, please!",
]

POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-_/\\#@")
        + [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\u0000", "\x7f", "\u0085", "\ufeff",
           "\u00e9", "e\u0301", "\u00df", "\u0416", "\u03bb", "\u4f60", "\u597d", "\u754c", "\u3053", "\ud55c",
           "\U0001f600", "\U0001f44d\U0001f3fd", "\u200d", "\u0130", "\u00c9", "\u00ef", "\u2014", "\u00bf",
           "the", "cat", "play", "ing", "caf\u00e9", "New York", "<image>", "[CLS]", "[SEP]", "##s", "\ufffd"])


def random_texts(n, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def decode_cases(vocab_size, seed):
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(0, 16))] for _ in range(40)]


def run_tokenizers(res, errors):
    import tokenizers
    from tokenizers import Tokenizer
    res["versions"]["tokenizers"] = tokenizers.__version__
    try:
        from transformers import PreTrainedTokenizerFast
    except Exception:
        PreTrainedTokenizerFast = None
        errors.append("import PreTrainedTokenizerFast: " + traceback.format_exc(limit=1))
    vs = variants()
    try:  # transformers' own BERT tokenizer.json from a vocab.txt of the main vocab
        import tempfile
        d = tempfile.mkdtemp()
        vf = os.path.join(d, "vocab.txt")
        with open(vf, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in main_vocab()))
        made = None
        for how in ("BertTokenizerFast(vocab_file)", "BertTokenizer(vocab_file)", "BertTokenizer(vocab)"):
            try:
                import transformers
                if how == "BertTokenizerFast(vocab_file)":
                    t = transformers.BertTokenizerFast(vocab_file=vf, do_lower_case=True)
                elif how == "BertTokenizer(vocab_file)":
                    t = transformers.BertTokenizer(vocab_file=vf, do_lower_case=True)
                else:
                    t = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(main_vocab())},
                                                   do_lower_case=True)
                out = os.path.join(d, "saved")
                t.save_pretrained(out)
                with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
                    vs["hf_uncased"] = json.load(f)
                made = how
                res["hf_uncased_files"] = sorted(os.listdir(out))
                break
            except Exception:
                errors.append("hf_uncased via %s: %s" % (how, traceback.format_exc(limit=2)))
        res["hf_uncased_made_by"] = made
    except Exception:
        errors.append("hf_uncased: " + traceback.format_exc(limit=2))
    texts = TEXTS + random_texts(120, 1234)
    res["variants"] = {}
    for name, j in vs.items():
        t0 = time.time()
        try:
            tk = Tokenizer.from_str(json.dumps(j))
        except Exception:
            errors.append("variant %s does not load in tokenizers: %s" % (name, traceback.format_exc(limit=2)))
            continue
        ser = json.loads(tk.to_str())
        cases = []
        for text in (TEXTS if name in ("qformer", "llm") else texts):
            try:
                e1 = tk.encode(text).ids
                e0 = tk.encode(text, add_special_tokens=False).ids
                cases.append({"text": text, "ids": e1, "ids_no_special": e0,
                              "tokens": tk.encode(text, add_special_tokens=False).tokens,
                              "normalized": tk.normalizer.normalize_str(text),
                              "decoded": tk.decode(e1, skip_special_tokens=False),
                              "decoded_skip": tk.decode(e1, skip_special_tokens=True)})
            except Exception as ex:
                cases.append({"text": text, "error": repr(ex)})
        V = tk.get_vocab_size(with_added_tokens=True)
        dec = []
        for ids in decode_cases(V, 99):
            try:
                dec.append({"ids": ids, "decoded": tk.decode(ids, skip_special_tokens=False),
                            "decoded_skip": tk.decode(ids, skip_special_tokens=True)})
            except Exception as ex:
                dec.append({"ids": ids, "error": repr(ex)})
        if name in ("uncased", "cased", "uncased_keep"):  # the decoder's cleanup pairs
            v = ser["model"]["vocab"]
            for seq in (["hello", ",", "world", "!"], ["i", "do not", "know", "."], ["don", "n't", "'s", "'m"],
                        ["'ve", "'re", "rock ' n", " .", "?", "'"], ["##s", "cat", "##s", "[CLS]", "play", "##ing"],
                        ["[SEP]", "a", "[PAD]", "[MASK]", "b"]):
                ids = [v[s] for s in seq if s in v]
                dec.append({"ids": ids, "decoded": tk.decode(ids, skip_special_tokens=False),
                            "decoded_skip": tk.decode(ids, skip_special_tokens=True)})
        agree, diffs = 0, []
        if PreTrainedTokenizerFast is not None:
            try:
                hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tk.to_str()))
                for c in cases:
                    if "error" in c:
                        continue
                    got = (hf.encode(c["text"], add_special_tokens=True), hf.encode(c["text"], add_special_tokens=False),
                           hf.decode(c["ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False))
                    if got == (c["ids"], c["ids_no_special"], c["decoded"]):
                        agree += 1
                    elif len(diffs) < 5:
                        diffs.append([c["text"], list(got)])
            except Exception:
                errors.append("transformers cross-check of %s: %s" % (name, traceback.format_exc(limit=2)))
        res["variants"][name] = {"tokenizer": ser, "vocab_size": tk.get_vocab_size(with_added_tokens=False),
                                 "vocab_size_added": V, "cases": cases, "decode_cases": dec,
                                 "transformers_agree": agree, "transformers_diffs": diffs,
                                 "seconds": round(time.time() - t0, 3)}


def run_instructblip(res, errors):
    import numpy as np
    import torch
    import transformers
    from PIL import Image
    from tokenizers import Tokenizer
    from transformers import (BlipImageProcessor, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              PreTrainedTokenizerFast)
    res["versions"]["transformers"] = transformers.__version__
    res["versions"]["torch"] = torch.__version__
    vs = variants()
    llm = None
    for kw in ({}, {"extra_special_tokens": {"image_token": "<image>"}}):
        try:
            llm = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(vs["llm"])), bos_token="<s>",
                                          eos_token="</s>", unk_token="<unk>", pad_token="<unk>", **kw)
            break
        except Exception:
            errors.append("llm tokenizer %r: %s" % (kw, traceback.format_exc(limit=2)))
    qt = None
    try:
        qt = transformers.BertTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(vs["qformer"])))
    except Exception:
        errors.append("qformer BertTokenizerFast(tokenizer_object): " + traceback.format_exc(limit=2))
        qt = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(vs["qformer"])),
                                     unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                     mask_token="[MASK]")
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    ip = BlipImageProcessor(size={"height": 32, "width": 32}, image_mean=mean, image_std=std, do_rescale=True,
                            do_normalize=True, do_resize=True, resample=3, do_convert_rgb=True)
    proc = InstructBlipProcessor(image_processor=ip, tokenizer=llm, qformer_tokenizer=qt, num_query_tokens=6)
    import tempfile
    d = tempfile.mkdtemp()
    proc.save_pretrained(d)
    layout = {}
    for root, _, files in os.walk(d):
        for f in files:
            layout[os.path.relpath(os.path.join(root, f), d)] = os.path.getsize(os.path.join(root, f))
    res["processor_layout"] = layout
    qtj = os.path.join(d, "qformer_tokenizer", "tokenizer.json")
    if os.path.exists(qtj):
        with open(qtj, encoding="utf-8") as f:
            res["processor_qformer_tokenizer"] = json.load(f)
    tj = os.path.join(d, "tokenizer.json")
    if os.path.exists(tj):
        with open(tj, encoding="utf-8") as f:
            res["processor_llm_tokenizer"] = json.load(f)
    image = Image.open(os.path.join(ROOT, "data", "chelsea.png")).convert("RGB")
    model = InstructBlipForConditionalGeneration.from_pretrained(
        os.path.join(ROOT, "tests", "fixtures", "instructblip_llama_0")).eval()
    runs = []
    for prompt in ("Question: what is in the photo? Answer:", "Describe this Café picture, please!", ""):
        try:
            inp = proc(images=image, text=prompt, return_tensors="pt")
            r = {"prompt": prompt}
            for k, v in inp.items():
                r[k] = v.tolist()
            with torch.no_grad():
                out = model.generate(**inp, max_new_tokens=8, do_sample=False)
            r["generated"] = out.tolist()
            r["qformer_ids_direct"] = qt(prompt)["input_ids"]
            runs.append(r)
        except Exception:
            errors.append("processor/generate on %r: %s" % (prompt, traceback.format_exc(limit=3)))
    res["instructblip"] = runs
    _ = np


def device(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    res = {"versions": {"python": sys.version}, "errors": []}
    path = os.path.join(out_dir, "results.json")

    def save():
        with open(path, "w", encoding="utf-8") as f:
            json.dump(res, f, ensure_ascii=False)

    for part in (run_tokenizers, run_instructblip):
        t0 = time.time()
        try:
            part(res, res["errors"])
        except Exception:
            res["errors"].append("%s: %s" % (part.__name__, traceback.format_exc(limit=4)))
        res["versions"][part.__name__ + "_seconds"] = round(time.time() - t0, 2)
        save()
    print("errors:", len(res["errors"]))
    for e in res["errors"]:
        print(e[:600])
    for n, v in res.get("variants", {}).items():
        bad = sum("error" in c for c in v["cases"])
        print("%-12s vocab %d cases %d (errors %d) transformers agree %d %s" % (
            n, v["vocab_size"], len(v["cases"]), bad, v["transformers_agree"], v["transformers_diffs"][:1]))
    print("layout", res.get("processor_layout"))
    for r in res.get("instructblip", []):
        print(r["prompt"], r.get("qformer_input_ids"), r.get("generated"))


def split(results_path):
    """Writes tests/fixtures/tokenizer_wordpiece/ from a results.json made on the device."""
    with open(results_path, encoding="utf-8") as f:
        res = json.load(f)
    out = os.path.join(ROOT, "tests", "fixtures", "tokenizer_wordpiece")
    os.makedirs(out, exist_ok=True)
    expected = {"versions": res["versions"], "errors": res["errors"], "variants": {}}
    for name, v in res["variants"].items():
        with open(os.path.join(out, name + ".json"), "w", encoding="utf-8") as f:
            json.dump(v["tokenizer"], f, ensure_ascii=False, indent=1, sort_keys=True)
            f.write("\n")
        expected["variants"][name] = {k: v[k] for k in v if k != "tokenizer"}
    for key, fname in (("processor_qformer_tokenizer", "processor_qformer_tokenizer.json"),
                       ("processor_llm_tokenizer", "processor_llm_tokenizer.json")):
        if key in res:
            with open(os.path.join(out, fname), "w", encoding="utf-8") as f:
                json.dump(res[key], f, ensure_ascii=False, indent=1, sort_keys=True)
                f.write("\n")
    expected["processor_layout"] = res.get("processor_layout")
    expected["instructblip"] = res.get("instructblip", [])
    expected["hf_uncased_made_by"] = res.get("hf_uncased_made_by")
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--split":
        split(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--local":
        # writes the hand-built variants only (no reference outputs), for development here
        os.makedirs(sys.argv[2], exist_ok=True)
        for name, j in variants().items():
            with open(os.path.join(sys.argv[2], name + ".json"), "w", encoding="utf-8") as f:
                json.dump(j, f, ensure_ascii=False, indent=1)
    elif len(sys.argv) == 2:
        device(sys.argv[1])
    else:
        sys.exit(__doc__)
