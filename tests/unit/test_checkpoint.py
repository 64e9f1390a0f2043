"""Checkpoint bookkeeping without DeepSpeed: completeness, corruption, pruning, resume choice."""
import json
import os

import pytest

from longctx.train import checkpoint as ckpt


def fake_checkpoint(root, step, complete=True, payload=b"weights"):
    folder = os.path.join(root, ckpt.tag_for(step))
    os.makedirs(folder)
    with open(os.path.join(folder, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(payload + str(step).encode())
    with open(os.path.join(folder, ckpt.META), "w") as f:
        json.dump({"step": step}, f)
    if complete:
        ckpt.write_manifest(folder)
        ckpt.atomic_write(os.path.join(root, ckpt.LATEST), ckpt.tag_for(step).encode())
    return folder


def test_incomplete_checkpoint_never_picked(tmp_path):
    root = str(tmp_path)
    fake_checkpoint(root, 10)
    fake_checkpoint(root, 20, complete=False)  # a save killed before its manifest
    assert ckpt.check_complete(os.path.join(root, ckpt.tag_for(20)), verify=True) is not None
    assert ckpt.newest_complete(root, verify=True).endswith(ckpt.tag_for(10))
    assert ckpt.resolve_resume(root, "auto", verify=True).endswith(ckpt.tag_for(10))


def test_corrupt_file_detected_by_manifest(tmp_path):
    root = str(tmp_path)
    fake_checkpoint(root, 10)
    f30 = fake_checkpoint(root, 30)
    with open(os.path.join(f30, "mp_rank_00_model_states.pt"), "r+b") as f:
        f.write(b"X")  # same size, different bytes
    why = ckpt.check_complete(f30, verify=True)
    assert why is not None and "SHA-256" in why
    assert ckpt.newest_complete(root, verify=True).endswith(ckpt.tag_for(10))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.resolve_resume(root, f30, verify=True)


def test_missing_listed_file(tmp_path):
    f = fake_checkpoint(str(tmp_path), 5)
    os.remove(os.path.join(f, ckpt.META))
    assert "missing" in ckpt.check_complete(f, verify=False)


def test_prune_keeps_last_k_complete(tmp_path):
    root = str(tmp_path)
    for s in (10, 20, 30, 40):
        fake_checkpoint(root, s)
    fake_checkpoint(root, 15, complete=False)  # stale leftover, older than the newest complete
    fake_checkpoint(root, 50, complete=False)  # may be a save in progress: never touched
    removed = ckpt.prune(root, keep_last=2)
    left = sorted(os.listdir(root))
    assert [ckpt.tag_for(s) for s in (30, 40, 50)] == [t for t in left if t.startswith("step_")]
    assert len(removed) == 3


def test_fresh_start_refused_when_checkpoints_exist(tmp_path):
    root = str(tmp_path)
    fake_checkpoint(root, 10)
    with pytest.raises(ckpt.CheckpointError, match="--resume auto"):
        ckpt.resolve_resume(root, None, verify=True)
    assert os.path.isdir(os.path.join(root, ckpt.tag_for(10)))  # nothing deleted


def test_resume_auto_on_empty_dir_is_fresh(tmp_path):
    assert ckpt.resolve_resume(str(tmp_path / "none"), "auto", verify=True) is None


def test_explicit_resume_behind_newer_refused(tmp_path):
    root = str(tmp_path)
    old = fake_checkpoint(root, 10)
    fake_checkpoint(root, 20)
    with pytest.raises(ckpt.CheckpointError, match="newer checkpoint"):
        ckpt.resolve_resume(root, old, verify=True)
    # the run's checkpoint folder itself resolves through `latest`
    assert ckpt.resolve_resume(root, root, verify=True).endswith(ckpt.tag_for(20))


def test_explicit_resume_missing_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path), str(tmp_path / "step_00000007"), verify=True)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = str(tmp_path / "latest")
    ckpt.atomic_write(p, b"step_00000001")
    ckpt.atomic_write(p, b"step_00000002")
    assert open(p).read() == "step_00000002"
    assert os.listdir(tmp_path) == ["latest"]  # no temp file left behind


def test_corrupt_newer_checkpoint_set_aside_not_deleted(tmp_path):
    root = str(tmp_path)
    fake_checkpoint(root, 10)
    f20 = fake_checkpoint(root, 20)
    with open(os.path.join(f20, "mp_rank_00_model_states.pt"), "ab") as f:
        f.write(b"garbage")
    fake_checkpoint(root, 30, complete=False)  # a killed save: left for the next save to replace
    chosen = ckpt.resolve_resume(root, "auto", verify=True)
    assert chosen.endswith(ckpt.tag_for(10))
    notes = ckpt.set_aside_unusable(root, chosen, verify=True)
    assert len(notes) == 1 and "step_00000020" in notes[0] and "SHA-256" in notes[0]
    assert os.path.isdir(f20 + ".unusable")  # kept for inspection
    assert [os.path.basename(f) for f in ckpt.list_checkpoints(root)] == [ckpt.tag_for(30), ckpt.tag_for(10)]
