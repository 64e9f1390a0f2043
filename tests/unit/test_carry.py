"""train.carry_state: the stream sampler, the state carried from step to step (exact, also under
activation checkpointing), the config refusals and the resume checks. The end-to-end resume
through torchrun is tests/distributed/test_carry_resume.py."""
import os

import numpy as np
import pytest
import torch

from longctx.config import ConfigError, load_config
from longctx.model.transformer import DecoderLM, SegmentState, SeqContext
from longctx.train import checkpoint as ckpt
from longctx.train.data import StreamSampler, ensure_synthetic_token_file
from longctx.train.trainer import TrainingError, _check_carry_resumable, carried_after

TINY = "configs/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    return ensure_synthetic_token_file(str(tmp_path_factory.mktemp("carry")), 3, 4001)


def test_stream_rows_continue_step_to_step(token_file):
    """Row r at step s + 1 reads the tokens after its step-s tokens; rows of other ranks and
    micro-batches read other regions; after K segments the regions start over."""
    T, mb, dp, ga = 16, 2, 2, 2
    samplers = [StreamSampler(token_file, T, mb, 0, dp_rank=r, dp_size=dp, grad_accum=ga) for r in range(dp)]
    s0 = samplers[0]
    assert s0.rows == 8 and s0.region_len == 4000 // 8 and s0.segments == 500 // T
    tokens = s0.token_file.read(0, s0.token_file.n_tokens)
    starts = set()
    for r, s in enumerate(samplers):
        for m in range(ga):
            b0, b1 = s.batch(0, m, ga), s.batch(1, m, ga)
            for i in range(mb):
                row = (m * dp + r) * mb + i
                a = row * s.region_len
                starts.add(a)
                seq = torch.cat([b0["input_ids"][i], b1["input_ids"][i]]).numpy()
                np.testing.assert_array_equal(seq, tokens[a:a + 2 * T])
                np.testing.assert_array_equal(b1["labels"][i].numpy(), tokens[a + T + 1:a + 2 * T + 1])
            assert b1["positions"].tolist() == [list(range(T, 2 * T))] * mb
    assert len(starts) == 8
    K = s0.segments
    assert s0.starts_stream(0) and not s0.starts_stream(1) and s0.starts_stream(K)
    # epoch 1: every region again from its start, rows assigned in another (seeded) order
    perm = s0.regions(1)
    assert sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    assert np.array_equal(perm, StreamSampler(token_file, T, mb, 0, dp_size=dp, grad_accum=ga).regions(1))
    for r, s in enumerate(samplers):
        for m in range(ga):
            b = s.batch(K, m, ga)
            for i in range(mb):
                a = int(perm[(m * dp + r) * mb + i]) * s.region_len
                np.testing.assert_array_equal(b["input_ids"][i].numpy(), tokens[a:a + T])
    with pytest.raises(ValueError, match="at least 16001 tokens"):
        StreamSampler(token_file, 2000, mb, 0, dp_size=dp, grad_accum=ga)


def model_cfg(*ov):
    return load_config(TINY, ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2",
                              "model.memory.chunk=4", "model.memory.window=5", "model.mixers=[mag,lightning]",
                              *ov]).model


def two_steps(model, batches):
    """The trainer's forward of train.carry_state over consecutive steps, with backward; returns
    the logits of each step and the gradients (no optimizer step: the weights stay)."""
    carried, outs = {}, []
    model.zero_grad()
    for step, b in enumerate(batches):
        ctx = SeqContext(positions=b["positions"], state=SegmentState(carried), carry=True)
        logits = model(b["input_ids"], ctx)
        carried = carried_after(ctx.state, step + 1)
        logits.square().mean().backward()
        outs.append(logits.detach())
    return outs, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_two_carried_steps_equal_one_pass(token_file):
    """Two training steps' forwards with the carried state (memory weights, momentum, conv and
    window tails, lightning state) equal one forward over the two segments; with activation
    checkpointing the gradients are those without (the recomputed forward starts from the state
    the step started from, not the one it left)."""
    s = StreamSampler(token_file, 12, 2, 0)  # 12 tokens: a segment ends inside a memory chunk of 4
    batches = [s.batch(0), s.batch(1)]
    torch.manual_seed(3)
    model = DecoderLM(model_cfg()).double()
    outs, grads = two_steps(model, batches)
    full = model(torch.cat([b["input_ids"] for b in batches], 1))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert (outs[1] - model(batches[1]["input_ids"])).abs().max() > 1e-3  # the state does change step 2
    torch.manual_seed(3)
    ckpt_model = DecoderLM(model_cfg("model.activation_checkpointing=true")).double()
    ckpt_model.load_state_dict(model.state_dict())
    outs_c, grads_c = two_steps(ckpt_model, batches)
    for a, b in zip(outs, outs_c):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-10, atol=1e-12, msg=n)


