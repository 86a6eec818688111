"""test_wordpiece.py - qfuse.tokenizer on BERT WordPiece tokenizer.json files against the
`tokenizers` library's own outputs.

References (none computed by qfuse): tests/fixtures/tokenizer_wordpiece/expected.json, made by
tools/make_wordpiece_refs.py with tokenizers 0.23.2 / transformers 5.17 on the GPU machine (see
the fixture's README): for each variant tokenizer.json (as tokenizers itself serializes it), ~56
fixed texts (punctuation, accents, combining marks, Greek final sigma, Turkish dotted I, CJK,
kana, Hangul, emoji, private-use / unassigned / control / format characters, every kind of
whitespace, words around max_input_chars_per_word) plus 120 seeded random ones: ids with and
without special tokens, decode with and without skip_special_tokens, and decodes of random and
hand-picked id lists (the decoder's cleanup rules). transformers' PreTrainedTokenizerFast agreed
with tokenizers on every one of those texts (recorded as transformers_agree).
Variants: BertNormalizer lowercase on/off x strip_accents null/true/false, clean_text and
handle_chinese_chars off, max_input_chars_per_word 8 and 100, prefix "##" and "@@",
TemplateProcessing and BertProcessing, decoder cleanup on/off, special / normalized added tokens;
"hf_uncased" is what transformers' BertTokenizerFast(vocab_file=...).save_pretrained wrote there
(transformers 5.17 read no vocab from the file: 5 tokens, a format check); "qformer" and "llm"
are the tokenizers of the `qfuse run` InstructBLIP test (test_cli_instructblip.py).
Errors: a file without a vocab, an unsupported normalizer / model setting, an unk token missing
from the vocab, each refused at load with a message naming it.
"""
import json
import os

import pytest

from qfuse import QfuseError
from qfuse.tokenizer import Tokenizer

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "tokenizer_wordpiece")
QUICK = os.environ.get("QFUSE_TEST_QUICK") == "1"
VARIANTS = ["uncased", "cased", "cased_strip", "uncased_keep", "raw", "prefix_at", "qformer", "llm", "hf_uncased"]


def _expected():
    with open(os.path.join(FIX, "expected.json"), encoding="utf-8") as f:
        return json.load(f)


EXPECTED = _expected()


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_against_tokenizers(name):
    ref = EXPECTED["variants"][name]
    assert ref["transformers_agree"] == len(ref["cases"])  # the reference agrees with itself
    with Tokenizer(os.path.join(FIX, name + ".json")) as t:
        assert t.vocab_size == ref["vocab_size"]
        assert len(t) == ref["vocab_size_added"]
        cases = ref["cases"][:80] if QUICK else ref["cases"]
        bad = []
        for c in cases:
            got = (t.encode(c["text"]), t.encode(c["text"], add_special_tokens=False),
                   t.decode(c["ids"]), t.decode(c["ids"], skip_special_tokens=True))
            want = (c["ids"], c["ids_no_special"], c["decoded"], c["decoded_skip"])
            if got != want:
                bad.append((c["text"], got, want))
        assert not bad, "%d of %d texts differ; first: %r" % (len(bad), len(cases), bad[0])
        for d in ref["decode_cases"]:
            assert t.decode(d["ids"]) == d["decoded"], d["ids"]
            assert t.decode(d["ids"], skip_special_tokens=True) == d["decoded_skip"], d["ids"]


def test_references_cover_the_features():
    """The reference exercises what the variants are named for (else the comparisons above could
    pass vacuously)."""
    v = EXPECTED["variants"]

    def case(name, text):
        return next(c for c in v[name]["cases"] if c["text"] == text)

    unk = json.load(open(os.path.join(FIX, "uncased.json"), encoding="utf-8"))["model"]["vocab"]["[UNK]"]
    assert case("uncased", "CAFÉ NAÏVE")["tokens"] == ["cafe", "naive"]             # lowercase + strip
    assert case("cased", "CAFÉ NAÏVE")["tokens"] == ["CAFÉ", "NAÏVE"]
    assert case("cased_strip", "Café naïve résumé Über straße")["normalized"] == "Cafe naive resume Uber straße"
    assert case("uncased_keep", "CAFÉ NAÏVE")["tokens"] == ["café", "naïve"]        # strip_accents false
    assert case("uncased", "a" * 100)["ids_no_special"] != [unk]                      # max_input_chars 100
    assert case("uncased", "a" * 101)["ids_no_special"] == [unk]
    assert case("raw", "a" * 8)["ids_no_special"] != [unk] and case("raw", "a" * 9)["ids_no_special"] == [unk]
    assert case("uncased", "你好世界 中文abc你好")["tokens"][:4] == ["你", "好", "世", "界"]  # CJK split
    assert len(case("raw", "你好世界 中文abc你好")["tokens"]) < 4                         # ... not when off
    assert "\x00" in case("raw", "control\x00chars\x07here\x1b[0m\u200bzero\u200dwidth\ufeffbom\u00adsoft")["normalized"]
    assert case("uncased", "Hello, world!")["ids"][0] != case("uncased", "Hello, world!")["ids_no_special"][0]
    assert case("cased", "Hello, world!")["ids"][-1] != case("cased", "Hello, world!")["ids_no_special"][-1]
    assert any(t.startswith("@@") for c in v["prefix_at"]["cases"] for t in c["tokens"])
    # a normalized added token matches every casing, and is held (decoded) in its normalized form
    assert case("raw", "New York new york NEW YORK [Keep] [keep]")["tokens"][:4] == ["new york"] * 3 + ["[Keep]"]
    dec = [d["decoded"] for d in v["uncased"]["decode_cases"]]
    assert "hello, world!" in dec and "i don't." in dec                         # cleanup rules
    assert "hello , world !" in [d["decoded"] for d in v["uncased_keep"]["decode_cases"]]  # cleanup off


