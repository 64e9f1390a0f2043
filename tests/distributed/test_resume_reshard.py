"""Resume at another world size or SP degree (train/reshard.py), through the real launcher on
gloo processes with DeepSpeed on CPU.

4 ranks (dp 2 x sp 2) train 4 steps with a checkpoint at step 2; the run resumes from it on
2 ranks (sp 2: another world size, through DeepSpeed's universal checkpoint) and on 4 ranks
(sp 4: the same ZeRO partitions), with train.grad_accum=2 so the global batch is the same. At
the resume the consolidated fp32 weights and Adam moments equal the saved ones exactly; the
losses continue the uninterrupted run's within 1e-4 relative, and the final weights and Adam
steps agree with it (a tighter check: DeepSpeed's ZeRO-3 universal load mis-set param group
hyperparameters and Adam's step, which moved the loss only ~3e-5 but the weights 3e-4).

ZeRO-2 runs both layouts; ZeRO-1 and ZeRO-3 the universal one (2 ranks), since the 4-rank sp 4
resume is DeepSpeed's ordinary load whatever the stage. Refusals are checked in-process.
"""
import json
import os
import shutil

import pytest
import torch

from launching import SMALL, TINY, launch
from longctx.config import load_config, model_signature
from longctx.train import checkpoint as ckpt

K, N = 2, 4  # checkpoint step, last step
BASE = [TINY, *SMALL, f"checkpoint.every={K}", f"train.steps={N}", "checkpoint.keep_last=5"]


def losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("reshard")


_FULL = {}


def full_run(workdir, zero):
    """The uninterrupted 4-rank dp 2 x sp 2 run (it also saves the step-K checkpoint)."""
    if zero not in _FULL:
        run = str(workdir / f"full_z{zero}")
        ok(launch("torchrun", 4, [*BASE, f"deepspeed.zero_stage={zero}", "parallel.sp=2", f"train.run_dir={run}"],
                  workdir))
        _FULL[zero] = run
    return _FULL[zero]


# ZeRO 1 partitions the optimizer state as ZeRO 2 does (the z2 cases cover it); ZeRO 3 adds the
# parameters
@pytest.mark.parametrize("zero, world, sp", [(2, 2, 2), (2, 4, 4), (3, 2, 2)],
                         ids=["z2-w2sp2", "z2-w4sp4", "z3-w2sp2"])
def test_resume_at_other_layout(workdir, zero, world, sp):
    full = full_run(workdir, zero)
    saved = os.path.join(full, "checkpoints", ckpt.tag_for(K))
    run = str(workdir / f"z{zero}_w{world}_sp{sp}")
    os.makedirs(os.path.join(run, "checkpoints"))
    shutil.copytree(saved, os.path.join(run, "checkpoints", ckpt.tag_for(K)))
    after = os.path.join(run, "after_load")
    ga = 2  # dp 2 -> 1: two micro-batches per step keep the global batch of 4 sequences
    proc = ok(launch("torchrun", world, [*BASE, f"deepspeed.zero_stage={zero}", f"parallel.sp={sp}",
                                         f"train.grad_accum={ga}", f"train.run_dir={run}", "--resume", "auto"],
                     workdir, env={"LONGCTX_SAVE_AFTER_LOAD": after}))
    universal = world != 4
    assert ("through its universal conversion" in proc.stderr) == universal, proc.stderr[-2000:]
    assert f"resumed from {os.path.join(run, 'checkpoints', ckpt.tag_for(K))} at step {K}" in proc.stderr

    # state as loaded in the new layout == state saved by the old one, exactly
    loaded = os.path.join(after, ckpt.tag_for(K))
    w0, w1 = ckpt.consolidated_state_dict(saved), ckpt.consolidated_state_dict(loaded)
    o0, o1 = ckpt.consolidated_optimizer_state(saved), ckpt.consolidated_optimizer_state(loaded)
    assert sorted(w0) == sorted(w1) and len(o1["exp_avg"]) == len(w0)
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(o0[key][name], o1[key][name]), (name, key)
    assert o0["steps"] == o1["steps"] == [K, K]

    # the loss continues the uninterrupted run's
    a, b = losses(full)[K:], losses(run)
    assert len(a) == len(b) == N - K
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-4 * abs(x), (a, b)

    # and so do the weights and Adam's step count
    end0 = os.path.join(full, "checkpoints", ckpt.tag_for(N))
    end1 = os.path.join(run, "checkpoints", ckpt.tag_for(N))
    f0, f1 = ckpt.consolidated_state_dict(end0), ckpt.consolidated_state_dict(end1)
    for name in f0:
        assert torch.allclose(f0[name], f1[name], rtol=0, atol=1e-6), (name, (f0[name] - f1[name]).abs().max())
    steps = [ckpt.consolidated_optimizer_state(end)["steps"] for end in (end0, end1)]
    assert steps == [[N, N], [N, N]], steps
    rng_files = sorted(f for f in os.listdir(end1) if f.startswith("rng_rank"))
    assert rng_files == [f"rng_rank{r:05d}.pt" for r in range(world)]


# --- refusals (no processes: the check runs before anything is built) ---------------------------

def _meta(world=4, sp=2, mb=2, ga=1, overrides=()):
    cfg = load_config(TINY, [*SMALL, f"parallel.sp={sp}", f"data.micro_batch_size={mb}", f"train.grad_accum={ga}",
                             *overrides], world_size=world)
    return {"step": K, "world_size": world, "sp": sp, "grad_accum": ga, "zero_stage": cfg.deepspeed.zero_stage,
            "model": model_signature(cfg), "data": {k: cfg.data[k] for k in ("seed", "seq_len", "kind",
                                                                             "micro_batch_size")}}


def _refusal(meta, world, overrides):
    from longctx.train.trainer import TrainingError, _check_resume_compatible
    cfg = load_config(TINY, [*SMALL, *overrides], world_size=world)
    with pytest.raises(TrainingError) as e:
        _check_resume_compatible(meta, cfg, world, "/ck/step_00000002")
    return str(e.value)


def test_layout_that_changes_the_global_batch_refused():
    msg = _refusal(_meta(), 2, ["parallel.sp=2", "data.micro_batch_size=2"])
    assert "global batch of 4 sequences per step" in msg and "this run reads 2" in msg, msg
    assert "data.micro_batch_size=2 x train.grad_accum=1 x dp 2 = 4 ranks / parallel.sp=2" in msg, msg
    assert "keep it with train.grad_accum=2 or data.micro_batch_size=4" in msg, msg
    # a dp that cannot divide the global batch: say which world sizes can
    msg = _refusal(_meta(world=4, sp=1, mb=1), 3, ["data.micro_batch_size=1"])
    assert "dp 3 does not divide 4" in msg and "W / parallel.sp dividing 4" in msg, msg


def test_other_model_config_refused():
    msg = _refusal(_meta(), 2, ["parallel.sp=2", "train.grad_accum=2", "model.d_model=128"])
    assert "model.d_model: checkpoint 64 vs config 128" in msg and "use the config it was trained with" in msg, msg


def test_same_global_batch_accepted():
    from longctx.train.trainer import _check_resume_compatible
    for world, overrides in ((2, ["parallel.sp=2", "train.grad_accum=2"]),
                             (4, ["parallel.sp=4", "train.grad_accum=2"]),
                             (2, ["parallel.sp=2", "data.micro_batch_size=4"]),
                             (8, ["parallel.sp=2", "data.micro_batch_size=1"])):
        cfg = load_config(TINY, [*SMALL, *overrides], world_size=world)
        _check_resume_compatible(_meta(), cfg, world, "/ck/step_00000002")
