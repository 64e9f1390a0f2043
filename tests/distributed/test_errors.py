"""Bad input gets one clear error line (exit code 2) and nothing saved is overwritten."""
import json
import os

import pytest

from launching import SMALL, TINY, error_lines, launch
from longctx.train import checkpoint as ckpt
from longctx.train.data import prepare_token_file


def one_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    wd = tmp_path_factory.mktemp("errors")
    run = str(wd / "run")
    proc = launch("python", 1, [TINY, *SMALL, "train.steps=4", "checkpoint.every=2", f"train.run_dir={run}"], wd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return wd, run


def digests(run):
    root = os.path.join(run, "checkpoints")
    return {f: ckpt.sha256_file(os.path.join(dp, f)) for dp, _, fs in os.walk(root) for f in fs}


def test_config_typo(tmp_path):
    one_error(launch("python", 1, [TINY, "model.n_layer=3"], tmp_path), "model.n_layer", "model.n_layers")


def test_fresh_start_over_existing_checkpoints_refused(trained):
    wd, run = trained
    before = digests(run)
    one_error(launch("python", 1, [TINY, *SMALL, "train.steps=4", f"train.run_dir={run}"], wd),
              "already holds checkpoints", "--resume auto")
    assert digests(run) == before


def test_resume_from_another_model_config(trained):
    wd, run = trained
    before = digests(run)
    one_error(launch("python", 1, [TINY, *SMALL, "model.d_model=96", "model.n_heads=4", "train.steps=6",
                                   f"train.run_dir={run}", "--resume", "auto"], wd),
              "another model config", "model.d_model", "64", "96")
    assert digests(run) == before


def test_resume_missing_checkpoint(trained):
    wd, run = trained
    one_error(launch("python", 1, [TINY, *SMALL, f"train.run_dir={wd}/other", "--resume", f"{wd}/nope"], wd),
              "no such checkpoint")


def test_resume_auto_when_finished_does_nothing(trained):
    wd, run = trained
    before = digests(run)
    proc = launch("python", 1, [TINY, *SMALL, "train.steps=4", "checkpoint.every=2", f"train.run_dir={run}",
                                "--resume", "auto"], wd)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr, proc.stderr[-2000:]
    assert digests(run) == before


def test_init_from_checkpoint_weights_and_mismatch(trained):
    """init.from_checkpoint copies a run's consolidated weights (a new run, e.g. a curriculum
    stage); another architecture is one clear error naming the differing tensors."""
    import torch
    from longctx.config import ConfigError, load_config
    from longctx.model.transformer import DecoderLM
    from longctx.train.trainer import load_weights_from_run
    wd, run = trained
    cfg = load_config(TINY, list(SMALL))
    torch.manual_seed(123)
    model = DecoderLM(cfg.model)
    load_weights_from_run(model, run)
    saved = ckpt.consolidated_state_dict(ckpt.resolve_folder(run))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    wide = DecoderLM(load_config(TINY, [*SMALL, "model.d_model=96", "model.n_heads=4"]).model)
    with pytest.raises(ValueError, match="does not fit model.*embed.weight"):
        load_weights_from_run(wide, run)
    with pytest.raises(ConfigError, match="start from one of them"):
        load_config(TINY, [*SMALL, f"init.from_checkpoint={run}", f"init.from_hf={wd}"])
    proc = launch("python", 1, [TINY, *SMALL, "train.steps=1", f"train.run_dir={wd}/stage2",
                                f"init.from_checkpoint={run}"], wd)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missing_and_corrupt_data(tmp_path):
    one_error(launch("python", 1, [TINY, *SMALL, "data.kind=tokens", f"data.path={tmp_path}/nope",
                                   f"train.run_dir={tmp_path}/r1"], tmp_path), "not found", "longctx data prepare")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world " * 500)
    prefix = str(tmp_path / "tok")
    prepare_token_file([str(tmp_path / "docs")], prefix, progress=False)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    one_error(launch("python", 1, [TINY, *SMALL, "data.kind=tokens", f"data.path={prefix}",
                                   f"train.run_dir={tmp_path}/r2"], tmp_path), "corrupt", "longctx data prepare")


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss(tmp_path, policy):
    run = str(tmp_path / "run")
    proc = launch("python", 1, [TINY, *SMALL, "train.steps=5", "checkpoint.every=2", f"train.run_dir={run}",
                                f"train.on_nonfinite={policy}"], tmp_path, env={"LONGCTX_INJECT_NAN_STEP": "3"})
    recs = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    if policy == "stop":
        one_error(proc, "non-finite loss at step 3", os.path.join(run, "checkpoints", ckpt.tag_for(2)))
        assert [r["step"] for r in recs] == [1, 2]
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "non-finite loss at step 3; the step is skipped" in proc.stderr
        assert [r["step"] for r in recs] == [1, 2, 4, 5]
        assert all(r["loss"] == r["loss"] for r in recs)  # no NaN reached the log


@pytest.mark.parametrize("zero", [0, 2])
def test_nonfinite_gradients_with_finite_loss_stop(tmp_path, zero):
    run = str(tmp_path / "run")
    proc = launch("python", 1, [TINY, *SMALL, "train.steps=5", "checkpoint.every=2", f"train.run_dir={run}",
                                f"deepspeed.zero_stage={zero}"], tmp_path, env={"LONGCTX_INJECT_NAN_GRAD_STEP": "3"})
    one_error(proc, "non-finite gradients at step 3", os.path.join(run, "checkpoints", ckpt.tag_for(2)))
