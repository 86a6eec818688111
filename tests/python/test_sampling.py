"""test_sampling.py - qfuse.sampling (src/models/sampler.c, src/io/text_stream.c) against real
references.

sample_token: the processed logits are compared with a torch 1.13 transcription of
transformers' processors (src/transformers/generation/logits_process.py, huggingface/transformers
main: RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper with min_tokens_to_keep=1), applied in generate's order (penalty, then, when
sampling, temperature, top-k, top-p). One deliberate deviation, written where it happens: the
top-p sort uses stable=True, so ties are ordered by id (torch's default CPU sort is not stable,
which leaves tie order unspecified). Cases whose top-p decision lies within float32 rounding of
the threshold are re-drawn (qfuse sums in double, torch in float32: either answer is right).
Draws: reproducible per (seed, counter), and a chi-square goodness-of-fit test of many draws
against softmax(processed logits) from the reference, with its false-failure probability fixed
at 1e-6 (and seeds fixed, so it cannot flake); the same statistic must reject a slightly wrong
distribution, so the test has power.

TextStream: against Tokenizer.decode of the whole id sequence (itself checked against the
`tokenizers` library in test_tokenizer.py) on the tokenizer fixtures, incl. the null-decoder
variant (fallback.json: tokens joined by spaces) and random ids that split UTF-8 characters.
"""
import os
import random

import numpy as np
import pytest
import torch

from qfuse import QfuseError
from qfuse.sampling import TextStream, sample_token
from qfuse.tokenizer import Tokenizer

QUICK = os.environ.get("QFUSE_TEST_QUICK", "") not in ("", "0")
FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
TOKENIZERS = [os.path.join(FIX, "tokenizer_bpe", "tokenizer.json")] + [
    os.path.join(FIX, "tokenizer_variants", n + ".json") for n in ("qwen2", "llama3", "flags", "fallback")]
NEG_INF = float("-inf")


# ---- reference: transformers' processors, line by line (torch) --------------------------------

def ref_repetition_penalty(input_ids, scores, penalty):
    # RepetitionPenaltyLogitsProcessor.__call__ (2-D scores, normalize=False)
    score = torch.gather(scores, 1, input_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    scores_processed = scores.scatter(1, input_ids, score)
    return scores_processed


def ref_temperature(scores, temperature):
    # TemperatureLogitsWarper.__call__
    return scores / temperature


def ref_top_k(scores, top_k, min_tokens_to_keep=1):
    # TopKLogitsWarper.__init__ / __call__
    top_k = max(top_k, min_tokens_to_keep)
    top_k = min(top_k, scores.size(-1))
    indices_to_remove = scores < torch.topk(scores, top_k)[0][..., -1, None]
    return scores.masked_fill(indices_to_remove, NEG_INF)


def ref_top_p(scores, top_p, min_tokens_to_keep=1):
    # TopPLogitsWarper.__call__; stable=True is the one change (see the module docstring)
    sorted_logits, sorted_indices = torch.sort(scores, descending=False, stable=True)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -min_tokens_to_keep:] = 0
    indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
    # how close the decision came to the threshold (for re-drawing ambiguous cases)
    margin = float((cumulative_probs.double() - (1 - top_p)).abs().min())
    return scores.masked_fill(indices_to_remove, NEG_INF), margin


def ref_process(logits, history, do_sample, temperature, top_k, top_p, penalty):
    """transformers' generate: processors only where they are not the identity."""
    scores = torch.from_numpy(np.array(logits, np.float32))[None].clone()
    margin = 1.0
    if penalty != 1.0 and len(history):
        scores = ref_repetition_penalty(torch.tensor(history, dtype=torch.int64)[None], scores, penalty)
    if do_sample:
        if temperature != 1.0:
            scores = ref_temperature(scores, temperature)
        if top_k != 0:
            scores = ref_top_k(scores, top_k)
        if top_p < 1.0:
            scores, margin = ref_top_p(scores, top_p)
    return scores[0].numpy(), margin


