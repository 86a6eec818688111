"""test_tokenizer.py - qfuse.tokenizer against the `tokenizers` library's own outputs.

References (none computed by qfuse):
- tests/fixtures/tokenizer_bpe/case.json: a real byte-level BPE tokenizer.json, texts, ids and
  decoded strings (tokenizers 0.23 on the GPU machine);
- tests/fixtures/tokenizer_variants/expected.json: the same vocab under Qwen2 / LLaMA-3 style
  pipelines, added-token flags, every Split behavior, byte fallback and unk handling; fixed and
  seeded random texts; made by tests/python/make_tokenizer_refs.py with tokenizers 0.23.2.
Round trips decode(encode(x)) == x hold for any text under a byte-level BPE with the whole byte
alphabet: that is tokenizers' contract too, checked here on random strings.
"""
import json
import os
import random

import pytest

from qfuse import QfuseError
from qfuse.tokenizer import Tokenizer

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
BPE = os.path.join(FIX, "tokenizer_bpe", "tokenizer.json")
VARIANTS = os.path.join(FIX, "tokenizer_variants")
QUICK = os.environ.get("QFUSE_TEST_QUICK") == "1"


@pytest.fixture(scope="module")
def tok():
    with Tokenizer(BPE) as t:
        yield t


def test_fixture_case(tok):
    case = json.load(open(os.path.join(FIX, "tokenizer_bpe", "case.json"), encoding="utf-8"))
    assert len(case["texts"]) == 6
    for text, ids, decoded in zip(case["texts"], case["ids"], case["decoded"]):
        assert tok.encode(text) == ids, text
        # the fixture's decoded strings drop special tokens (tokenizers' decode default)
        assert tok.decode(ids, skip_special_tokens=True) == decoded, text


def _expected():
    return json.load(open(os.path.join(VARIANTS, "expected.json"), encoding="utf-8"))


@pytest.mark.parametrize("name", ["tokenizer_bpe", "qwen2", "llama3", "flags", "splits", "fallback",
                                  "unk_fused", "unk_plain"])
def test_variant_against_tokenizers(name):
    ref = _expected()["variants"][name]
    path = BPE if name == "tokenizer_bpe" else os.path.join(VARIANTS, name + ".json")
    with Tokenizer(path) as t:
        assert t.vocab_size == ref["vocab_size"]
        assert len(t) == ref["vocab_size_added"]
        cases = ref["cases"][:60] if QUICK else ref["cases"]
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


def test_variants_cover_their_features():
    """The variant references really exercise what they are named for (else the comparisons
    above could pass vacuously)."""
    v = _expected()["variants"]
    llama = {c["text"]: c for c in v["llama3"]["cases"]}
    assert llama["a"]["ids"][0] == 0 and llama["a"]["ids_no_special"][0] != 0  # template BOS
    qwen = {c["text"]: c for c in v["qwen2"]["cases"]}
    t = "caf\u00e9 cafe\u0301 CAF\u00c9"
    assert qwen[t]["ids"].count(602) == 2                                   # NFC + normalized token
    fb = {c["text"]: c for c in v["fallback"]["cases"]}
    assert any(600 <= i < 856 for i in fb["\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u662f\u6a21\u578b\u3002"]["ids"])
    unk = {c["text"]: c for c in v["unk_fused"]["cases"]}
    unk2 = {c["text"]: c for c in v["unk_plain"]["cases"]}
    k = "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u662f\u6a21\u578b\u3002"
    assert unk[k]["ids"] != unk2[k]["ids"]                                  # fuse_unk matters
    flags = {c["text"]: c for c in v["flags"]["cases"]}
    assert flags["the theory: the,the the"]["ids"].count(600) >= 2          # single_word hits
    assert any("\ufffd" in d["decoded"] for d in v["tokenizer_bpe"]["decode_cases"])  # lossy


def _random_text(rng):
    pool = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"()-_/\\")
            + [" ", "  ", "\t", "\n", "\r\n", "    ", "\u00a0", "\u3000", "\u2028"]
            + ["\u00e9", "e\u0301", "\u00df", "\u0416", "\u03bb", "\u4f60", "\u597d", "\u754c",
               "\u3053", "\ud55c", "\U0001f600", "\U0001f44d\U0001f3fd", "\u200d", "\U0001f1fa\U0001f1f8",
               "\u0000", "\x7f", "\u0085", "\ufeff", "\U0010fffd"])
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))


def test_round_trip_random(tok):
    rng = random.Random(1234)
    n = 200 if QUICK else 2000
    for _ in range(n):
        text = _random_text(rng)
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
    long_text = "".join(_random_text(rng) for _ in range(300))
    assert tok.decode(tok.encode(long_text)) == long_text


def test_special_tokens_and_lookups(tok):
    ids = tok.encode("<image><audio> x<video>")
    assert ids[:2] == [1, 2] and ids[-1] == 3
    assert tok.decode(ids, skip_special_tokens=True) == " x"
    assert tok.decode(ids) == "<image><audio> x<video>"
    assert tok.token_to_id("<image>") == 1
    assert tok.token_to_id("no such token") is None
    assert tok.id_to_token(1) == "<image>"
    assert tok.id_to_token(10**6) is None and tok.id_to_token(-1) is None
    assert tok.is_special(0) and not tok.is_special(43)
    assert tok.id_limit == 600
    assert tok.encode("") == []
    assert tok.decode([]) == ""


