"""The trainer's start-up memory check on several ranks: every rank reaches the same collective
whatever its planner does, so one rank over budget stops all of them with the refusal, and a
planner that fails on one rank (any exception) skips the check instead of hanging the others."""
import os

from mp import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _check(rank, world, mode):
    import torch

    from longctx.config import load_config
    from longctx.train import planner, trainer
    cfg = load_config(os.path.join(ROOT, "configs", "tiny-cpu.yaml"), ["train.memory_gib=1000"])
    if rank == 1:
        if mode == "raise":
            def boom(*a, **k):
                raise RuntimeError("planner bug on rank 1")
            planner.check_fits = boom
        else:  # this rank's machine is over budget
            planner.check_fits = lambda *a, **k: (False, None, "data.seq_len=256 will not fit: test\nsecond line")
    try:
        trainer._check_memory(cfg, world, 1, torch.device("cpu"))
    except trainer.TrainingError as exc:
        return str(exc)
    return None


def test_one_rank_over_budget_stops_every_rank():
    out = run_world(2, _check, "refuse")
    assert all(o is not None and o.startswith("data.seq_len=256 will not fit: test (rank 1's machine)") for o in out), out
    assert all("second line" in o and "train.memory_check=false" in o for o in out)


def test_planner_failure_on_one_rank_skips_the_check_without_hanging():
    assert run_world(2, _check, "raise") == [None, None]
