"""Hugging Face import / export and RoPE scaling, against transformers itself (tiny random
models built here; nothing downloaded)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[dev]')")
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,  # noqa: E402
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from longctx.config import ConfigError, load_config  # noqa: E402
from longctx.model import hf  # noqa: E402
from longctx.model.rope import rope_params, scaling_key  # noqa: E402
from longctx.model.transformer import DecoderLM, SeqContext  # noqa: E402

ARCHS = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
         "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)


def tiny_hf(kind: str, **kw):
    """A transformers model with every weight (biases and norms too) random, so that a wrong
    mapping cannot hide behind zeros or ones."""
    C, M = ARCHS[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    torch.manual_seed(0)
    model = M(C(**{**TINY, **extra, **kw})).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


def ids(L=80):
    return torch.randint(0, TINY["vocab_size"], (2, L), generator=torch.Generator().manual_seed(1))


def max_diff(hf_model, ours, x):
    with torch.no_grad():
        return (hf_model(x).logits - ours(x)).abs().max().item()


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mistral", {}),
                                     ("qwen2", {}), ("qwen2", {"tie_word_embeddings": True})])
def test_import_logits_equal_transformers(tmp_path, kind, kw):
    m = tiny_hf(kind, **kw)
    m.save_pretrained(tmp_path)
    ours, cfg = hf.from_pretrained(str(tmp_path))
    assert cfg.attn_bias == (kind == "qwen2") and cfg.tie_embeddings == kw.get("tie_word_embeddings", False)
    assert cfg.n_kv_heads == 2 and cfg.ffn_hidden == 96 and cfg.norm_eps == 1e-5
    if kind == "qwen2":
        assert ours.layers[0].mixer.q_proj.bias.abs().sum() > 0 and ours.layers[0].mixer.o_proj.bias is None
    assert max_diff(m, ours, ids()) <= 1e-4


def test_import_sharded(tmp_path):
    m = tiny_hf("llama")
    m.save_pretrained(tmp_path, max_shard_size="40KB")
    assert os.path.exists(tmp_path / hf.INDEX) and not os.path.exists(tmp_path / hf.SINGLE)
    assert len({v for v in json.load(open(tmp_path / hf.INDEX))["weight_map"].values()}) > 2
    ours, _ = hf.from_pretrained(str(tmp_path))
    assert max_diff(m, ours, ids()) <= 1e-4


SCALINGS = [{"rope_type": "linear", "factor": 2.0},
            {"rope_type": "dynamic", "factor": 4.0},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
            {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "attention_factor": 1.3,
             "beta_fast": 16.0, "beta_slow": 2.0},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 32}]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s["rope_type"] + str(s["factor"]))
def test_scaled_rope_logits_equal_transformers(tmp_path, scaling):
    """Sequences (100) longer than max_position_embeddings (64): dynamic NTK is active too."""
    m = tiny_hf("llama", rope_scaling=dict(scaling), rope_theta=500.0)
    m.save_pretrained(tmp_path / "src")
    ours, cfg = hf.from_pretrained(str(tmp_path / "src"))
    assert cfg.rope_scaling.rope_type == scaling["rope_type"] and cfg.rope_theta == 500.0
    x = ids(100)
    assert max_diff(m, ours, x) <= 1e-4
    hf.save_pretrained(ours, cfg, str(tmp_path / "out"))  # and back: transformers reads our rope keys
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert max_diff(back, ours, x) <= 1e-4


@pytest.mark.parametrize("kind,arch", [("llama", None), ("qwen2", None), ("mistral", "MistralForCausalLM")])
def test_export_loads_in_transformers(tmp_path, kind, arch):
    src = tiny_hf(kind)
    src.save_pretrained(tmp_path / "src")
    ours, cfg = hf.from_pretrained(str(tmp_path / "src"))
    out = hf.save_pretrained(ours, cfg, str(tmp_path / "out"), arch=arch)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(src)
    assert max_diff(back, ours, ids()) <= 1e-4


def test_export_of_trained_model_sets_new_context(tmp_path):
    """A model of ours (not imported) extended with YaRN to 4x: config.json carries the new
    length and the scaling, and transformers' logits equal ours."""
    cfg = load_config(None, ["model.vocab_size=300", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.n_layers=2", "model.max_seq_len=256", "model.rope_scaling.rope_type=yarn",
                             "model.rope_scaling.factor=4", "model.tie_embeddings=true"]).model
    torch.manual_seed(0)
    ours = DecoderLM(cfg).eval()
    out = hf.save_pretrained(ours, cfg, str(tmp_path / "out"))
    conf = json.load(open(os.path.join(out, "config.json")))
    assert conf["max_position_embeddings"] == 256
    assert conf["rope_scaling"]["original_max_position_embeddings"] == 64 and conf["rope_scaling"]["factor"] == 4
    back = LlamaForCausalLM.from_pretrained(out).eval()
    assert max_diff(back, ours, ids(200)) <= 1e-4


