"""Evaluation harness: deterministic generators, the scorer, an oracle that must score 100% and
a guesser that must score near chance, resume from a partial JSON, pictures read back, the
LM adapter against the model's own forward, and bad input."""
import json
import math
import re

import numpy as np
import pytest
import torch

from longctx.eval.harness import accuracy_grid, parse_depths, parse_lengths, run_ppl, run_retrieval
from longctx.eval.passkey import first_integer
from longctx.eval.plots import plot_run, ppl_plot, retrieval_heatmap
from longctx.eval.tasks import KEY_WORDS, check_task, retrieval_sample
from longctx.train.data import ByteTokenizer

TOK = ByteTokenizer()


class Oracle:
    """Answers by reading the prompt, as a perfect long-context model would."""

    def __init__(self):
        self.calls = 0

    def generate(self, prompt_ids, max_new_tokens):
        self.calls += 1
        text = TOK.decode(prompt_ids)
        m = re.search(r"special magic number for (\w+) mentioned in the provided text is$", text)
        if m:
            ans = re.search(rf"magic numbers for {m.group(1)} is: (\d+)", text).group(1)
        else:
            ans = re.search(r"The pass key is (\d+)\.", text).group(1)
        return list(TOK.encode(" " + ans + ". The"))[:max_new_tokens]


class Guesser:
    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def generate(self, prompt_ids, max_new_tokens):
        return list(TOK.encode(f" {self.rng.integers(1, 50001)}"))


def test_generators_deterministic_and_well_formed():
    for task in ("passkey", "niah"):
        a = retrieval_sample(task, TOK, 3, 700, 0.4, 5, n_keys=3)
        b = retrieval_sample(task, TOK, 3, 700, 0.4, 5, n_keys=3)
        c = retrieval_sample(task, TOK, 3, 700, 0.4, 6, n_keys=3)
        assert np.array_equal(a["prompt_ids"], b["prompt_ids"]) and a["answer"] == b["answer"]
        assert not np.array_equal(a["prompt_ids"], c["prompt_ids"])
        assert len(a["prompt_ids"]) + len(a["answer_ids"]) <= 700
        assert len(a["prompt_ids"]) + len(a["answer_ids"]) > 600  # filled, not just fitting
        assert TOK.decode(a["answer_ids"]) == f" {a['answer']}"
    s = retrieval_sample("niah", TOK, 0, 2000, 0.5, 0, n_keys=4)
    text = TOK.decode(s["prompt_ids"])
    assert len(s["keys"]) == 4 and all(k in KEY_WORDS for k in s["keys"])
    assert all(f"magic numbers for {k} is:" in text for k in s["keys"])
    assert text.endswith(f"for {s['keys'][0]} mentioned in the provided text is")
    assert f"for {s['keys'][0]} is: {s['answer']}." in text
    # depth: the asked needle sits near the requested fraction of the haystack
    for d in (0.0, 1.0):
        t = TOK.decode(retrieval_sample("niah", TOK, 0, 3000, d, 0)["prompt_ids"])
        frac = t.index("special magic numbers for", 100) / len(t)
        assert abs(frac - d) < 0.1, (d, frac)


def test_scorer_reads_the_first_integer():
    assert first_integer(" 12345. The pass key is 99") == 12345
    assert first_integer("no digits") is None


def test_oracle_scores_100_and_guesser_near_chance(tmp_path):
    for task in ("passkey", "niah"):
        res = run_retrieval(task, Oracle(), TOK, [500, 900], [0.0, 0.5, 1.0], 3, out=None, progress=False, n_keys=2)
        assert all(c["accuracy"] == 1.0 for c in res["cells"].values())
        res = run_retrieval(task, Guesser(), TOK, [400, 900], [0.0, 0.5, 1.0], 3, progress=False)
        assert sum(c["correct"] for c in res["cells"].values()) <= 1  # chance is ~1/50000


class Interrupting(Oracle):
    def __init__(self, after):
        super().__init__()
        self.after = after

    def generate(self, prompt_ids, max_new_tokens):
        if self.calls == self.after:
            raise KeyboardInterrupt
        return super().generate(prompt_ids, max_new_tokens)


def test_interrupted_evaluation_resumes_from_partial_json(tmp_path):
    out = str(tmp_path / "pk.json")
    args = ("passkey", None, TOK, [400, 800], [0.0, 1.0], 2)
    with pytest.raises(KeyboardInterrupt):
        run_retrieval(*args[:1], Interrupting(5), *args[2:], out=out, progress=False)
    partial = json.load(open(out))
    assert len(partial["cells"]) == 2 and not partial["complete"]  # 2 cells of 2 trials finished
    again = Oracle()
    res = run_retrieval(*args[:1], again, *args[2:], out=out, progress=False)
    assert again.calls == 4  # only the two unfinished cells ran
    fresh = run_retrieval(*args[:1], Oracle(), *args[2:], out=None, progress=False)
    assert res["cells"] == fresh["cells"] and res["complete"]
    with pytest.raises(ValueError, match="other settings"):
        run_retrieval("passkey", Oracle(), TOK, [400], [0.5], 2, out=out, progress=False)


