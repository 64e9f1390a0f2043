"""End-to-end training through the real launchers (2 gloo processes, DeepSpeed on CPU):
an interrupted-and-resumed run reproduces the uninterrupted run's losses bit for bit."""
import json
import os

import pytest

from launching import SMALL, TINY, launch
from longctx.train import checkpoint as ckpt


def losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def full_z2(workdir):
    """The uninterrupted 6-step ZeRO-2 run every resumed run is compared with."""
    run = str(workdir / "full_z2")
    ok(launch("torchrun", 2, [TINY, *SMALL, "deepspeed.zero_stage=2", "train.steps=6", f"train.run_dir={run}"], workdir))
    return run


def test_resume_bit_identical_torchrun_zero3(workdir):
    """ZeRO 3 (parameters partitioned too); a ZeRO-2 run stopped and resumed bit for bit is
    test_mpirun_train_and_resume_matches_torchrun's (and test_faults' under torchrun)."""
    zero = 3
    full = str(workdir / f"full_z{zero}")
    ok(launch("torchrun", 2, [TINY, *SMALL, f"deepspeed.zero_stage={zero}", "train.steps=6",
                              f"train.run_dir={full}"], workdir))
    run = str(workdir / f"resumed_z{zero}")
    common = [TINY, *SMALL, f"deepspeed.zero_stage={zero}", "train.steps=6", f"train.run_dir={run}"]
    ok(launch("torchrun", 2, [*common, "train.stop_after=3"], workdir))
    assert len(losses(run)) == 3
    ok(launch("torchrun", 2, [*common, "--resume", "auto"], workdir))
    a, b = losses(full), losses(run)
    assert len(a) == 6 and a == b, (a, b)  # bit-identical floats
    assert a[-1] < a[0]
    # run folder holds what a user expects
    for name in ("metrics.jsonl", "loss.png", "config.yaml"):
        assert os.path.getsize(os.path.join(run, name)) > 0
    folder = ckpt.newest_complete(os.path.join(run, "checkpoints"), verify=True)
    assert folder.endswith(ckpt.tag_for(6))
    assert sorted(f for f in os.listdir(folder) if f.startswith("rng_rank")) == ["rng_rank00000.pt", "rng_rank00001.pt"]


def test_mpirun_train_and_resume_matches_torchrun(workdir, full_z2):
    """mpi4py rank discovery gives the same run as torchrun; a save that never finished (no
    manifest, as after a kill) is skipped by --resume auto."""
    run = str(workdir / "mpi_z2")
    common = [TINY, *SMALL, "deepspeed.zero_stage=2", "train.steps=6", f"train.run_dir={run}"]
    proc = ok(launch("mpirun", 2, [*common, "train.stop_after=5", "checkpoint.every=3"], workdir))
    assert "mpi launch, world 2" in proc.stderr
    root = os.path.join(run, "checkpoints")
    # simulate a save killed midway: step 5's folder loses its manifest, `latest` still names it
    os.remove(os.path.join(root, ckpt.tag_for(5), ckpt.MANIFEST))
    proc = ok(launch("mpirun", 2, [*common, "--resume", "auto"], workdir))
    assert f"resumed from {os.path.join(root, ckpt.tag_for(3))}" in proc.stderr
    assert losses(run) == losses(full_z2)


# ZeRO 1's gradients are checked against SP=1 in test_sp_gradients (ring2-1)
@pytest.mark.parametrize("variant", [["deepspeed.zero_stage=0"],
                                     ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"]],
                         ids=["zero0", "zero2-offload"])
def test_zero_stages_agree(workdir, full_z2, variant):
    """The loss is the global token mean at every ZeRO stage (no stage scales gradients
    differently): each stage's losses match ZeRO-2's to fp32 round-off."""
    run = str(workdir / ("stage-" + "-".join(v.split("=")[1] for v in variant)))
    ok(launch("torchrun", 2, [TINY, *SMALL, *variant, "train.steps=6", f"train.run_dir={run}"], workdir, timeout=600))
    a, b = losses(full_z2), losses(run)
    assert len(b) == 6
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)


def test_resume_at_other_world_size_keeps_the_global_batch(workdir, full_z2):
    """A 2-rank checkpoint resumes on one process only with the same global batch (resharding
    itself: tests/distributed/test_resume_reshard.py); the refusal names the settings that keep it."""
    proc = launch("python", 1, [TINY, *SMALL, "deepspeed.zero_stage=2", "train.steps=8", f"train.run_dir={full_z2}",
                                "--resume", "auto"], workdir)
    assert proc.returncode == 2
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "global batch of 4 sequences per step" in err[0] and "this run reads 2" in err[0] \
        and "keep it with train.grad_accum=2 or data.micro_batch_size=4" in err[0], proc.stderr