def f32(x):
    return float(np.float32(x))


def random_logits(rng, V, ties, neg_inf):
    if ties:  # few distinct values: many ties, also at the top-k / top-p boundaries
        x = rng.integers(-6, 7, size=V).astype(np.float32) * np.float32(0.75)
    else:
        x = (rng.standard_normal(V) * 2.5).astype(np.float32)
    if neg_inf:
        x[rng.random(V) < 0.25] = NEG_INF
        x[rng.integers(V)] = np.float32(rng.standard_normal())  # at least one finite
    return x


def assert_same_logits(got, ref, what):
    assert got.dtype == np.float32 and got.shape == ref.shape
    gi, ri = np.isneginf(got), np.isneginf(ref)
    bad = np.nonzero(gi != ri)[0]
    assert bad.size == 0, "%s: -inf pattern differs at ids %s (qfuse %s, reference %s)" % (
        what, bad[:10], got[bad[:10]], ref[bad[:10]])
    np.testing.assert_array_equal(got[~gi], ref[~ri], err_msg=what)


# ---- processed logits, every combination ------------------------------------------------------

COMBOS = [(do_sample, t, k, p, pen)
          for do_sample in (False, True)
          for t in (1.0, 0.7, 1.6)
          for k in (0, 1, 7, 180, 1000)  # 180: more than the finite entries when -inf is mixed in
          for p in (1.0, 0.9, 0.35)
          for pen in (1.0, 1.3, 0.8)]


@pytest.mark.parametrize("ties,neg_inf", [(False, False), (True, False), (False, True), (True, True)])
def test_processed_logits_match_transformers(ties, neg_inf):
    rng = np.random.default_rng(1234 + 2 * ties + neg_inf)
    V = 200
    combos = COMBOS[::5] if QUICK else COMBOS
    checked = redrawn = 0
    for (do_sample, t, k, p, pen) in combos:
        t, p, pen = f32(t), f32(p), f32(pen)
        for attempt in range(20):
            x = random_logits(rng, V, ties, neg_inf)
            hist = rng.integers(0, V, size=int(rng.integers(0, 30))).tolist()
            hist += hist[:3]  # repeated ids: penalized once
            ref, margin = ref_process(x, hist, do_sample, t, k, p, pen)
            if margin > 1e-5:
                break
            redrawn += 1
        else:
            pytest.fail("no unambiguous case in 20 draws")
        seed = int(rng.integers(2**63))
        got_id, got = sample_token(x, do_sample=do_sample, temperature=t, top_k=k, top_p=p,
                                   repetition_penalty=pen, seed=seed, counter=checked, history=hist)
        what = "do_sample=%s t=%g k=%d p=%g pen=%g" % (do_sample, t, k, p, pen)
        assert_same_logits(got, ref, what)
        if not do_sample:
            assert got_id == int(torch.argmax(torch.from_numpy(ref))), what
        else:
            assert np.isfinite(ref[got_id]), what + ": drew a removed token"
        checked += 1
    assert redrawn < checked  # the re-draw rule must not hollow out the test


def test_greedy_ties_pick_lowest_id():
    x = np.array([0.5, 2.0, -1.0, 2.0, 2.0], np.float32)
    assert sample_token(x)[0] == 1
    # after the penalty id 1 drops below the others: argmax among the rest, lowest id
    assert sample_token(x, repetition_penalty=1.5, history=[1])[0] == 3
    x = np.array([NEG_INF, NEG_INF, -3.0, NEG_INF], np.float32)
    assert sample_token(x)[0] == 2