def test_bytes_and_invalid_utf8(tok):
    assert tok.encode("caf\u00e9".encode("utf-8")) == tok.encode("caf\u00e9")
    for bad, at in ((b"ab\xffcd", 2), (b"\xc3", 0), (b"x\xed\xa0\x80", 1), (b"\xf0\x9f\x98", 0),
                    (b"ok\xc0\xaf", 2)):
        with pytest.raises(QfuseError) as e:
            tok.encode(bad)
        assert e.value.status == "QF_ERR_ARG"
        assert "not valid UTF-8" in e.value.message and "offset %d" % at in e.value.message
    with pytest.raises(QfuseError):
        tok.encode("lone \ud800 surrogate")


def test_decode_errors_and_lossy(tok):
    with pytest.raises(QfuseError) as e:
        tok.decode([43, 600, 1])
    assert e.value.status == "QF_ERR_ARG" and "ids[1] = 600" in e.value.message
    with pytest.raises(QfuseError) as e:
        tok.decode([-5])
    assert "ids[0] = -5" in e.value.message
    # a lone lead byte of a 3-byte sequence, then ASCII: one U+FFFD (Rust's from_utf8_lossy)
    lead = tok.encode("\u4f60")
    assert tok.decode(lead[:1] + tok.encode("a")) == "\ufffda"


def test_long_inputs_are_fast(tok):
    import time
    text = "a" * 20000 + " " + "\u4f60" * 5000 + " \t" * 3000
    t0 = time.perf_counter()
    ids = tok.encode(text)
    dt = time.perf_counter() - t0
    assert tok.decode(ids) == text
    assert dt < 2.0, "encode of %d bytes took %.2f s" % (len(text.encode()), dt)


def _write(tmp_path, obj, name="t.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return str(p)


def _base():
    return json.load(open(BPE, encoding="utf-8"))


@pytest.mark.parametrize("mutate, status, needle", [
    (lambda j: "{\"model\": ", "QF_ERR_FORMAT", "not valid JSON"),
    (lambda j: json.dumps(j)[:5000], "QF_ERR_FORMAT", "not valid JSON"),
    (lambda j: "[1, 2]", "QF_ERR_FORMAT", "not a JSON object"),
    (lambda j: {k: v for k, v in j.items() if k != "model"}, "QF_ERR_FORMAT", "no \"model\" key"),
    (lambda j: dict(j, model=dict(j["model"], type="Unigram")), "QF_ERR_UNSUPPORTED",
     "model.type \"Unigram\" is not supported"),
    (lambda j: dict(j, model=dict(j["model"], merges=j["model"]["merges"] + [["Ġ", "zzzq"]])),
     "QF_ERR_FORMAT", "model.merges[340] (\"Ġ\" \"zzzq\"): \"zzzq\" is not in model.vocab"),
    (lambda j: dict(j, model=dict(j["model"], merges=["a b c"])), "QF_ERR_FORMAT",
     "model.merges[0] = \"a b c\" is not two tokens"),
    (lambda j: dict(j, model=dict(j["model"], vocab=dict(j["model"]["vocab"], zz=-3))),
     "QF_ERR_FORMAT", "model.vocab id of \"zz\" is -3"),
    (lambda j: dict(j, model=dict(j["model"], vocab=dict(j["model"]["vocab"], zz=5))),
     "QF_ERR_FORMAT", "model.vocab gives id 5 to both"),
    (lambda j: dict(j, model=dict(j["model"], vocab="x")), "QF_ERR_FORMAT",
     "model.vocab is a string"),
    (lambda j: dict(j, normalizer={"type": "Lowercase"}), "QF_ERR_UNSUPPORTED",
     "normalizer \"Lowercase\" is not supported"),
    (lambda j: dict(j, pre_tokenizer={"type": "Metaspace"}), "QF_ERR_UNSUPPORTED",
     "pre_tokenizer \"Metaspace\" is not supported"),
    (lambda j: dict(j, pre_tokenizer={"type": "Split", "pattern": {"Regex": "(ab"},
                                      "behavior": "Isolated"}),
     "QF_ERR_FORMAT", "regex does not compile at offset"),
    (lambda j: dict(j, pre_tokenizer={"type": "Split", "pattern": {"Regex": "a"},
                                      "behavior": "Sideways"}),
     "QF_ERR_FORMAT", "Split.behavior is \"Sideways\""),
    (lambda j: dict(j, added_tokens=j["added_tokens"] + [dict(j["added_tokens"][0], content="<x>")]),
     "QF_ERR_FORMAT", "share id 0"),
    (lambda j: dict(j, added_tokens=[dict(j["added_tokens"][1], id=7)]), "QF_ERR_FORMAT",
     "\"<image>\" has id 7 but model.vocab gives it id 1"),
    (lambda j: dict(j, decoder={"type": "Metaspace"}), "QF_ERR_UNSUPPORTED",
     "decoder \"Metaspace\" is not supported"),
    (lambda j: dict(j, model=dict(j["model"], unk_token="<nope>")), "QF_ERR_FORMAT",
     "model.unk_token \"<nope>\" is not in model.vocab"),
    (lambda j: dict(j, model=dict(j["model"], dropout=0.1)), "QF_ERR_UNSUPPORTED", "dropout"),
])
def test_load_errors(tmp_path, mutate, status, needle):
    path = _write(tmp_path, mutate(_base()))
    with pytest.raises(QfuseError) as e:
        Tokenizer(path)
    assert e.value.status == status, e.value.message
    assert needle in e.value.message, e.value.message
    assert path in e.value.message


def test_missing_file(tmp_path):
    with pytest.raises(QfuseError) as e:
        Tokenizer(str(tmp_path / "absent.json"))
    assert e.value.status == "QF_ERR_IO" and "absent.json" in e.value.message
