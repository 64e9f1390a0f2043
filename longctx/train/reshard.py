"""Resume at another world size or SP degree.

Our Mesh presents every dp x sp rank to DeepSpeed as data parallel (parallel/groups.py), so ZeRO
partitions weights and optimizer state over the world size, whatever the SP degree:

* same world size, another SP degree (4 ranks dp 2 x sp 2 -> 4 ranks sp 4): the ZeRO partitions
  are unchanged and DeepSpeed's own load is exact;
* another world size at ZeRO 1-3: rank 0 converts the checkpoint once with DeepSpeed's
  `ds_to_universal` into `<checkpoint>/universal/` (one folder per parameter holding its full
  fp32 weight, exp_avg, exp_avg_sq and step), and the new engine, created with
  `checkpoint.load_universal`, cuts its own partitions from it. The conversion is kept and
  reused by later resumes from the same checkpoint;
* ZeRO-0 keeps whole weights and optimizer state in one file: DeepSpeed's own load.

What the step sees is unchanged only if the global batch is: the samplers are functions of
(seed, global step) and global batch = data.micro_batch_size x train.grad_accum x dp, so a new
dp must be balanced by grad_accum (or the micro-batch); `global_batch_problem` says which settings
keep it. Per-rank RNG states belong to the old ranks: at another world size every rank is seeded
from (train.seed, step, rank) instead (checkpoint.load); no model here draws random numbers in a
step.

Tested (tests/distributed/test_resume_reshard.py): 4 ranks dp 2 x sp 2 -> 2 ranks sp 2 and
4 ranks sp 4, ZeRO 1-3, fp32 on CPU: weights and Adam moments equal, losses within 1e-4.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from longctx.train.checkpoint import CheckpointError
from longctx.train.files import atomic_write, fsync_dir

UNIVERSAL = "universal"  # sub-folder of a checkpoint holding its universal conversion
_DONE = ".complete"      # written last inside it


class ReshardError(CheckpointError):
    """The checkpoint cannot be resharded to this layout."""


def saved_layout(meta: Dict[str, Any]) -> Dict[str, int]:
    """world, sp, dp, micro_batch_size, grad_accum and global batch (sequences per step) of a
    checkpoint's run."""
    world, sp = int(meta["world_size"]), int(meta.get("sp", 1))
    mb, ga = int(meta["data"]["micro_batch_size"]), int(meta.get("grad_accum", 1))
    return {"world": world, "sp": sp, "dp": world // sp, "mb": mb, "ga": ga, "global": mb * ga * (world // sp)}


def global_batch_problem(meta: Dict[str, Any], mb: int, ga: int, world: int, sp: int) -> Optional[str]:
    """None when this run (micro-batch mb, grad_accum ga, world, parallel.sp) reads the same
    global batch per step as the checkpoint's run; else what differs and the settings that
    would keep it."""
    s = saved_layout(meta)
    dp = world // sp
    if mb * ga * dp == s["global"]:
        return None
    head = (f"it was trained with a global batch of {s['global']} sequences per step (data.micro_batch_size="
            f"{s['mb']} x train.grad_accum={s['ga']} x dp {s['dp']} = {s['world']} ranks / parallel.sp={s['sp']}) "
            f"but this run reads {mb * ga * dp} (data.micro_batch_size={mb} x train.grad_accum={ga} x dp {dp} = "
            f"{world} ranks / parallel.sp={sp}), so the data stream and the loss would not continue where they "
            f"stopped")
    if s["global"] % dp:
        return (f"{head}; dp {dp} does not divide {s['global']}: launch a world size W with W / parallel.sp "
                f"dividing {s['global']} (e.g. {s['world']} ranks)")
    per_rank = s["global"] // dp  # micro_batch_size x grad_accum on each dp rank
    fixes = []
    if per_rank % mb == 0:
        fixes.append(f"train.grad_accum={per_rank // mb}")
    if per_rank % ga == 0 and per_rank // ga != mb:
        fixes.append(f"data.micro_batch_size={per_rank // ga}")
    if not fixes:
        g = math.gcd(per_rank, mb)
        fixes.append(f"data.micro_batch_size={g} with train.grad_accum={per_rank // g}")
    return f"{head}; keep it with {' or '.join(fixes)}"


def needs_universal(meta: Dict[str, Any], world: int) -> bool:
    """Does loading this checkpoint on `world` ranks need the universal conversion?"""
    return int(meta.get("zero_stage", 0)) >= 1 and int(meta["world_size"]) != world


def describe(meta: Dict[str, Any], world: int, sp: int) -> str:
    """'4 ranks (dp 2 x sp 2) -> 2 ranks (dp 1 x sp 2)' for the log."""
    s = saved_layout(meta)
    return f"{s['world']} ranks (dp {s['dp']} x sp {s['sp']}) -> {world} ranks (dp {world // sp} x sp {sp})"


def universal_folder(folder: str) -> str:
    return os.path.join(folder, UNIVERSAL)


def convert_to_universal(folder: str) -> str:
    """Convert a ZeRO 1-3 checkpoint folder to DeepSpeed's universal format in
    `<folder>/universal/` (no process group needed; reused when already complete). Returns it."""
    out = universal_folder(folder)
    if os.path.exists(os.path.join(out, _DONE)):
        return out
    from deepspeed.checkpoint import ds_to_universal
    tmp = os.path.join(folder, f".{UNIVERSAL}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # One worker each: no child processes (the conversion runs inside a training rank).
    args = SimpleNamespace(input_folder=folder, output_folder=tmp, num_extract_workers=1, num_merge_workers=1,
                           keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(args)
        atomic_write(os.path.join(tmp, _DONE), b"")
        shutil.rmtree(out, ignore_errors=True)  # a conversion that never finished
        os.replace(tmp, out)
        fsync_dir(out)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = " | ".join(log.getvalue().strip().splitlines()[-3:])
        raise ReshardError(
            f"converting {folder} to DeepSpeed's universal checkpoint failed ({type(exc).__name__}: {exc}"
            f"{'; ' + tail if tail else ''}); resume with the world size it was saved with, or convert it "
            f"yourself: python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder "
            f"{folder} --output_folder {out} (then create {os.path.join(out, _DONE)})") from exc
    return out


def prepare_universal(folder: str) -> str:
    """Collective: rank 0 converts (once), every rank returns the universal folder or raises the
    same error. The other ranks wait in a broadcast, so parallel.timeout_s must cover the
    conversion (seconds for the models trained on a CPU)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    result: List[Optional[str]] = [None, None]
    if rank == 0:
        try:
            result[0] = convert_to_universal(folder)
        except ReshardError as exc:
            result[1] = str(exc)
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if result[1]:
        raise ReshardError(result[1])
    return result[0]


def load_universal(engine, folder: str) -> None:
    """Collective: load `<folder>/universal` into an engine created with
    checkpoint.load_universal (weights, optimizer state, scheduler, step counters)."""
    path, _ = engine.load_checkpoint(folder, tag=UNIVERSAL, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise ReshardError(f"DeepSpeed could not load the universal checkpoint {universal_folder(folder)}")
    # Two mends for DeepSpeed 0.19's ZeRO-3 universal load, found by the loss test (harmless at
    # ZeRO 1-2): it copies param group 0's hyperparameters onto every group (weight decay on
    # the no-decay group), and gives every group one shared `step` tensor, which Adam then
    # advances once per group per step (wrong bias correction from the second group on).
    sd = torch.load(os.path.join(universal_folder(folder), "zero", "optimizer_state.pt"), map_location="cpu",
                    weights_only=False)
    saved = sd.get("param_groups") or sd.get("optimizer_state_dict", {}).get("param_groups")
    groups = engine.optimizer.optimizer.param_groups if hasattr(engine.optimizer, "optimizer") else None
    if saved is None or groups is None or len(saved) != len(groups):
        raise ReshardError(f"{universal_folder(folder)}: cannot match the checkpoint's "
                           f"{len(saved) if saved else 0} optimizer param groups to this run's "
                           f"{len(groups) if groups else 0}")
    for group, old in zip(groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