def test_heatmap_and_ppl_pictures_read_back(tmp_path):
    import matplotlib.image as mpimg
    res = run_retrieval("passkey", Oracle(), TOK, [400, 800], [0.0, 0.5, 1.0], 1, progress=False)
    res["cells"]["800|0.5"]["accuracy"] = 0.0  # one failing cell shows in the data behind the picture
    g = retrieval_heatmap(res, str(tmp_path / "h.png"))
    assert g.shape == (3, 2) and g[1, 1] == 0.0 and np.nansum(g) == 5.0
    assert np.array_equal(g, accuracy_grid(res))
    img = mpimg.imread(str(tmp_path / "h.png"))
    assert img.shape[0] > 100 and img.shape[1] > 100 and img[..., :3].std() > 0.05
    a = {"task": "ppl", "model": "a", "cells": {"256": {"length": 256, "ppl": 3.0}, "1024": {"length": 1024, "ppl": 2.5}}}
    b = {"task": "ppl", "model": "b", "cells": {"256": {"length": 256, "ppl": 3.1}, "1024": {"length": 1024, "ppl": 9.0}}}
    series = ppl_plot([a, b], str(tmp_path / "p.png"))
    assert series == {"a": [(256, 3.0), (1024, 2.5)], "b": [(256, 3.1), (1024, 9.0)]}
    assert mpimg.imread(str(tmp_path / "p.png"))[..., :3].std() > 0.05


def test_run_curves(tmp_path):
    import matplotlib.image as mpimg
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-3, "tokens_per_s": 100.0 * s,
                                "peak_rss_gib": 0.5}) + "\n")
    data = plot_run(str(tmp_path))
    assert data["loss"][-1] == (5, 1.0) and data["tokens_per_s"][0] == (1, 100.0) and len(data["lr"]) == 5
    assert mpimg.imread(str(tmp_path / "curves.png"))[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="metrics.jsonl"):
        plot_run(str(tmp_path / "nope"))


class ConstNLL:
    def nll_per_token(self, ids):
        return np.full(len(ids) - 1, 0.5)


def test_ppl_run_and_its_windows():
    data = np.arange(10000) % 250
    res = run_ppl(ConstNLL(), lambda a, b: data[a:b], len(data), [128, 512], n_windows=3, progress=False)
    for L in (128, 512):
        c = res["cells"][str(L)]
        assert c["tokens"] == 3 * L and math.isclose(c["ppl"], math.exp(0.5)) and math.isclose(c["tail_ppl"], math.exp(0.5))
    with pytest.raises(ValueError, match="token file has 10000"):
        run_ppl(ConstNLL(), lambda a, b: data[a:b], len(data), [20000], progress=False)


def test_bad_input():
    with pytest.raises(ValueError, match="passkey, niah, ppl"):
        check_task("needle")
    with pytest.raises(ValueError, match="cannot hold the prompt"):
        run_retrieval("niah", Oracle(), TOK, [50], [0.5], 1, progress=False)
    with pytest.raises(ValueError, match="--lengths"):
        parse_lengths("4k,lots")
    with pytest.raises(ValueError, match="outside"):
        parse_depths("0,1.5")
    assert parse_lengths("512, 2k,1m") == [512, 2048, 1 << 20]
    assert parse_depths("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]


def _tiny_lm():
    from longctx.config import load_config
    from longctx.eval.lm import LMEval
    from longctx.model.transformer import DecoderLM
    cfg = load_config("configs/tiny-cpu.yaml", ["model.d_model=64", "model.n_layers=2", "model.n_heads=4"])
    torch.manual_seed(0)
    return LMEval(DecoderLM(cfg.model), cfg), cfg


def test_lm_adapter_matches_forward():
    lm, cfg = _tiny_lm()
    ids = np.random.default_rng(0).integers(0, 259, size=70)
    with torch.no_grad():
        logits = lm.model(torch.as_tensor(ids)[None])[0]
        loss, n = lm.model(torch.as_tensor(ids[:-1])[None], labels_BL=torch.as_tensor(ids[1:])[None])
    assert lm.next_token(ids) == int(logits[-1].argmax())
    nll = lm.nll_per_token(ids, chunk=16)
    assert nll.shape == (69,) and abs(nll.sum() - float(loss)) < 1e-3 * float(loss)
    gen = lm.generate(ids[:30], 3)
    assert gen[0] == lm.next_token(ids[:30]) and len(gen) == 3
    with pytest.raises(ValueError, match="GiB per rank"):
        lm.check_length(1 << 40)


def test_landmark_model_generation_exact_and_with_retrieval():
    """A landmark model reads prompts in the landmark layout: the exact grouped-softmax path
    and block retrieval covering every block generate the same tokens."""
    from longctx.config import load_config
    from longctx.eval.lm import LMEval
    from longctx.model.transformer import DecoderLM
    cfg = load_config("configs/tiny-cpu.yaml", ["model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                                 "model.mixers=[landmark]", "model.landmark_block=6"])
    torch.manual_seed(0)
    m = DecoderLM(cfg.model)
    prompt = np.random.default_rng(2).integers(0, 256, size=40)
    exact = LMEval(m, cfg, landmark_id=TOK.landmark_id).generate(prompt, 5)
    retr = LMEval(m, cfg, landmark_id=TOK.landmark_id, retrieval_k=100).generate(prompt, 5)
    assert exact == retr and len(exact) == 5
    # a local window over every group with k=1 is the exact path too; without the window k=1 is not
    nll = {name: LMEval(m, cfg, landmark_id=TOK.landmark_id, **kw).nll_per_token(prompt)
           for name, kw in (("exact", {}), ("local", dict(retrieval_k=1, retrieval_local=100)),
                            ("k1", dict(retrieval_k=1, retrieval_local=0)))}
    assert np.allclose(nll["local"], nll["exact"], atol=1e-5)
    assert np.abs(nll["k1"] - nll["exact"]).max() > 1e-4
    with pytest.raises(ValueError, match="retrieval_local=-1"):
        LMEval(m, cfg, landmark_id=TOK.landmark_id, retrieval_k=1, retrieval_local=-1)
    with pytest.raises(ValueError, match="only landmark models"):
        LMEval(_tiny_lm()[0].model, _tiny_lm()[1], retrieval_k=4)