def test_top_p_exact_boundary():
    # four equal tokens: the ascending cumsum is exactly 0.25, 0.5, 0.75, 1 in float32 and in
    # double, so "c <= 1 - top_p" is decided by the equality itself; of the ties the lowest ids go
    for p, kept in ((0.75, [1, 2, 3]), (0.5, [2, 3]), (0.25, [3]), (0.125, [3])):
        x = np.array([0, 0, NEG_INF, 0, 0], np.float32)
        ref, _ = ref_process(x, [], True, 1.0, 0, p, 1.0)
        _, got = sample_token(x, do_sample=True, top_p=p)
        assert_same_logits(got, ref, "top_p=%g" % p)
        assert list(np.nonzero(np.isfinite(got))[0]) == [[0, 1, 3, 4][i] for i in kept]


def test_large_vocab_top_k_top_p():
    rng = np.random.default_rng(7)
    V = 152064
    for (k, p) in ((50, 0.9), (0, 0.95), (40, 1.0), (0, 1.0)):
        x = (rng.standard_normal(V) * 3).astype(np.float32)
        hist = rng.integers(0, V, size=64).tolist()
        ref, margin = ref_process(x, hist, True, f32(0.8), k, f32(p), f32(1.1))
        assert margin > 1e-7
        got_id, got = sample_token(x, do_sample=True, temperature=0.8, top_k=k, top_p=p,
                                   repetition_penalty=1.1, seed=5, counter=11, history=hist)
        assert_same_logits(got, ref, "V=%d k=%d p=%g" % (V, k, p))
        assert np.isfinite(ref[got_id])


# ---- draws ---------------------------------------------------------------------------------

def test_draw_reproducible_and_counter_dependent():
    x = np.zeros(1000, np.float32)  # uniform: collisions between counters are rare
    a = [sample_token(x, do_sample=True, seed=42, counter=c)[0] for c in range(100)]
    b = [sample_token(x, do_sample=True, seed=42, counter=c)[0] for c in range(100)]
    assert a == b
    assert len(set(a)) >= 85  # ~95 expected for 100 draws from 1000
    c = [sample_token(x, do_sample=True, seed=43, counter=i)[0] for i in range(100)]
    assert sum(u != v for u, v in zip(a, c)) >= 85
    # the draw does not depend on anything but (seed, counter) and the logits
    assert sample_token(x.copy(), do_sample=True, seed=42, counter=7, history=[])[0] == a[7]


def chi2_pvalue(counts, probs):
    """Upper tail of Pearson's statistic: P(chi2_df >= stat), df = categories - 1."""
    n = counts.sum()
    expected = probs * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(probs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64))), stat


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.85)])
def test_draw_frequencies_match_softmax(t, k, p):
    rng = np.random.default_rng(99)
    V = 24
    x = (rng.standard_normal(V) * 1.2).astype(np.float32)
    x[3] = NEG_INF
    t, p = f32(t), f32(p)
    ref, margin = ref_process(x, [], True, t, k, p, 1.0)
    assert margin > 1e-4
    probs = torch.softmax(torch.from_numpy(ref).double(), 0).numpy()
    kept = np.nonzero(probs > 0)[0]
    N = 8000 if QUICK else 40000
    counts = np.zeros(V, np.int64)
    for c in range(N):
        counts[sample_token(x, do_sample=True, temperature=t, top_k=k, top_p=p, seed=2024, counter=c)[0]] += 1
    assert counts[probs == 0].sum() == 0, "drew removed tokens"
    # pool the rarest categories until each group expects >= 5 draws (chi-square's usual rule)
    order = kept[np.argsort(probs[kept])]
    group, g, acc = np.zeros(V, np.int64), 0, 0.0
    for i in order:
        group[i] = g
        acc += probs[i]
        if acc * N >= 5:
            g, acc = g + 1, 0.0
    if acc > 0 and g > 0:
        group[group == g] = g - 1  # a short last group joins the one before
    ng = int(group[kept].max()) + 1

    def pooled(v):
        return np.bincount(group[kept], weights=np.asarray(v, np.float64)[kept], minlength=ng)

    pval, stat = chi2_pvalue(pooled(counts), pooled(probs))
    assert pval > 1e-6, "chi2 = %.1f (df %d), p-value %.2e" % (stat, ng - 1, pval)
    # power: the same counts against a slightly wrong distribution (logits 40% sharper) must fail
    wrong = torch.softmax(torch.from_numpy(ref).double() * 1.4, 0).numpy()
    assert ng > 2
    assert chi2_pvalue(pooled(counts), pooled(wrong))[0] < 1e-6


