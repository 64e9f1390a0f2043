import json

import pytest

from longctx.config import ConfigError, deepspeed_config, load_config

TINY = "configs/tiny-cpu.yaml"


def err(overrides, path=TINY, world_size=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides, world_size=world_size)
    msg = str(e.value)
    assert "\n" not in msg, "errors are one line"
    return msg


def test_defaults_and_overrides_typed():
    cfg = load_config(TINY, ["train.steps=70", "train.lr=2e-4", "model.mixers=[softmax,softmax]"])
    assert cfg.train.steps == 70 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(2e-4)
    assert list(cfg.model.mixers) == ["softmax", "softmax"]
    assert cfg.model.d_model == 192  # from the YAML file


def test_unknown_key_suggests_nearest():
    assert "did you mean 'model.d_model'" in err(["model.d_modle=3"])
    assert "did you mean 'train'" in err(["trian.steps=3"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layer: 3\n")
    msg = err([], path=str(p))
    assert "model.n_layer" in msg and "model.n_layers" in msg and str(p) in msg


def test_wrong_type_names_key():
    msg = err(["train.steps=abc"])
    assert "train.steps" in msg and "abc" in msg


@pytest.mark.parametrize("ov, words", [
    (["model.n_heads=6", "model.n_kv_heads=4"], ["model.n_heads=6", "model.n_kv_heads=4"]),
    (["model.d_model=190"], ["model.d_model=190", "model.n_heads"]),
    (["data.seq_len=4096"], ["data.seq_len=4096", "model.max_seq_len"]),
    (["deepspeed.zero_stage=5"], ["deepspeed.zero_stage=5", "0, 1, 2, 3"]),
    (["model.mixers=[softmax,nosuch]"], ["nosuch", "softmax"]),
    (["deepspeed.offload_param=true", "deepspeed.zero_stage=2"], ["offload_param", "zero_stage=3"]),
    (["train.warmup_steps=-1"], ["train.warmup_steps=-1"]),
    (["data.kind=tokens"], ["data.path"]),
    (["deepspeed.raw={gradient_accumulation_steps: 4}"], ["deepspeed.raw.gradient_accumulation_steps",
                                                           "train.grad_accum"]),
])
def test_inconsistent_values(ov, words):
    msg = err(ov)
    for w in words:
        assert w in msg, (w, msg)


def test_world_size_checked():
    # sp > 1 is refused until a sequence-parallel mixer exists; the world-size rule is still stated
    assert "parallel.sp" in err(["parallel.sp=2"])


def test_missing_file():
    assert "does not exist" in err([], path="configs/nope.yaml")


def test_deepspeed_json_derived_with_raw_escape_hatch():
    cfg = load_config(TINY, ["deepspeed.zero_stage=2", "train.grad_accum=2",
                             "deepspeed.raw={zero_optimization: {reduce_bucket_size: 1000}, steps_per_print: 5}"])
    ds = deepspeed_config(cfg, dp_size=4)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000  # raw merged into the derived dict
    assert ds["steps_per_print"] == 5
    assert ds["train_batch_size"] == cfg.data.micro_batch_size * 2 * 4
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    json.dumps(ds)  # serialisable as DeepSpeed JSON
