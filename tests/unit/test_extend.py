"""`longctx extend` planning: stage lengths, rope settings per method, configs that load."""
import json
import os

import pytest

from longctx.config import load_config
from longctx.train.extend import plan, rope_for, sp_for, stage_lengths, write_plan

HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    json.dump(HF_CONFIG, open(d / "config.json", "w"))  # planning reads config.json only
    return str(d)


def test_stage_lengths():
    assert stage_lengths(256, 4096) == [1024, 4096]
    assert stage_lengths(256, 3000) == [1024, 3000]
    assert stage_lengths(4096, 65536, 2) == [8192, 16384, 32768, 65536]
    with pytest.raises(ValueError, match="--target-len 256 is not above the model's current length 256"):
        stage_lengths(256, 256)


def test_rope_per_method():
    assert rope_for("theta", 256, 1024, 1e4, 64)["rope_theta"] == pytest.approx(1e4 * 4 ** (64 / 62))
    assert rope_for("yarn", 256, 1024, 1e4, 64)["rope_scaling"] == {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    assert rope_for("pi", 256, 4096, 1e4, 64)["rope_scaling"] == {"rope_type": "linear", "factor": 16.0}
    assert rope_for("ntk", 256, 512, 1e4, 64)["rope_scaling"]["rope_type"] == "dynamic"
    assert rope_for("llama3", 256, 512, 1e4, 64)["rope_scaling"]["high_freq_factor"] == 4.0
    assert [sp_for(L, 1024) for L in (512, 1024, 3000, 4096)] == [1, 1, 4, 4] and sp_for(10**6, None) == 1


@pytest.mark.parametrize("method", ["yarn", "ntk", "pi", "llama3", "theta"])
def test_plan_writes_loadable_stage_configs(tmp_path, hf_dir, method):
    out = str(tmp_path / "ext")
    p = plan(hf_dir, 4096, method, out, max_tokens_per_rank=1024)
    write_plan(p, out)
    saved = json.load(open(os.path.join(out, "plan.json")))
    assert [s["length"] for s in saved["stages"]] == [1024, 4096] and saved["original_length"] == 256
    c1 = load_config(os.path.join(out, "stage_1", "config.yaml"))
    c2 = load_config(os.path.join(out, "stage_2", "config.yaml"))
    assert c1.init.from_hf == hf_dir and c2.init.from_hf == os.path.join(out, "stage_1", "hf")
    assert (c1.data.seq_len, c2.data.seq_len, c2.model.max_seq_len, c1.parallel.sp, c2.parallel.sp) == \
           (1024, 4096, 4096, 1, 4)
    if method == "theta":
        assert c2.model.rope_theta > c1.model.rope_theta > 1e4 and c2.model.rope_scaling.rope_type == "default"
    else:
        assert c2.model.rope_scaling.factor == 16.0 and c2.model.rope_theta == 1e4


def test_plan_refusals_write_nothing(tmp_path, hf_dir):
    out = tmp_path / "ext"
    with pytest.raises(ValueError, match="not above the model's current length 256"):
        plan(hf_dir, 200, "yarn", str(out))
    with pytest.raises(ValueError, match="'rope' is not known: use one of yarn, ntk, pi, llama3, theta, landmark, "
                                         "hybrid"):
        plan(hf_dir, 4096, "rope", str(out))
    with pytest.raises(ValueError, match="--rope 'abf' is not known: use one of yarn, ntk, pi, llama3, theta, none"):
        plan(hf_dir, 4096, "hybrid", str(out), rope="abf")
    with pytest.raises(ValueError, match=r"--train-len 8192 must be in \[256, 4096\]"):
        plan(hf_dir, 4096, "landmark", str(out), train_len=8192)
    scaled = dict(HF_CONFIG, rope_scaling={"rope_type": "linear", "factor": 2.0})
    json.dump(scaled, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(ValueError, match="already uses rope_type=linear"):
        plan(hf_dir, 4096, "yarn", str(out))
    out.mkdir()
    (out / "x").write_text("")
    json.dump(HF_CONFIG, open(os.path.join(hf_dir, "config.json"), "w"))
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        write_plan(plan(hf_dir, 4096, "yarn", str(out)), str(out))
    assert sorted(os.listdir(tmp_path)) == ["ext", "hf"] and os.listdir(out) == ["x"]


def test_plan_landmark_and_hybrid(tmp_path, hf_dir):
    """landmark: stage 0 converts (vocabulary 320 already holds the byte tokenizer's landmark id
    258), then by default one stage at the trained length with plain RoPE; --rope yarn stages
    it to the target. hybrid: stage 0 converts and runs attention transfer at L0, then yarn
    stages; every stage starts from the previous export."""
    out = str(tmp_path / "ext")
    p = plan(hf_dir, 4096, "landmark", out, landmark_block=32)
    assert p["landmark"] == {"block": 32, "landmark_id": 258} and p["convert"]["export"] == f"{out}/stage_0/hf"
    (s,) = p["stages"]
    m = s["config"]["model"]
    assert (s["length"], m["mixers"], m["vocab_size"], m["rope_scaling"]["rope_type"]) == (256, ["landmark"], 320,
                                                                                         "default")
    assert s["config"]["init"]["from_hf"] == f"{out}/stage_0/hf" and m["max_seq_len"] == 4096 + 4096 // 32
    p = plan(hf_dir, 4096, "landmark", out, landmark_block=32, rope="yarn", train_len=4096)
    assert [s["length"] for s in p["stages"]] == [1024, 4096]
    assert p["stages"][1]["config"]["model"]["rope_scaling"]["factor"] == 16.0
    p = plan(hf_dir, 4096, "hybrid", out, hybrid_layers="0", transfer_steps=7, relative=True)
    assert p["hybrid"] == {"lightning_layers": [0]} and p["convert"]["transfer"]["steps"] == 7
    assert p["convert"]["transfer"]["data"]["seq_len"] == 256
    assert [s["config"]["init"]["from_hf"] for s in p["stages"]] == ["stage_0/hf", "stage_1/hf"]
    assert p["stages"][0]["config"]["model"]["mixers"] == ["lightning", "softmax"]
    assert p["stages"][1]["config"]["model"]["rope_scaling"]["rope_type"] == "yarn"
