"""Tests for longctx.train.data (tokenizers, token files, samplers) and longctx.eval.passkey."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from longctx.eval import passkey as pk
from longctx.train import data as D

TOK = D.ByteTokenizer()
KEYS = ("input_ids", "labels", "positions", "doc_ids")


# ------------------------------------------------------------------------------- helpers


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def corpus(tmp_path):
    """A token file of many short documents of varied length (prefix, list of texts)."""
    rng = np.random.default_rng(0)
    texts = []
    for i in range(60):
        n = int(rng.integers(1, 40))
        texts.append("".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)))
    for i, t in enumerate(texts):
        _write(str(tmp_path / "in" / f"doc{i:03d}.txt"), t)
    prefix = str(tmp_path / "out" / "corpus")
    D.prepare_token_file([str(tmp_path / "in")], prefix, progress=False)
    return prefix, texts


def _sampler(prefix, **kw):
    args = dict(seq_len=16, micro_batch_size=4, seed=7)
    args.update(kw)
    return D.PackedSampler(prefix, **args)


# ------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_non_ascii():
    text = "héllo wörld — 日本語 🚀\n"
    ids = TOK.encode(text)
    assert ids.dtype == np.int64
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert TOK.decode(ids) == text


def test_byte_tokenizer_decode_drops_specials_and_replaces_bad_bytes():
    ids = np.concatenate([TOK.encode("ab"), [TOK.eos_id, TOK.pad_id, TOK.landmark_id], [0xFF]])
    assert TOK.decode(ids) == "ab\ufffd"
    assert (TOK.eos_id, TOK.pad_id, TOK.landmark_id, TOK.vocab_size) == (256, 257, 258, 259)


def test_load_tokenizer_missing_path():
    assert D.load_tokenizer("byte").name == "byte"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        D.load_tokenizer("nope.json")


def test_hf_tokenizer_without_package_names_pip(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(ImportError, match="pip install tokenizers"):
        D.HFTokenizer(str(tmp_path / "tokenizer.json"))


def test_hf_tokenizer_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers, decoders

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([D.synthetic_text(0, 20000)], trainer)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    hf = D.load_tokenizer(path)
    assert hf.eos_id == tok.token_to_id("</s>")
    assert hf.landmark_id == hf.vocab_size - 1
    assert hf.decode(hf.encode("The old farmer sees a dog.")) == "The old farmer sees a dog."


# ------------------------------------------------------------------------------- token files


def test_prepare_round_trip(tmp_path):
    _write(str(tmp_path / "in" / "b.txt"), "second doc")
    _write(str(tmp_path / "in" / "a" / "z.md"), "first: é")
    _write(str(tmp_path / "in" / "skip.json"), "{}")  # not *.txt / *.md: ignored
    _write(str(tmp_path / "extra.dat"), "third")  # named explicitly: included
    prefix = str(tmp_path / "tok")
    meta = D.prepare_token_file([str(tmp_path / "in"), str(tmp_path / "extra.dat")], prefix,
                                progress=False)
    docs = ["first: é", "second doc", "third"]  # sorted paths: in/a/z.md < in/b.txt
    expected = np.concatenate([np.append(TOK.encode(d), TOK.eos_id) for d in docs])

    tf = D.TokenFile(prefix, verify=True)
    assert tf.tokens.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert os.path.getsize(prefix + ".bin") == 2 * len(expected)
    assert np.array_equal(tf.read(0, tf.n_tokens), expected)
    lengths = [len(TOK.encode(d)) + 1 for d in docs]
    assert tf.doc_starts.tolist() == [0, lengths[0], lengths[0] + lengths[1]]
    assert (tf.n_tokens, tf.eos_id, tf.vocab_size) == (len(expected), 256, 259)
    assert meta == json.load(open(prefix + ".json"))
    assert meta["format"] == "longctx-tokens-v1" and meta["n_docs"] == 3
    assert np.array_equal(tf.read(3, 7), expected[3:7]) and tf.read(3, 7).dtype == np.int64
    with pytest.raises(ValueError, match="outside"):
        tf.read(0, tf.n_tokens + 1)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temporaries left


def test_prepare_refuses_no_inputs_and_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files"):
        D.prepare_token_file([str(tmp_path / "empty")], str(tmp_path / "t"), progress=False)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        D.prepare_token_file([str(tmp_path / "missing.txt")], str(tmp_path / "t"), progress=False)

    _write(str(tmp_path / "a.txt"), "one")
    prefix = str(tmp_path / "t")
    D.prepare_token_file([str(tmp_path / "a.txt")], prefix, progress=False)
    _write(str(tmp_path / "a.txt"), "longer text")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        D.prepare_token_file([str(tmp_path / "a.txt")], prefix, progress=False)
    assert D.TokenFile(prefix).n_tokens == 4  # untouched
    D.prepare_token_file([str(tmp_path / "a.txt")], prefix, progress=False, overwrite=True)
    assert D.TokenFile(prefix, verify=True).n_tokens == 12


def test_prepare_rejects_invalid_utf8(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match="bad.txt.*UTF-8"):
        D.prepare_token_file([str(tmp_path / "bad.txt")], str(tmp_path / "t"), progress=False)
    assert not os.path.exists(str(tmp_path / "t.json"))


def test_token_file_missing_and_corrupt(corpus):
    prefix, _ = corpus
    with pytest.raises(FileNotFoundError, match=r"nothere\.bin.*longctx data prepare"):
        D.TokenFile(prefix + "-nothere")

    with open(prefix + ".bin", "rb") as f:
        raw = f.read()
    with open(prefix + ".bin", "wb") as f:  # truncated: size no longer n_tokens * 2
        f.write(raw[:-2])
    with pytest.raises(ValueError, match=r"corrupt.*re-run `longctx data prepare`"):
        D.TokenFile(prefix)

    flipped = bytearray(raw)
    flipped[10] ^= 1
    with open(prefix + ".bin", "wb") as f:  # same size, different content
        f.write(bytes(flipped))
    D.TokenFile(prefix)  # size check passes without verify
    with pytest.raises(ValueError, match="sha256"):
        D.TokenFile(prefix, verify=True)

    with open(prefix + ".json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"corrupt.*longctx data prepare"):
        D.TokenFile(prefix)
    with open(prefix + ".json", "w") as f:
        json.dump({"format": "other"}, f)
    with pytest.raises(ValueError, match="format"):
        D.TokenFile(prefix)


# ------------------------------------------------------------------------------- packed sampler


def test_packed_sampler_determinism(corpus):
    prefix, _ = corpus
    a, b = _sampler(prefix), _sampler(prefix)
    b.batch(5)  # history must not matter
    x, y = a.batch(3, micro=1, grad_accum=2), b.batch(3, micro=1, grad_accum=2)
    for k in KEYS:
        assert x[k].dtype == torch.int64 and x[k].shape == (4, 16)
        assert torch.equal(x[k], y[k])
    assert not torch.equal(a.batch(4)["input_ids"], x["input_ids"])
    assert not torch.equal(_sampler(prefix, seed=8).batch(3, 1, 2)["input_ids"], x["input_ids"])


def test_packed_sampler_labels_are_shifted_inputs(corpus):
    prefix, _ = corpus
    s = _sampler(prefix)
    tf = D.TokenFile(prefix)
    batch = s.batch(2)
    assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    for i, w in enumerate(s.windows(2)):  # and both come from window w of the stream
        window = tf.read(w * 16, w * 16 + 17)
        assert batch["input_ids"][i].tolist() == window[:-1].tolist()
        assert batch["labels"][i].tolist() == window[1:].tolist()
        assert batch["positions"][i].tolist() == list(range(16))


def test_packed_sampler_dp_ranks_disjoint_within_epoch(corpus):
    prefix, _ = corpus
    ranks = [_sampler(prefix, micro_batch_size=2, dp_rank=r, dp_size=3) for r in range(3)]
    W = ranks[0].n_windows
    per_step = 2 * 3
    seen = [w for step in range(W // per_step) for s in ranks for w in s.windows(step)]
    assert len(seen) == len(set(seen))  # no window twice within the epoch
    # A full epoch (g = 0..W-1) visits every window exactly once.
    assert sorted(ranks[0]._permutation(0).tolist()) == list(range(W))
    assert not np.array_equal(ranks[0]._permutation(0), ranks[0]._permutation(1))


def test_packed_sampler_sp_shards_concat_to_full(corpus):
    prefix, _ = corpus
    full = _sampler(prefix).batch(1, micro=1, grad_accum=3)
    shards = [_sampler(prefix, sp_rank=r, sp_size=4).batch(1, micro=1, grad_accum=3)
              for r in range(4)]
    for k in KEYS:
        assert shards[0][k].shape == (4, 4)
        assert torch.equal(torch.cat([s[k] for s in shards], dim=1), full[k]), k



@pytest.mark.parametrize("P, layout, ulysses", [(3, "contiguous", 1), (3, "zigzag", 1), (4, "zigzag", 2),
                                                (2, "zigzag", 1)])
def test_packed_sampler_layouts_pad_and_reassemble(corpus, P, layout, ulysses):
    """Every layout's shards, put back by their global positions, give the unsharded batch;
    padding (seq_len 16 does not divide into 2P = 6 pieces at P=3) has no labels, positions
    past the end and a document of its own."""
    prefix, _ = corpus
    full = _sampler(prefix).batch(2, micro=0, grad_accum=1)
    T = full["input_ids"].shape[1]
    shards = [_sampler(prefix, sp_rank=r, sp_size=P, layout=layout, ulysses=ulysses).batch(2, micro=0, grad_accum=1)
              for r in range(P)]
    assert len({s["input_ids"].shape for s in shards}) == 1  # equal shard lengths (the all-to-all needs them)
    seen = torch.zeros(T, dtype=torch.long)
    for s in shards:
        pos = s["positions"][0]
        real = pos < T
        for k in KEYS:
            assert torch.equal(s[k][:, real], full[k][:, pos[real]]), k
        assert (s["labels"][:, ~real] == -100).all()
        assert (s["doc_ids"][:, ~real] == full["doc_ids"][:, -1:] + 1).all()
        seen[pos[real]] += 1
    assert (seen == 1).all()  # each real token on exactly one rank


def test_packed_sampler_doc_ids_step_after_eos(corpus):
    prefix, _ = corpus
    s = _sampler(prefix, micro_batch_size=8)
    n_eos = 0
    for step in range(3):
        b = s.batch(step)
        ids, doc = b["input_ids"].numpy(), b["doc_ids"].numpy()
        assert (doc[:, 0] == 0).all()
        is_eos = ids[:, :-1] == TOK.eos_id
        step_up = np.diff(doc, axis=1)
        assert (step_up == is_eos).all()  # +1 exactly after each eos, 0 elsewhere
        n_eos += is_eos.sum()
    assert n_eos > 10  # the test data really crosses documents


def test_packed_sampler_errors_and_state(corpus):
    prefix, _ = corpus
    n = D.TokenFile(prefix).n_tokens
    with pytest.raises(ValueError, match=rf"seq_len={n}.*n_tokens={n}"):
        _sampler(prefix, seq_len=n)
    s = _sampler(prefix)
    s.advance(9)
    state = s.state_dict()
    assert state == {"seed": 7, "seq_len": 16, "consumed_steps": 10}
    t = _sampler(prefix)
    t.load_state_dict(state)
    assert t.consumed_steps == 10
    with pytest.raises(ValueError, match=r"seed=7.*seed=8"):
        _sampler(prefix, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seq_len=16.*seq_len=8"):
        _sampler(prefix, seq_len=8).load_state_dict(state)
    with pytest.raises(ValueError, match="micro=2"):
        s.batch(0, micro=2, grad_accum=2)


# ------------------------------------------------------------------------------- synthetic corpus


def test_synthetic_text_deterministic_by_seed():
    a = D.synthetic_text(3, 20000)
    assert len(a) == 20000 and a == D.synthetic_text(3, 20000)
    assert a != D.synthetic_text(4, 20000)
    assert D.synthetic_text(3, 5000) == a[:5000]
    assert a.count("\n\n") > 10 and a.isascii()
    words = set(a.replace("\n", " ").replace(".", " ").replace(",", " ").split())
    assert 100 < len(words) < 1000  # a small vocabulary, but not a trivial one


def _make_synthetic(cache_dir):
    D.ensure_synthetic_token_file(cache_dir, 1, 5000)


def test_ensure_synthetic_token_file(tmp_path):
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_make_synthetic, args=(cache,)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    prefix = D.ensure_synthetic_token_file(cache, 1, 5000)
    assert prefix == os.path.join(cache, "synthetic-s1-n5000")
    tf = D.TokenFile(prefix, verify=True)
    assert tf.n_tokens == 5000 and tf.read(4999, 5000)[0] == TOK.eos_id
    eos_pos = np.flatnonzero(tf.read(0, 5000) == TOK.eos_id)
    assert tf.doc_starts.tolist() == [0] + (eos_pos[:-1] + 1).tolist()
    first_doc = TOK.decode(tf.read(0, tf.doc_starts[1] - 1))
    assert first_doc == D.synthetic_text(1, 5000).split("\n\n")[0]
    assert not [n for n in os.listdir(cache) if ".tmp-" in n]


# ------------------------------------------------------------------------------- passkey


def test_passkey_prompt_depth():
    rng = np.random.default_rng(0)
    for depth, n_before in [(0.0, 0), (0.5, 5), (1.0, 10), (0.34, 3)]:
        text, key = pk.passkey_prompt(rng, 10, depth)
        assert 1 <= key <= 50000
        key_sentence = pk.KEY_SENTENCE.format(N=key)
        assert text.startswith(pk.INSTRUCTION) and text.endswith(pk.QUESTION)
        before, after = text.split(key_sentence)
        assert before.count(pk.FILLER) == n_before and after.count(pk.FILLER) == 10 - n_before
    with pytest.raises(ValueError, match="depth=1.5"):
        pk.passkey_prompt(rng, 10, 1.5)


def test_passkey_sample_fills_length():
    rng = np.random.default_rng(1)
    s = pk.passkey_sample(TOK, rng, 2000, 0.3)
    total = len(s["prompt_ids"]) + len(s["answer_ids"])
    assert total <= 2000
    assert total > 2000 - len(TOK.encode(" " + pk.FILLER))  # one more filler would not fit
    assert TOK.decode(s["answer_ids"]) == f" {s['passkey']}"
    assert str(s["passkey"]) in TOK.decode(s["prompt_ids"])
    with pytest.raises(ValueError, match="length=50"):
        pk.passkey_sample(TOK, rng, 50, 0.3)


class _CurvedTokenizer:
    """Token counts that grow with the filler count but not in proportion (monotone): the filler
    search's first guess is too high for long prompts ("curved": each filler costs more the more
    there are) or too low ("flat": fillers after the first cost less, as a subword tokenizer's
    merges)."""

    def __init__(self, curved: bool):
        self.curved = curved

    def encode(self, text: str):
        f = text.count("green")
        n = len(text) // 7 + (f * f // 40 if self.curved else -(len(pk.FILLER) // 7 - 3) * max(0, f - 1))
        return list(range(max(1, n)))


@pytest.mark.parametrize("tok_name", ["byte", "bpe", "curved", "flat"])
def test_max_fillers_is_the_largest_count_that_fits(tok_name):
    """The guessed-then-widened search gives the count a scan from 0 finds, for tokenizers whose
    fillers cost the same (bytes), merge across boundaries (BPE) or cost more / less the more
    there are (so the first guess is too high / too low)."""
    if tok_name == "bpe":
        tokenizers = pytest.importorskip("tokenizers")
        from tokenizers import models, pre_tokenizers, trainers
        bpe = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.train_from_iterator([pk.build_prompt(123, 40, 0.5)] * 5,
                                trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok = SimpleNamespace(encode=lambda t: bpe.encode(t).ids)
    else:
        tok = {"byte": TOK, "curved": _CurvedTokenizer(True), "flat": _CurvedTokenizer(False)}[tok_name]
    for length in (90, 300, 1100, 2500):
        for depth in (0.0, 0.37, 1.0):
            for key in (7, 4821, 50000):
                if pk._n_tokens(tok, key, 0, depth) > length:
                    continue
                scan = 0
                while pk._n_tokens(tok, key, scan + 1, depth) <= length:
                    scan += 1
                assert pk._max_fillers(tok, key, length, depth) == scan, (tok_name, length, depth, key)


def test_first_integer():
    assert pk.first_integer("  12345 is the key 7") == 12345
    assert pk.first_integer("no digits here") is None


def test_passkey_sampler_labels_only_answer_and_its_eos():
    s = D.PasskeySampler(TOK, seq_len=512, micro_batch_size=3, seed=5)
    b = s.batch(2)
    for k in KEYS:
        assert b[k].shape == (3, 512) and b[k].dtype == torch.int64
    assert torch.equal(b["input_ids"], s.batch(2)["input_ids"])
    assert not torch.equal(b["input_ids"], s.batch(3)["input_ids"])
    for i, g in enumerate(s.global_indices(2)):
        labels = b["labels"][i]
        kept = labels != -100
        answer = TOK.decode(labels[kept].numpy())
        assert pk.first_integer(answer) == s.sample(g)["passkey"] and answer.startswith(" ")
        assert kept.sum() == len(answer) + 1 and int(labels[kept][-1]) == TOK.eos_id  # the key, then eos
        # the kept labels are the next tokens of the inputs
        t = torch.nonzero(kept).flatten()
        assert torch.equal(b["input_ids"][i, t[1:]], labels[t[:-1]])
    assert (b["doc_ids"] == 0).all() and torch.equal(b["positions"][1], torch.arange(512))
    shards = [D.PasskeySampler(TOK, 512, 3, 5, sp_rank=r, sp_size=2).batch(2) for r in range(2)]
    for k in KEYS:
        assert torch.equal(torch.cat([sh[k] for sh in shards], 1), b[k])


def test_passkey_sampler_targets_all_labels_every_real_token():
    only = D.PasskeySampler(TOK, seq_len=300, micro_batch_size=2, seed=5)
    every = D.PasskeySampler(TOK, seq_len=300, micro_batch_size=2, seed=5, targets="all")
    a, b = only.batch(0), every.batch(0)
    assert torch.equal(a["input_ids"], b["input_ids"])
    ids, labels = b["input_ids"], b["labels"]
    real = torch.cat([ids[:, 1:], torch.full((2, 1), TOK.pad_id)], 1) != TOK.pad_id  # next token is not padding
    assert torch.equal(labels != -100, real)
    assert torch.equal(labels[:, :-1][real[:, :-1]], ids[:, 1:][real[:, :-1]])
    kept = a["labels"] != -100  # the answer is labelled the same in both
    assert torch.equal(a["labels"][kept], labels[kept])
    with pytest.raises(ValueError, match="passkey_targets='some'"):
        D.PasskeySampler(TOK, seq_len=300, micro_batch_size=2, seed=5, targets="some")


def test_passkey_sampler_min_len_varies_prompt_length():
    # fixed-length prompts let a model tie its copying to the question's position (it then fails
    # at every other length, and in landmark retrieval's short compressed contexts)
    fixed = D.PasskeySampler(TOK, seq_len=1200, micro_batch_size=40, seed=5)
    var = D.PasskeySampler(TOK, seq_len=1200, micro_batch_size=40, seed=5, min_len=300)
    def real_len(b):
        return (b["input_ids"] != TOK.pad_id).sum(1)
    filler = 100  # bytes of one filler sentence group, about: prompts fill up to it
    b = var.batch(0)
    n_fixed, n_var = real_len(fixed.batch(0)), real_len(b)
    assert int(n_fixed.min()) > 1200 - filler
    assert int(n_var.min()) >= 300 - filler and int(n_var.max()) <= 1200
    assert int(n_var.min()) < 500 and int(n_var.max()) > 1000  # spread over the range
    for row in range(40):  # the answer + eos are the labels, right before the padding
        lab = b["labels"][row][b["labels"][row] != -100]
        n = int(n_var[row])
        assert lab[-1] == TOK.eos_id and torch.equal(b["input_ids"][row, n - lab.numel():n], lab)
    for bad in (100, 1201):
        with pytest.raises(ValueError, match=f"data.passkey_min_len={bad}"):
            D.PasskeySampler(TOK, seq_len=1200, micro_batch_size=2, seed=5, min_len=bad)


# ------------------------------------------------------------------------------- make_sampler


def _cfg(**kw):
    base = dict(kind="synthetic", path=None, tokenizer="byte", seq_len=32, micro_batch_size=2,
                seed=3, synthetic_tokens=4000, cache_dir=None, passkey_targets="answer", passkey_min_len=0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_make_sampler_kinds(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "envcache"))
    s, vocab = D.make_sampler(_cfg(), TOK, 1, 2, 0, 1)
    assert isinstance(s, D.PackedSampler) and vocab == 259
    assert os.path.exists(str(tmp_path / "envcache" / "synthetic-s3-n4000.json"))
    s, _ = D.make_sampler(_cfg(cache_dir=str(tmp_path / "c")), None, 0, 1, 1, 2)
    assert s.batch(0)["input_ids"].shape == (2, 16)

    prefix, _ = corpus
    s, vocab = D.make_sampler(_cfg(kind="tokens", path=prefix), TOK, 0, 1, 0, 1)
    assert s.token_file.n_tokens == D.TokenFile(prefix).n_tokens
    with pytest.raises(ValueError, match="data.path"):
        D.make_sampler(_cfg(kind="tokens"), TOK, 0, 1, 0, 1)

    s, _ = D.make_sampler(_cfg(kind="passkey", seq_len=400), TOK, 0, 1, 0, 1)
    assert isinstance(s, D.PasskeySampler)
    with pytest.raises(ValueError, match="data.kind='bogus'"):
        D.make_sampler(_cfg(kind="bogus"), TOK, 0, 1, 0, 1)


@pytest.mark.parametrize("P, layout", [(1, "contiguous"), (3, "contiguous"), (2, "zigzag")])
def test_packed_sampler_inserts_landmarks(corpus, P, layout):
    """Landmark layout: position p holds the landmark id when p % (block + 1) == block, the
    window's regular tokens in order elsewhere; labels are the next position's token (landmarks
    included); shards reassemble to the unsharded batch."""
    prefix, _ = corpus
    block, T = 3, 18
    full = _sampler(prefix, seq_len=T, landmark_block=block, landmark_id=TOK.landmark_id).batch(1)
    ids, labels = full["input_ids"].numpy(), full["labels"].numpy()
    is_lm = np.arange(T) % (block + 1) == block
    assert (ids[:, is_lm] == TOK.landmark_id).all() and not (ids[:, ~is_lm] == TOK.landmark_id).any()
    assert (labels[:, :-1] == ids[:, 1:]).all()
    s = _sampler(prefix, seq_len=T, landmark_block=block, landmark_id=TOK.landmark_id)
    tf = s.token_file
    for row, w in enumerate(s.windows(1)):
        regular = tf.read(w * s.regular_len, w * s.regular_len + s.regular_len + 1)
        assert np.array_equal(ids[row, ~is_lm], regular[:s.regular_len])
        assert labels[row, -1] == (TOK.landmark_id if (T % (block + 1)) == block else regular[s.regular_len])
    shards = [_sampler(prefix, seq_len=T, landmark_block=block, landmark_id=TOK.landmark_id, sp_rank=r, sp_size=P,
                       layout=layout).batch(1) for r in range(P)]
    for sh in shards:
        pos = sh["positions"][0]
        real = pos < T
        for k in KEYS:
            assert torch.equal(sh[k][:, real], full[k][:, pos[real]]), k


def test_passkey_sampler_with_landmarks():
    block = 7
    s = D.PasskeySampler(TOK, seq_len=400, micro_batch_size=2, seed=3, landmark_block=block,
                         landmark_id=TOK.landmark_id)
    b = s.batch(0)
    ids, labels = b["input_ids"].numpy(), b["labels"].numpy()
    is_lm = np.arange(400) % (block + 1) == block
    assert (ids[:, is_lm] == TOK.landmark_id).all()
    for row in range(2):
        text = TOK.decode(ids[row][~is_lm])
        ans = TOK.decode(labels[row][labels[row] != -100])
        assert ans.strip().isdigit() and f"The pass key is {ans.strip()}." in text


# ------------------------------------------------------------------------------- passkey mixture


@pytest.mark.parametrize("block", [0, 5])
def test_mixed_sampler_mixes_packed_windows_and_passkey_samples(tmp_path, monkeypatch, block):
    """data.passkey_fraction: each global sample is the passkey sampler's sample g or the packed
    sampler's window of g, chosen from (seed, g) alone (same batches on a rerun, any step
    order); the share is about the fraction; SP shards reassemble to the whole batch."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    T = 360 if block else 300  # a byte-level prompt needs >= 251 regular tokens
    kw = dict(seq_len=T, micro_batch_size=8, synthetic_tokens=20000, passkey_targets="all", passkey_fraction=0.4)
    lm = dict(landmark_block=block) if block else {}
    s, vocab = D.make_sampler(_cfg(**kw), TOK, 0, 1, 0, 1, **lm)
    assert isinstance(s, D.MixedSampler) and vocab == TOK.vocab_size
    packed, _ = D.make_sampler(_cfg(**{**kw, "passkey_fraction": 0.0}), TOK, 0, 1, 0, 1, **lm)
    assert isinstance(packed, D.PackedSampler)
    pk_s, _ = D.make_sampler(_cfg(**{**kw, "kind": "passkey", "passkey_fraction": 0.0}), TOK, 0, 1, 0, 1, **lm)
    flags = []
    for step in (3, 0, 3):
        b = s.batch(step)
        ref_pk, ref_packed = pk_s.batch(step), packed.batch(step)
        for i, g in enumerate(s.global_indices(step)):
            ref = ref_pk if s.is_passkey(g) else ref_packed
            flags.append(s.is_passkey(g))
            for k in KEYS:
                assert torch.equal(b[k][i], ref[k][i]), (k, g)
    share = np.mean([s.is_passkey(g) for g in range(2000)])
    assert 0.35 < share < 0.45 and any(flags) and not all(flags)
    for P in (2, 3):
        shards = [D.make_sampler(_cfg(**kw), TOK, 0, 1, r, P, **lm)[0].batch(1) for r in range(P)]
        full = s.batch(1)
        for sh in shards:
            pos = sh["positions"][0]
            real = pos < T
            for k in KEYS:
                assert torch.equal(sh[k][:, real], full[k][:, pos[real]]), k
            assert (sh["labels"][:, ~real] == -100).all()
    with pytest.raises(ValueError, match="passkey_fraction"):
        D.make_sampler(_cfg(**{**kw, "kind": "passkey"}), TOK, 0, 1, 0, 1)
    from longctx.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="passkey_fraction"):
        load_config(base={"data": {"passkey_fraction": 1.5}})