def test_sampling_errors_name_the_field():
    x = np.zeros(8, np.float32)
    cases = [
        (dict(temperature=0.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(history=[1, 8]), "history[1] = 8"), (dict(history=[-1]), "history[0] = -1"),
    ]
    for kw, needle in cases:
        with pytest.raises(QfuseError) as e:
            sample_token(x, do_sample=True, **kw)
        assert needle in str(e.value), (kw, str(e.value))
        assert e.value.status == "QF_ERR_ARG"
    for i, v in ((5, float("nan")), (2, float("inf"))):
        y = x.copy()
        y[i] = v
        with pytest.raises(QfuseError) as e:
            sample_token(y, do_sample=True)
        assert "logits[%d]" % i in str(e.value) and e.value.status == "QF_ERR_NONFINITE"
    with pytest.raises(QfuseError, match="-inf"):
        sample_token(np.full(4, NEG_INF, np.float32))
    with pytest.raises(QfuseError, match=r"\+inf"):  # 3e38 / 0.5 overflows
        sample_token(np.array([3e38, 0], np.float32), do_sample=True, temperature=0.5)


# ---- TextStream ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=TOKENIZERS, ids=lambda p: os.path.basename(p))
def tok(request):
    with Tokenizer(request.param) as t:
        yield t


def valid_ids(t):
    return [i for i in range(t.id_limit) if t.id_to_token(i) is not None]


def stream_all(t, ids, stop=(), skip=True):
    ts = TextStream(t, stop=stop, skip_special_tokens=skip)
    pieces, stopped_at = [], None
    for k, i in enumerate(ids):
        text, stopped = ts.push(i)
        pieces.append(text)
        if stopped and stopped_at is None:
            stopped_at = k
    pieces.append(ts.flush())
    ts.close()
    return pieces, stopped_at


def texts():
    return ["Hello 你好 world 😀!", "naïve café — déjà vu", "a\nb\tc  d", "<image> describe <audio> it",
            "日本語のテキストと English mixed 🎉🎉", "x" * 40 + " ü ü ü"]


def test_stream_equals_decode_prefix_by_prefix(tok):
    rng = random.Random(5)
    ids_all = valid_ids(tok)
    seqs = [tok.encode(s) for s in texts()]
    seqs += [[rng.choice(ids_all) for _ in range(rng.randint(1, 60))] for _ in range(8 if QUICK else 40)]
    for ids in seqs:
        for skip in (True, False):
            ts = TextStream(tok, skip_special_tokens=skip)
            got = ""
            for k, i in enumerate(ids):
                text, stopped = ts.push(i)
                assert not stopped
                got += text
                # everything final is out: the decode of the prefix, less an unfinished char
                ref = tok.decode(ids[:k + 1], skip_special_tokens=skip)
                assert got in (ref, ref[:-1] if ref.endswith("\ufffd") else ref), (ids[:k + 1], got, ref)
            got += ts.flush()
            assert got == tok.decode(ids, skip_special_tokens=skip), ids


def byte_token_ids(t, data):
    """Ids of the single-byte byte-level tokens spelling `data` (GPT-2's byte -> char table)."""
    table, n = {}, 0
    for b in range(256):
        printable = 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF
        table[b] = chr(b) if printable else chr(256 + n)
        n += 0 if printable else 1
    return [t.token_to_id(table[b]) for b in data]


def test_multibyte_char_split_across_tokens():
    with Tokenizer(TOKENIZERS[0]) as t:
        ids = byte_token_ids(t, "A你😀".encode("utf-8"))
        assert None not in ids and len(ids) == 8
        ts = TextStream(t)
        got = [ts.push(i)[0] for i in ids]
        assert got == ["A", "", "", "你", "", "", "", "😀"]
        assert ts.flush() == ""
        # an unfinished character at the end: flush gives decode's U+FFFD
        ts.push(ids[1])
        assert ts.push(ids[2]) == ("", False)
        assert ts.flush() == "\ufffd" == t.decode(ids[1:3])


def test_stop_strings(tok):
    rng = random.Random(11)
    base = ["the cat sat on the mat. User: hi", "abcabcabd 你好吗 stop!", "a\nUser: b\nUser: c"]
    cases = []
    for s in base:
        full = tok.decode(tok.encode(s, add_special_tokens=False), skip_special_tokens=True)
        for _ in range(6):  # substrings of the decoded text: they always hit
            i = rng.randrange(len(full))
            j = min(len(full), i + rng.randint(1, 6))
            cases.append((s, [full[i:j]]))
        cases.append((s, ["zzz"]))                 # never occurs
        cases.append((s, ["User:", "at", "好吗"]))  # several: the earliest wins
        cases.append((s, ["abd", "cabx"]))         # a held prefix that does not complete
    stopped_any = 0
    for s, stops in cases:
        ids = tok.encode(s, add_special_tokens=False)
        full = tok.decode(ids, skip_special_tokens=True)
        hits = [full.find(st) for st in stops if full.find(st) >= 0]
        want = full[:min(hits)] if hits else full
        pieces, stopped_at = stream_all(tok, ids, stops)
        assert "".join(pieces) == want, (s, stops, pieces)
        if hits:
            stopped_any += 1
            # stopped at the first id whose decoded prefix holds a stop string
            k = next(k for k in range(len(ids))
                     if any(st in tok.decode(ids[:k + 1], skip_special_tokens=True) for st in stops))
            assert stopped_at == k, (s, stops)
            assert all(p == "" for p in pieces[k + 1:])  # nothing after the stop
        else:
            assert stopped_at is None
    assert stopped_any >= len(cases) // 2


def test_stop_spanning_token_boundaries_random(tok):
    rng = random.Random(3)
    ids_all = valid_ids(tok)
    for _ in range(10 if QUICK else 60):
        ids = [rng.choice(ids_all) for _ in range(rng.randint(2, 40))]
        full = tok.decode(ids, skip_special_tokens=True)
        clean = full.replace("\ufffd", "")
        if len(clean) < 3:
            continue
        i = rng.randrange(len(clean) - 2)
        stop = clean[i:i + rng.randint(2, 5)]
        if "\ufffd" in stop or not stop.strip("\x00"):
            continue
        pieces, stopped_at = stream_all(tok, ids, [stop])
        cut = full.find(stop)
        want = full[:cut] if cut >= 0 else full
        assert "".join(pieces) == want, (ids, stop)


def test_stream_errors_and_reset():
    with Tokenizer(TOKENIZERS[0]) as t:
        with pytest.raises(QfuseError, match="stop\\[1\\] is empty"):
            TextStream(t, stop=["x", ""])
        ts = TextStream(t, stop=["lo w"])
        ids = t.encode("hello world", add_special_tokens=False)
        got = ts.push(ids[0])[0]
        with pytest.raises(QfuseError, match="names no token"):
            ts.push(100000)
        with pytest.raises(QfuseError):
            ts.push(-1)
        for i in ids[1:]:
            got += ts.push(i)[0]
        assert ts.stopped and got == "hel"
        assert ts.push(ids[0]) == ("", True)  # ids after a stop are ignored
        assert ts.flush() == ""
        # flush starts a new sequence
        got = "".join(ts.push(i)[0] for i in ids[:2]) + ts.flush()
        assert got == t.decode(ids[:2])
        ts.push(ids[0])
        ts.reset()
        assert "".join(ts.push(i)[0] for i in ids[2:3]) + ts.flush() == t.decode(ids[2:3])
