"""Training with sequence parallelism (lightning layers, state passing) equals one process on
the same global batch: the loss is the global token mean and gradients are averaged once."""
import json
import os

import pytest

from launching import SMALL, TINY, error_lines, launch

LIGHT = [*SMALL, "model.mixers=[lightning]", "data.mask_documents=true", "train.steps=4",
         "checkpoint.every=100", "deepspeed.zero_stage=2"]


def losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    wd = tmp_path_factory.mktemp("sp")
    run = str(wd / "sp1")
    proc = launch("python", 1, [TINY, *LIGHT, "data.micro_batch_size=4", f"train.run_dir={run}"], wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd, losses(run)


@pytest.mark.parametrize("world, sp, mb", [(2, 2, 4), (4, 2, 2)], ids=["sp2", "dp2xsp2"])
def test_sp_training_matches_single_process(single, world, sp, mb):
    wd, ref = single
    run = str(wd / f"w{world}sp{sp}")
    proc = launch("torchrun", world, [TINY, *LIGHT, f"parallel.sp={sp}", f"data.micro_batch_size={mb}",
                                      f"train.run_dir={run}"], wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"dp {world // sp} x sp {sp}" in proc.stderr
    got = losses(run)
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (got, ref)


def test_world_size_the_parallel_config_cannot_use(tmp_path):
    proc = launch("torchrun", 2, [TINY, *LIGHT, "parallel.sp=3", "data.seq_len=66", f"train.run_dir={tmp_path}/r"],
                  tmp_path)
    assert proc.returncode != 0
    err = error_lines(proc)
    assert len(err) == 1 and "world size 2 is not divisible by parallel.sp=3" in err[0], proc.stderr[-2000:]