def _hf_rope(scaling, head_dim, max_pos, seq_len=None):
    conf = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=max_pos,
                       rope_theta=10000.0, rope_scaling=dict(scaling))
    return ROPE_INIT_FUNCTIONS[scaling["rope_type"]](conf, "cpu", seq_len=seq_len)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("factor", [1.5, 4.0, 8.0, 32.0])
def test_inv_freq_and_attention_factor_equal_transformers(head_dim, factor):
    L0 = 2048
    cases = [({"rope_type": "linear", "factor": factor}, None),
             ({"rope_type": "dynamic", "factor": factor}, int(L0 * factor)),
             ({"rope_type": "dynamic", "factor": factor}, L0 * 3 + 5),
             ({"rope_type": "dynamic", "factor": factor}, 100),  # below L0: plain RoPE
             ({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L0}, None),
             ({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L0, "mscale": 0.707,
               "mscale_all_dim": 0.707, "beta_fast": 24.0, "beta_slow": 2.0}, None),
             ({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": L0, "truncate": False}, None),
             ({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": L0}, None),
             ({"rope_type": "llama3", "factor": factor, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 512}, None)]
    for scaling, seq_len in cases:
        ref_inv, ref_att = _hf_rope(scaling, head_dim, L0, seq_len)
        ours = dict(scaling, original_max_position_embeddings=scaling.get("original_max_position_embeddings", L0))
        inv, att = rope_params(head_dim, 10000.0, ours, seq_len)
        assert inv.dtype == torch.float32 and inv.shape == ref_inv.shape
        assert (inv - ref_inv).abs().max().item() <= 1e-6, scaling
        assert abs(att - ref_att) <= 1e-6, scaling
        if scaling["rope_type"] != "dynamic" or (seq_len or 0) > L0:  # the scaling did something
            assert (inv - rope_params(head_dim, 10000.0)[0]).abs().max() > 1e-6


def test_dynamic_ntk_reads_the_global_length():
    """Positions of the second half of a sequence (as a sequence-parallel rank sees them) get
    the frequencies of the whole sequence: the length is max position + 1."""
    cfg = load_config(None, ["model.max_seq_len=512", "model.rope_scaling.rope_type=dynamic",
                             "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=128"]).model
    key = scaling_key(cfg)
    full = SeqContext(positions=torch.arange(400)[None]).rope(16, 10000.0, torch.float32, key)
    tail = SeqContext(positions=torch.arange(200, 400)[None]).rope(16, 10000.0, torch.float32, key)
    torch.testing.assert_close(tail[0], full[0][:, :, 200:], rtol=0, atol=0)
    short = SeqContext(positions=torch.arange(100)[None]).rope(16, 10000.0, torch.float32, key)
    plain = SeqContext(positions=torch.arange(100)[None]).rope(16, 10000.0, torch.float32)
    torch.testing.assert_close(short[0], plain[0], rtol=0, atol=0)
    assert (full[0][:, :, :100] - plain[0]).abs().max() > 1e-3


# -- bad input --------------------------------------------------------------------------------
def test_unsupported_architecture_named(tmp_path):
    m = tiny_hf("llama")
    m.save_pretrained(tmp_path)
    conf = json.load(open(tmp_path / "config.json"))
    conf["architectures"] = ["GPT2LMHeadModel"]
    json.dump(conf, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not supported; supported: LlamaForCausalLM, "
                                         r"MistralForCausalLM, Qwen2ForCausalLM"):
        hf.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="no config.json"):
        hf.from_pretrained(str(tmp_path / "nowhere"))


def test_missing_shard_named(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(set(json.load(open(tmp_path / hf.INDEX))["weight_map"].values()))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(ValueError, match=f"shard {shard} listed in model.safetensors.index.json is missing"):
        hf.from_pretrained(str(tmp_path))


def test_shape_mismatch_names_tensor(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)
    conf = json.load(open(tmp_path / "config.json"))
    conf["intermediate_size"] = 128
    json.dump(conf, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.\d\.mlp\.\w+_proj\.weight has shape \((96, 64|64, 96)\), "
                                         r"expected \((128, 64|64, 128)\)"):
        hf.from_pretrained(str(tmp_path))


def test_untied_without_lm_head_is_refused(tmp_path):
    tiny_hf("llama", tie_word_embeddings=True).save_pretrained(tmp_path)
    conf = json.load(open(tmp_path / "config.json"))
    conf["tie_word_embeddings"] = False
    json.dump(conf, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="tensor lm_head.weight is missing"):
        hf.from_pretrained(str(tmp_path))


def test_sliding_window_limits_length(tmp_path):
    tiny_hf("mistral", sliding_window=32).save_pretrained(tmp_path)
    _, cfg = hf.from_pretrained(str(tmp_path))
    assert cfg.sliding_window == 32 and cfg.max_seq_len == 32
    with pytest.raises(ConfigError, match="model.max_seq_len=64 exceeds model.sliding_window=32"):
        load_config(None, ["model.sliding_window=32", "model.max_seq_len=64", "data.seq_len=64"])


def test_export_failures_write_nothing(tmp_path):
    src = tiny_hf("llama")
    src.save_pretrained(tmp_path / "src")
    ours, cfg = hf.from_pretrained(str(tmp_path / "src"))
    os.makedirs(tmp_path / "busy")
    open(tmp_path / "busy" / "x", "w").close()
    with pytest.raises(ValueError, match="exists and is not empty"):
        hf.save_pretrained(ours, cfg, str(tmp_path / "busy"))
    assert os.listdir(tmp_path / "busy") == ["x"]
    with pytest.raises(ValueError, match="has none of tokenizer.json"):  # fails after the weights are written
        hf.save_pretrained(ours, cfg, str(tmp_path / "out"), tokenizer_dir=str(tmp_path / "busy"))
    with pytest.raises(ValueError, match="exports only as Qwen2ForCausalLM, not LlamaForCausalLM"):
        hf.save_pretrained(ours, load_config(None, ["model.attn_bias=true"]).model, str(tmp_path / "out"),
                           arch="LlamaForCausalLM")
    with pytest.raises(ValueError, match="model.mixers has lightning: only softmax-attention models export"):
        hf.save_pretrained(ours, load_config(None, ["model.mixers=[lightning,softmax]"]).model, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["busy", "src"]  # no out/, no temporary folder left


def test_init_from_hf_shapes_checked(tmp_path):
    tiny_hf("qwen2").save_pretrained(tmp_path)
    mcfg = hf.model_config(hf.read_hf_config(str(tmp_path)))
    good = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in mcfg.items()
                              if k not in ("rope_scaling", "mixers")] + [f"init.from_hf={tmp_path}", "data.seq_len=64"])
    hf.check_matches(good.model, good.init.from_hf)
    bad = load_config(None, ["model.vocab_size=300", "model.d_model=64", "model.n_heads=4", "model.n_layers=2"])
    with pytest.raises(ConfigError, match=r"init.from_hf: model.n_kv_heads=4 but .* has 2"):
        hf.check_matches(bad.model, str(tmp_path))