def test_round_trip_and_lookups():
    with Tokenizer(os.path.join(FIX, "uncased.json")) as t:
        ids = t.encode("Hello, world!")
        assert t.id_to_token(ids[0]) == "[CLS]" and t.id_to_token(ids[-1]) == "[SEP]"
        assert t.is_special(ids[0]) and not t.is_special(ids[1])
        assert t.decode(ids, skip_special_tokens=True) == "hello, world!"
        assert t.token_to_id("##ing") is not None and t.token_to_id("[UNK]") == 1
        assert t.encode("") == [2, 3] and t.encode("", add_special_tokens=False) == []


def _load_json(name):
    with open(os.path.join(FIX, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def _refused(tmp_path, obj, pattern, status="QF_ERR_UNSUPPORTED"):
    p = tmp_path / "tokenizer.json"
    p.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(QfuseError, match=pattern) as e:
        Tokenizer(p)
    assert e.value.status == status
    assert str(p) in e.value.message


def test_errors(tmp_path):
    base = _load_json("uncased")
    j = json.loads(json.dumps(base))
    del j["model"]["vocab"]
    _refused(tmp_path, j, r"model\.vocab is missing", "QF_ERR_FORMAT")
    j = json.loads(json.dumps(base))
    j["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": "AAAA"}
    _refused(tmp_path, j, r'normalizer "Precompiled" is not supported')
    j = json.loads(json.dumps(base))
    j["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]}
    _refused(tmp_path, j, r'normalizer "NFD" is not supported')
    j = json.loads(json.dumps(base))
    j["normalizer"]["separate_numbers"] = True
    _refused(tmp_path, j, r"normalizer BertNormalizer\.separate_numbers is not supported")
    j = json.loads(json.dumps(base))
    j["model"]["dropout"] = 0.1
    _refused(tmp_path, j, r"model \(WordPiece\)\.dropout is not supported")
    j = json.loads(json.dumps(base))
    j["model"]["unk_token"] = "<unk>"
    _refused(tmp_path, j, r'model\.unk_token "<unk>" is not in model\.vocab', "QF_ERR_FORMAT")
    j = json.loads(json.dumps(base))
    j["model"]["max_input_chars_per_word"] = -1
    _refused(tmp_path, j, r"max_input_chars_per_word", "QF_ERR_FORMAT")
    j = json.loads(json.dumps(base))
    j["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True, "strip": 1}
    _refused(tmp_path, j, r"decoder WordPiece\.strip is not supported")
    j = json.loads(json.dumps(base))
    j["decoder"] = {"type": "Metaspace"}
    _refused(tmp_path, j, r'decoder "Metaspace" is not supported')
    j = json.loads(json.dumps(base))
    j["pre_tokenizer"] = {"type": "Whitespace"}
    _refused(tmp_path, j, r'pre_tokenizer "Whitespace" is not supported')
    j = json.loads(json.dumps(base))
    j["post_processor"] = {"type": "BertProcessing", "sep": ["[SEP]"], "cls": ["[CLS]", 2]}
    _refused(tmp_path, j, r"BertProcessing\.sep", "QF_ERR_FORMAT")
    j = json.loads(json.dumps(base))
    j["post_processor"] = {"type": "RobertaProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]}
    _refused(tmp_path, j, r'post_processor "RobertaProcessing" is not supported')
    j = json.loads(json.dumps(base))
    j["model"]["type"] = "Unigram"
    _refused(tmp_path, j, r'model\.type "Unigram" is not supported')