def test_lost_layer_state_is_an_error():
    st = SegmentState({"mag.0": 1, "lightning.1": 2})
    st["mag.0"] = 3
    assert st["mag.0"] == 1 and st.after == {"mag.0": 3}  # reads see the start, writes the end
    with pytest.raises(TrainingError, match=r"\['lightning.1'\] was carried in but not out"):
        carried_after(st, 7)


@pytest.mark.parametrize("ov,match", [
    (["model.mixers=[softmax]"], "none of model.mixers"),
    (["parallel.sp=2", "model.mixers=[lightning]"], "parallel.sp=2"),
    (["data.mask_documents=true"], "data.mask_documents=true"),
    (["data.kind=passkey"], "data.kind='passkey'"),
    (["data.passkey_fraction=0.5"], "passkey_fraction=0.5"),
    (["model.mixers=[memory,landmark]"], "landmark"),
    (["train.on_nonfinite=skip"], "on_nonfinite='skip'"),
    (["model.rope_scaling.rope_type=dynamic", "model.rope_scaling.factor=2"], "dynamic"),
    (["model.mixers=[mac]", "model.memory.segment=64", "data.seq_len=96"], "data.seq_len=64"),
])
def test_config_refuses_what_carry_does_not_support(ov, match):
    base = ["train.carry_state=true", "model.mixers=[memory,softmax]"]
    load_config(TINY, base)
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, base + ov)


def meta(**kw):
    m = {"world_size": 2, "data": {"micro_batch_size": 2}, "grad_accum": 1, "carry_state": True}
    m.update(kw)
    return m


def test_resume_checks_carried_state_layout():
    cfg = load_config(TINY, ["train.carry_state=true", "model.mixers=[memory]", "data.micro_batch_size=2"])
    _check_carry_resumable(meta(), cfg, 2, "ck")
    with pytest.raises(TrainingError, match="saved with train.carry_state=false but the config says true"):
        _check_carry_resumable(meta(carry_state=False), cfg, 2, "ck")
    with pytest.raises(TrainingError, match="world size: checkpoint 2 vs now 1"):
        _check_carry_resumable(meta(), cfg, 1, "ck")
    with pytest.raises(TrainingError, match="data.micro_batch_size: checkpoint 4 vs now 2"):
        _check_carry_resumable(meta(data={"micro_batch_size": 4}), cfg, 2, "ck")
    plain = load_config(TINY, ["data.micro_batch_size=2"])
    with pytest.raises(TrainingError, match="saved with train.carry_state=true but the config says false"):
        _check_carry_resumable(meta(), plain, 2, "ck")
    _check_carry_resumable(meta(carry_state=False), plain, 4, "ck")  # nothing carried: reshard rules apply


def test_load_carried_refuses_missing_or_other_state(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no carried state for rank 0"):
        ckpt.load_carried(str(tmp_path), 3, 1, "cpu")
    torch.save({"step": 3, "state": [{"memory.0": torch.ones(2)}]}, os.path.join(tmp_path, "carry_rank00000.pt"))
    assert torch.equal(ckpt.load_carried(str(tmp_path), 3, 1, "cpu")[0]["memory.0"], torch.ones(2))
    with pytest.raises(ckpt.CheckpointError, match="needs step 4 and train.grad_accum=2"):
        ckpt.load_carried(str(tmp_path), 4, 2, "cpu")


def test_saved_state_is_compact_and_complete(tmp_path, monkeypatch):
    """A carried window tail is a view of a segment's keys: the checkpoint keeps only the view,
    with every field of the state (MemoryState included) as it was."""
    from longctx.memory.titans import MemoryState

    class Engine:
        def save_checkpoint(self, root, tag, **kw):
            os.makedirs(os.path.join(root, tag), exist_ok=True)

    keys = torch.randn(2, 3, 100, 4)
    state = [{"mag.0": {"swa": {"k": keys[:, :, 96:], "pos": torch.arange(96, 100)},
                        "mem": {"mem": MemoryState((torch.ones(2, 2),), (torch.zeros(2, 2),), None, 3), "conv": None}}}]
    folder = ckpt.save(Engine(), str(tmp_path), 5, {"step": 5}, 1, carried=state)
    assert os.path.getsize(os.path.join(folder, "carry_rank00000.pt")) < keys.numel() * 4  # not the whole keys
    back = ckpt.load_carried(folder, 5, 1, "cpu")[0]["mag.0"]
    assert torch.equal(back["swa"]["k"], keys[:, :, 96:]) and back["mem"]["mem"].offset == 3
    assert isinstance(back["mem"]["mem"], MemoryState) and back["mem"]["conv"] is None
