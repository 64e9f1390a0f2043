"""train.carry_state end to end (2 gloo processes under torchrun, DeepSpeed on CPU): a run
stopped mid-stream and resumed reproduces the uninterrupted run's losses bit for bit (the
carried memory state comes back from the checkpoint); resuming it without carry_state, or on
other ranks, is refused with the reason."""
import json
import os

from launching import SMALL, TINY, error_lines, launch

# a memory layer and a softmax layer (which sees only its segment); two micro-batches per step,
# each with its own streams and state
CARRY = [TINY, *SMALL, "model.mixers=[memory,softmax]", "model.memory.chunk=16", "train.carry_state=true",
         "train.grad_accum=2", "deepspeed.zero_stage=1", "train.steps=4", "checkpoint.every=2"]


def losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_carry_state_resume_is_exact(tmp_path):
    full, run = str(tmp_path / "full"), str(tmp_path / "resumed")
    ok(launch("torchrun", 2, [*CARRY, f"train.run_dir={full}"], tmp_path))
    ok(launch("torchrun", 2, [*CARRY, f"train.run_dir={run}", "train.stop_after=2"], tmp_path))
    folder = os.path.join(run, "checkpoints", "step_00000002")
    assert {"carry_rank00000.pt", "carry_rank00001.pt"} <= set(os.listdir(folder))
    ok(launch("torchrun", 2, [*CARRY, f"train.run_dir={run}", "--resume", "auto"], tmp_path))
    a, b = losses(full), losses(run)
    assert len(a) == 4 and a == b, (a, b)  # bit-identical floats
    # the same checkpoint without carry_state is refused with the reason (the trainer runs the check)
    proc = launch("python", 1, [*CARRY, f"train.run_dir={run}", "train.carry_state=false", "train.steps=6",
                                "--resume", "auto"], tmp_path)
    err = error_lines(proc)
    assert proc.returncode == 2 and len(err) == 1 and "saved with train.carry_state=true" in err[0], proc.stderr
    # other ranks / micro-batch / grad_accum: refused too (tests/unit/test_carry.py)
