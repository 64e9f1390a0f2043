"""`longctx extend` run mode: the runner end to end (trainer subprocesses, export, evaluation,
resume after a crash, nothing at --out until done), the landmark and hybrid conversions, our
own folder format, landmark perplexity, attention transfer. Tiny models built with
transformers itself (nothing downloaded); a few training steps each."""
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from longctx.model import hf  # noqa: E402
from longctx.train import convert, transfer  # noqa: E402
from longctx.train.extend import ExtendError, extend  # noqa: E402

# Keep the stage subprocesses cheap: no matmul-rate probe, no plots, one thread, a small corpus.
FAST = ["train.peak_flops=1e9", "train.plot=false", "train.threads=1", "data.synthetic_tokens=20000",
        "checkpoint.every=1"]
EVAL = dict(eval_lengths=[64, 128], eval_windows=1, passkey_lengths=[256], passkey_depths=[0.5], passkey_trials=1)


def tiny_llama(folder, vocab=300, tie=False, seed=0):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                     rms_norm_eps=1e-5, tie_word_embeddings=tie)).eval()
    m.save_pretrained(folder)
    return m


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return str(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory, src):
    """A private corpus cache (the stage subprocesses inherit it) and the source model."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LONGCTX_CACHE", str(tmp_path_factory.mktemp("cache")))
    mp.setenv("OMP_NUM_THREADS", "1")
    tiny_llama(src)
    yield
    mp.undo()


def _ids(n=100, vocab=256, seed=1):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# -- the runner ------------------------------------------------------------------------------------
def test_run_yarn_crash_resume_export(tmp_path, src, monkeypatch):
    """Two yarn stages through the trainer. The first attempt dies in stage 1 (a NaN injected at
    step 2): nothing at --out, the partial run kept; the same call again resumes stage 1 from its
    step-1 checkpoint and finishes: results with before/after, the final folder loads in
    transformers with the logits of the last checkpoint."""
    out = str(tmp_path / "ext")
    kw = dict(per_stage=1.5, steps=2, tokens_per_step=256, overrides=FAST, progress=False, **EVAL)
    monkeypatch.setenv("LONGCTX_INJECT_NAN_STEP", "2")
    with pytest.raises(ExtendError, match=r"stage 1/2 \(length 96\): training failed .*non-finite loss at step 2"):
        extend(src, 128, "yarn", out, **kw)
    assert not os.path.exists(out) and os.path.isdir(out + ".partial")
    assert os.path.isfile(os.path.join(out + ".partial", "eval", "before_ppl.json"))
    monkeypatch.delenv("LONGCTX_INJECT_NAN_STEP")
    res = extend(src, 128, "yarn", out, **kw)
    assert not os.path.exists(out + ".partial") and res["out"] == out
    assert "resumed from" in open(os.path.join(out, "stage_1", "train.log")).read()
    saved = json.load(open(os.path.join(out, "results.json")))
    assert set(saved["before"]["ppl"]) == set(saved["after"]["ppl"]) == {"64", "128"}
    assert set(saved["after"]["passkey"]) == {"256"} and saved["final_model"] == "stage_2/hf"
    assert [s["length"] for s in saved["stages"]] == [96, 128] and all(s["steps"] == 2 for s in saved["stages"])
    for k in (1, 2):
        assert os.path.isfile(os.path.join(out, f"stage_{k}", "hf", "model.safetensors"))
    final = os.path.join(out, "model")
    assert os.path.realpath(final) == os.path.join(out, "stage_2", "hf")
    conf = json.load(open(os.path.join(final, "config.json")))
    assert conf["rope_scaling"]["rope_type"] == "yarn" and conf["rope_scaling"]["factor"] == 2.0
    assert conf["max_position_embeddings"] == 128

    from longctx.config import load_config
    from longctx.model.transformer import DecoderLM
    from longctx.train import checkpoint as ckpt
    cfg = load_config(os.path.join(out, "stage_2", "config.yaml"))
    ours = DecoderLM(cfg.model).eval()
    last = ckpt.newest_complete(os.path.join(out, "stage_2", "run", "checkpoints"), verify=True)
    ours.load_state_dict(ckpt.consolidated_state_dict(last))
    theirs = LlamaForCausalLM.from_pretrained(final).eval()
    x = _ids(120)
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)).abs().max().item() <= 1e-4
    # another run into the finished folder is refused, and leaves it alone
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        extend(src, 128, "yarn", out, **kw)


@pytest.mark.parametrize("method", ["landmark", "hybrid"])
def test_run_landmark_and_hybrid(tmp_path, src, method):
    """Stage 0 converts (hybrid: with attention transfer), one LM stage trains from it through
    init.from_hf of our own format, the final model evaluates (landmark: with retrieval) and is
    refused by transformers."""
    out = str(tmp_path / method)
    extra = (dict(landmark_block=15, retrieval_k=2) if method == "landmark" else
             dict(hybrid_layers="0", transfer_steps=4, per_stage=2))
    res = extend(src, 128, method, out, steps=2, tokens_per_step=256, overrides=FAST, progress=False,
                 **EVAL, **extra)
    conf = json.load(open(os.path.join(out, "model", "config.json")))
    assert conf["architectures"] == ["LongctxForCausalLM"] and res["after"]["ppl"].keys() == {"64", "128"}
    if method == "landmark":
        assert conf["longctx_landmark"] == {"block": 15, "landmark_id": 258}
        assert conf["longctx_mixers"] == ["landmark", "landmark"] and res["eval"]["retrieval_k"] == 2
        assert [s["length"] for s in res["stages"]] == [64]  # the paper's recipe: fine-tune at the trained length
    else:
        assert conf["longctx_mixers"] == ["lightning", "softmax"] and "longctx_landmark" not in conf
        assert len(res["convert"]["transfer"]["loss"]) == 4 and res["stages"][0]["length"] == 128
        assert conf["longctx_model"]["rope_scaling"]["rope_type"] == "yarn"
    with pytest.raises((ValueError, KeyError, OSError)):
        transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))


def test_bad_input_is_refused_and_writes_nothing(tmp_path, src):
    before = sorted(os.listdir(tmp_path))
    out = str(tmp_path / "ext")
    with pytest.raises(ValueError, match="--target-len 32 is not above the model's current length 64"):
        extend(src, 32, "yarn", out, **EVAL)
    with pytest.raises(ValueError, match="--method 'rope' is not known: use one of yarn, ntk, pi, llama3, theta, "
                                         "landmark, hybrid"):
        extend(src, 128, "rope", out, **EVAL)
    with pytest.raises(FileNotFoundError, match="--from .*/nope: no such folder"):
        extend(str(tmp_path / "nope"), 128, "yarn", out, **EVAL)
    with pytest.raises(ValueError, match="--rope none applies to --method landmark or hybrid"):
        extend(src, 128, "yarn", out, rope="none", **EVAL)
    with pytest.raises(ValueError, match="--landmark-block 64: a 64-token training window holds no complete block"):
        extend(src, 128, "landmark", out, **EVAL)
    with pytest.raises(ValueError, match=r"--hybrid-layers '0,5': need distinct layer indices in 0 \.\. 1"):
        extend(src, 128, "hybrid", out, hybrid_layers="0,5", **EVAL)
    with pytest.raises(ValueError, match="--passkey-lengths 128: length=128 cannot hold a passkey prompt"):
        extend(src, 128, "yarn", out, passkey_lengths=[128], eval_lengths=[64])
    with pytest.raises(ValueError, match="--nproc 3 is not a multiple of stage 1's sequence-parallel degree 2"):
        extend(src, 128, "yarn", out, nproc=3, max_tokens_per_rank=64, **EVAL)
    assert sorted(os.listdir(tmp_path)) == before
    os.makedirs(out)
    open(os.path.join(out, "x"), "w").close()
    with pytest.raises(FileExistsError, match="exists and is not empty: choose a new folder"):
        extend(src, 128, "yarn", out, **EVAL)
    os.makedirs(str(tmp_path / "other.partial"))
    json.dump({"args": {"method": "ntk"}}, open(str(tmp_path / "other.partial" / "plan.json"), "w"))
    with pytest.raises(FileExistsError, match=r"other.partial holds an unfinished run with other settings \(.*method"):
        extend(src, 128, "yarn", str(tmp_path / "other"), **EVAL)
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["ext", "other.partial"])
    assert os.listdir(out) == ["x"] and os.listdir(str(tmp_path / "other.partial")) == ["plan.json"]


# -- conversions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab,tie", [(300, False), (258, True)])
def test_landmark_conversion_mean_embedding(tmp_path, vocab, tie):
    """Landmark id 258 (the byte tokenizer's): inside a 300-token vocabulary its row is replaced;
    at vocabulary 258 the vocabulary grows by one. Either way the row (and the untied head's) is
    the mean of rows 0..257, every other tensor is the source's, and the q/k/v/o weights serve
    the landmark layers unchanged."""
    tiny_llama(tmp_path / "s", vocab=vocab, tie=tie)
    src, _ = hf.from_pretrained(str(tmp_path / "s"))
    model, cfg = convert.to_landmark(src, hf.folder_model_config(str(tmp_path / "s")), 258, 7)
    assert cfg["vocab_size"] == max(vocab, 259) and cfg["mixers"] == ["landmark"] and cfg["landmark_block"] == 7
    a, b = src.state_dict(), model.state_dict()
    assert set(a) == set(b)
    for name in a:
        if name in ("embed.weight", "head.weight"):
            assert torch.equal(b[name][:258], a[name][:258]) and torch.equal(b[name][259:], a[name][259:])
            assert torch.allclose(b[name][258], a[name][:258].double().mean(0).float(), atol=0, rtol=0)
        else:
            assert torch.equal(a[name], b[name]), name
    assert type(model.layers[0].mixer).__name__ == "LandmarkAttention"
    with pytest.raises(ValueError, match=f"landmark_id={vocab + 1} does not fit the model's vocabulary of {vocab}"):
        convert.to_landmark(src, hf.folder_model_config(str(tmp_path / "s")), vocab + 1, 7)


def test_landmark_model_saves_loads_and_evaluates(tmp_path, src):
    """save_native round trip (equal logits), transformers refuses the folder, and the eval
    harness reads it: perplexity in the landmark layout scores every regular token once, the
    same with retrieval covering every block; passkey generation runs."""
    from longctx.eval.lm import load_hf_eval_model
    s, _ = hf.from_pretrained(src)
    model, cfg = convert.to_landmark(s, hf.folder_model_config(src), 258, 6)
    hf.save_native(model, cfg, str(tmp_path / "lm"), landmark_id=258)
    back, _ = hf.from_pretrained(str(tmp_path / "lm"))
    x = _ids(70)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    lm, tok, ecfg, _ = load_hf_eval_model(str(tmp_path / "lm"))
    assert lm.landmark_block == 6 and lm.landmark_id == 258
    ids = np.random.default_rng(0).integers(0, 256, size=61)
    exact = lm.nll_per_token(ids)
    assert exact.shape == (60,) and np.isfinite(exact).all()
    lm_r, *_ = load_hf_eval_model(str(tmp_path / "lm"), retrieval_k=100)
    assert np.allclose(lm_r.nll_per_token(ids), exact, atol=1e-4)
    assert len(lm.generate(ids[:30], 3)) == 3 and lm_r.generate(ids[:30], 3) == lm.generate(ids[:30], 3)
    with pytest.raises(hf.HFFormatError, match="a landmark model needs landmark_id"):
        hf.save_native(model, cfg, str(tmp_path / "lm2"))
    with pytest.raises(hf.HFFormatError, match="only softmax-attention models export .*save_native"):
        hf.save_pretrained(model, cfg, str(tmp_path / "lm3"))
    assert not os.path.exists(tmp_path / "lm2") and not os.path.exists(tmp_path / "lm3")


def test_hybrid_conversion_and_attention_transfer(tmp_path, src):
    """Lightning layers start from the softmax layer's q/o (copied) and k/v (repeated per query
    head, GQA 4:2); gate 0, norm 2; every other tensor is the source's. Attention transfer then
    lowers the per-layer (relative) MSE and changes nothing outside the lightning layers."""
    s, _ = hf.from_pretrained(src)
    mcfg = hf.folder_model_config(src)
    assert convert.hybrid_layers(4) == [0, 1, 2] and convert.hybrid_layers(8, ratio=0.75) == [0, 1, 2, 4, 5, 6]
    assert convert.hybrid_layers(2, "1") == [1] and convert.hybrid_layers(2) == [0]
    with pytest.raises(ValueError, match="--hybrid-ratio 0.2: need a ratio in"):
        convert.hybrid_layers(2, ratio=0.2)
    model, cfg = convert.to_hybrid(s, mcfg, [0])
    assert cfg["mixers"] == ["lightning", "softmax"]
    lin, soft = model.layers[0].mixer, s.layers[0].mixer
    assert torch.equal(lin.q_proj.weight, soft.q_proj.weight) and torch.equal(lin.o_proj.weight, soft.o_proj.weight)
    D = soft.head_dim
    for name in ("k_proj", "v_proj"):
        w, ws = getattr(lin, name).weight, getattr(soft, name).weight
        for h in range(4):
            assert torch.equal(w[h * D:(h + 1) * D], ws[(h // 2) * D:(h // 2 + 1) * D])
    assert lin.g_proj.weight.abs().sum() == 0 and torch.all(lin.norm.weight == 2)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if not n.startswith("layers.0.mixer.")}
    for n, t in frozen.items():
        assert torch.equal(t, s.state_dict()[n]), n
    g = torch.Generator().manual_seed(0)
    batch = lambda step: {"input_ids": torch.randint(0, 256, (4, 64), generator=g),  # noqa: E731
                          "positions": torch.arange(64).expand(4, 64)}
    r = transfer.attention_transfer(s, model, [0], batch, 25, lr=3e-3)
    assert r["layer_loss"]["0"]["last"] < 0.7 * r["layer_loss"]["0"]["first"]
    assert np.mean(r["loss"][-5:]) < 0.7 * np.mean(r["loss"][:5])
    for n, t in model.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), n
    hf.save_native(model, cfg, str(tmp_path / "hy"))
    back, _ = hf.from_pretrained(str(tmp_path / "hy"))
    x = _ids(50)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
