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
    msg = err(["parallel.sp=2"], world_size=3)
    assert "world size 3" in msg and "parallel.sp=2" in msg


@pytest.mark.parametrize("ov, words", [
    # 6 heads (tiny config) cannot be split 4 ways: the alternatives are named
    (["parallel.sp=4"], ["Ulysses degree 4", "ring", "sp_ulysses=2 x sp_ring=2", "sp_ulysses=1 x sp_ring=4"]),
    (["parallel.sp=4", "parallel.sp_ulysses=3"], ["parallel.sp_ulysses=3", "does not divide", "parallel.sp=4"]),
    (["parallel.sp=4", "parallel.sp_ulysses=2", "parallel.sp_ring=4"], ["x parallel.sp_ring=4 = 8"]),
    (["parallel.sp=2", "model.n_kv_heads=3"], ["3 KV heads", "Ulysses degree 2"]),
    (["parallel.sp=2", "parallel.sp_ring=2", "parallel.layout=zigzag", "model.mixers=[lightning,softmax]"],
     ["parallel.layout=zigzag", "lightning", "contiguous"]),
    (["parallel.layout=spiral"], ["parallel.layout='spiral'", "'zigzag'"]),
])
def test_sequence_parallel_degrees_checked(ov, words):
    msg = err(ov, world_size=4)
    for w in words:
        assert w in msg, (w, msg)


def test_sequence_parallel_layout_resolved():
    from longctx.config import sp_degrees, sp_layout
    cfg = load_config(TINY, ["parallel.sp=4", "parallel.sp_ring=2"], world_size=4)
    assert sp_degrees(cfg.parallel) == (2, 2) and sp_layout(cfg) == "zigzag"
    cfg = load_config(TINY, ["parallel.sp=2", "parallel.sp_ring=2", "model.mixers=[lightning,softmax]"], world_size=2)
    assert sp_layout(cfg) == "contiguous"  # lightning's state flows rank to rank
    cfg = load_config(TINY, ["parallel.sp=2"], world_size=2)
    assert sp_degrees(cfg.parallel) == (2, 1) and sp_layout(cfg) == "contiguous"


MAC_SP = ["model.mixers=[mac,softmax]", "parallel.sp=2", "model.memory.chunk=16"]


@pytest.mark.parametrize("ov, words", [
    # 256 tokens over 2 ranks: shards of 128 cannot hold whole segments of 256
    (["model.memory.segment=256"], ["parallel.sp=2", "each rank's 128 tokens", "model.memory.segment=256",
                                    "straddle", "data.seq_len=512", "divides 128"]),
    # the recomputed forward would send the memory state again; memory.recompute does not help mac
    (["model.memory.segment=64", "model.activation_checkpointing=true", "model.memory.recompute=64"],
     ["model.activation_checkpointing=true", "parallel.sp=2", "set it false", "not mag/mal/mac"]),
])
def test_sequence_parallel_mac_checked(ov, words):
    msg = err(MAC_SP + ov, world_size=2)
    for w in words:
        assert w in msg, (w, msg)


def test_sequence_parallel_mac_accepted():
    cfg = load_config(TINY, MAC_SP + ["model.memory.segment=64"], world_size=2)
    assert cfg.parallel.sp == 2 and list(cfg.model.mixers) == ["mac", "softmax"]


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
