"""Sharded checkpoints that count only when complete.

Layout of `<run_dir>/checkpoints/`:

    step_00000050/            one checkpoint (a DeepSpeed tag)
        mp_rank_00_model_states.pt, *optim_states.pt   DeepSpeed's ZeRO shards
        rng_rank00000.pt ...                           every rank's RNG states
        carry_rank00000.pt ...                         with train.carry_state: every rank's
                                                       carried mixer state, one dict per micro-batch
        longctx.json                                   step, tokens, sampler, config, world
        MANIFEST.json                                  SHA-256 of every file above, written last
    latest                                             name of the newest complete checkpoint

Order of a save: every rank writes its shards and RNG file -> barrier -> rank 0 hashes the
folder, writes MANIFEST.json, then `latest` (each write: temp file, fsync, rename, fsync of the
folder) -> barrier. A folder without a manifest (a save killed midway) is never resumed from.
Assumes a file system shared by all ranks, as DeepSpeed does.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from longctx.train.files import atomic_write, sha256_file  # noqa: F401 (part of this module's API)

MANIFEST = "MANIFEST.json"
META = "longctx.json"
LATEST = "latest"
_TAG_RE = re.compile(r"^step_(\d{8,})$")
# Test hook: right after a resume's load, save the engine (DeepSpeed's files only) under this
# folder, so tests compare the consolidated state as loaded with the one saved
# (tests/distributed/test_resume_reshard.py).
_SAVE_AFTER_LOAD = os.environ.get("LONGCTX_SAVE_AFTER_LOAD")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete, corrupt, or from another model)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> Optional[int]:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _files(folder: str) -> List[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), folder)
            if rel != MANIFEST and not os.path.basename(rel).startswith("."):
                out.append(rel)
    return sorted(out)


def write_manifest(folder: str) -> Dict[str, str]:
    files = {rel: sha256_file(os.path.join(folder, rel)) for rel in _files(folder)}
    atomic_write(os.path.join(folder, MANIFEST), json.dumps({"files": files}, indent=1).encode())
    return files


def check_complete(folder: str, verify: bool) -> Optional[str]:
    """None if `folder` is a complete checkpoint, else the reason it is not."""
    man = os.path.join(folder, MANIFEST)
    if not os.path.exists(man):
        return "no MANIFEST.json (the save did not finish)"
    try:
        files = json.load(open(man))["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable MANIFEST.json ({exc})"
    for rel, digest in files.items():
        path = os.path.join(folder, rel)
        if not os.path.exists(path):
            return f"file {rel} listed in the manifest is missing"
        if verify and sha256_file(path) != digest:
            return f"file {rel} does not match its SHA-256 in the manifest (corrupt)"
    return None


def list_checkpoints(root: str) -> List[str]:
    """Checkpoint folders under root, newest step first (complete or not)."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if step_of(t) is not None and os.path.isdir(os.path.join(root, t))]
    return [os.path.join(root, t) for t in sorted(tags, key=step_of, reverse=True)]


def newest_complete(root: str, verify: bool) -> Optional[str]:
    """The newest checkpoint folder with a valid manifest; incomplete ones are skipped."""
    for folder in list_checkpoints(root):
        if check_complete(folder, verify) is None:
            return folder
    return None


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, root: str, step: int, meta: Dict[str, Any], keep_last: int,
         carried: Optional[List[Dict[str, Any]]] = None) -> str:
    """Collective: every rank calls it. Returns the checkpoint folder. carried: this rank's
    carried state (train.carry_state), one ctx.state dict per micro-batch, or None."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    folder = os.path.join(root, tag)
    verdict = [None]
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(folder):
            if check_complete(folder, verify=False) is None:
                # Resume refuses to run behind a newer complete checkpoint, so this only happens
                # on a repeated save of the same step: keep the first one.
                verdict[0] = f"checkpoint {folder} already exists and is complete; refusing to overwrite it"
            else:
                shutil.rmtree(folder)  # leftovers of a save killed midway
    if dist.is_initialized():
        dist.broadcast_object_list(verdict, src=0)  # every rank raises together, none waits forever
    if verdict[0]:
        raise CheckpointError(verdict[0])
    engine.save_checkpoint(root, tag=tag, client_state={"longctx_step": step}, save_latest=False)
    torch.save(rng_state(), os.path.join(folder, f"rng_rank{rank:05d}.pt"))
    if carried is not None:  # before the manifest, which then vouches for it
        torch.save({"step": step, "state": _compact(carried)}, os.path.join(folder, _carry_file(rank)))
    if rank == 0:
        atomic_write(os.path.join(folder, META), json.dumps(meta, indent=1, sort_keys=True).encode())
    _fsync_files(folder)  # shards on disk before the manifest can vouch for them
    _barrier()
    if rank == 0:
        write_manifest(folder)
        atomic_write(os.path.join(root, LATEST), (tag + "\n").encode())
        prune(root, keep_last)
    _barrier()
    return folder


def _fsync_files(folder: str) -> None:
    for rel in _files(folder):
        fd = os.open(os.path.join(folder, rel), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def prune(root: str, keep_last: int) -> List[str]:
    """Delete all but the newest `keep_last` complete checkpoints, and incomplete folders older
    than the newest complete one. Returns what was deleted."""
    folders = list_checkpoints(root)
    complete = [f for f in folders if check_complete(f, verify=False) is None]
    keep = set(complete[:keep_last])
    newest = step_of(os.path.basename(complete[0])) if complete else None
    removed = []
    for f in folders:
        s = step_of(os.path.basename(f))
        if f in keep or (f not in complete and (newest is None or s > newest)):
            continue
        shutil.rmtree(f, ignore_errors=True)
        removed.append(f)
    return removed


def set_aside_unusable(root: str, newer_than: Optional[str], verify: bool) -> List[str]:
    """Rename checkpoints newer than `newer_than` that have a manifest but fail it (corrupt) to
    `<name>.unusable-<n>`: kept for inspection, out of the way of the saves that will redo their
    steps. Folders without a manifest (saves killed midway) stay; the next save replaces them.
    Returns one line per folder moved."""
    floor = step_of(os.path.basename(newer_than)) if newer_than else -1
    notes = []
    for f in list_checkpoints(root):
        if step_of(os.path.basename(f)) <= floor or not os.path.exists(os.path.join(f, MANIFEST)):
            continue
        why = check_complete(f, verify)
        if why:
            n, dest = 0, f + ".unusable"
            while os.path.exists(dest):
                n += 1
                dest = f"{f}.unusable-{n}"
            os.rename(f, dest)
            notes.append(f"skipped {os.path.basename(f)} ({why}); moved it to {os.path.basename(dest)}")
    return notes


def resolve_resume(root: str, resume: Optional[str], verify: bool) -> Optional[str]:
    """Turn `--resume` into a checkpoint folder (or None for a fresh start).

    resume: None / "none" -> fresh start, refused if root already holds checkpoints (nothing
    saved is overwritten); "auto" -> the newest complete checkpoint, fresh if there is none;
    a path -> that checkpoint folder, which must be complete and the newest.
    """
    existing = list_checkpoints(root)
    if resume in (None, "none"):
        if existing:
            raise CheckpointError(
                f"{root} already holds checkpoints ({os.path.basename(existing[0])} newest): pass "
                f"--resume auto to continue that run, or set train.run_dir to a new folder")
        return None
    if resume == "auto":
        return newest_complete(root, verify)
    folder = resume
    if os.path.isdir(folder) and os.path.exists(os.path.join(folder, LATEST)):
        tag = open(os.path.join(folder, LATEST)).read().strip()
        folder = os.path.join(folder, tag)
    if not os.path.isdir(folder):
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder (expected .../checkpoints/step_NNNNNNNN)")
    why = check_complete(folder, verify)
    if why:
        raise CheckpointError(f"--resume {resume}: checkpoint is not usable: {why}")
    newest = newest_complete(os.path.dirname(os.path.abspath(folder)), verify=False)
    if newest and os.path.abspath(newest) != os.path.abspath(folder) and \
            os.path.dirname(os.path.abspath(folder)) == os.path.abspath(root):
        raise CheckpointError(
            f"--resume {resume}: a newer checkpoint {os.path.basename(newest)} exists in {root} and would be "
            f"overwritten; resume from it (--resume auto) or use a new train.run_dir")
    return folder


def read_meta(folder: str) -> Dict[str, Any]:
    return json.load(open(os.path.join(folder, META)))


def load(engine, folder: str, universal: bool = False) -> Dict[str, Any]:
    """Collective: restore engine (weights, optimizer, scheduler) and this rank's RNG states.
    Returns the longctx meta (step, tokens, sampler state, config).

    universal: load the checkpoint's universal conversion (train/reshard.py; the engine was
    created with checkpoint.load_universal) - a resume at another world size. The saved RNG
    states are per rank of the old world: at another world size every rank is seeded from
    (train.seed, step, rank) instead."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    meta = read_meta(folder)
    if universal:
        from longctx.train.reshard import load_universal
        load_universal(engine, folder)
    else:
        root, tag = os.path.split(os.path.abspath(folder))
        path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load {folder}")
    if meta.get("world_size", world) == world:
        rng_file = os.path.join(folder, f"rng_rank{rank:05d}.pt")
        if not os.path.exists(rng_file):
            raise CheckpointError(f"{folder} has no RNG state for rank {rank} (saved with fewer ranks?)")
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        seed = int(meta.get("config", {}).get("train", {}).get("seed", 0))
        s = np.random.SeedSequence([seed, int(meta["step"]), rank]).generate_state(2)
        random.seed(int(s[0]))
        np.random.seed(int(s[1]))
        torch.manual_seed(int(s[0]) << 32 | int(s[1]))
    if _SAVE_AFTER_LOAD:  # test hook: the state as loaded, in this run's layout
        engine.save_checkpoint(_SAVE_AFTER_LOAD, tag=tag_for(int(meta["step"])), save_latest=False)
    return meta


def _compact(state: Any) -> Any:
    """Every tensor of a nested state as a compact copy: a carried window tail is a view of the
    whole segment's keys, and torch.save would write the whole storage."""
    from torch.utils._pytree import tree_map  # walks dicts, lists and MemoryState (a NamedTuple)
    return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)


def _carry_file(rank: int) -> str:
    return f"carry_rank{rank:05d}.pt"


def load_carried(folder: str, step: int, n_micro: int, device) -> List[Dict[str, Any]]:
    """This rank's carried state (train.carry_state) saved with checkpoint `folder` at `step`:
    one ctx.state dict per micro-batch (memory weights and momentum as MemoryState, tails), on
    `device`. CheckpointError when the checkpoint has none for this rank or another layout."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = os.path.join(folder, _carry_file(rank))
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no carried state for rank {rank} ({_carry_file(rank)}): it was saved "
                              f"with train.carry_state=false or by fewer ranks; resume with the settings it was "
                              f"saved with, or start a new run (train.run_dir) from its weights with init.from_checkpoint")
    saved = torch.load(path, map_location=device, weights_only=False)  # MemoryState tuples: not weights-only
    if saved.get("step") != step or len(saved.get("state", ())) != n_micro:
        raise CheckpointError(f"{path} holds the state of step {saved.get('step')} for {len(saved.get('state', ()))} "
                              f"micro-batches; this resume needs step {step} and train.grad_accum={n_micro}")
    return list(saved["state"])


def resolve_folder(path: str) -> str:
    """A run folder, a checkpoints root (newest complete checkpoint) or one checkpoint folder ->
    the checkpoint folder. CheckpointError when there is none."""
    path = os.path.abspath(path)
    for root in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(root) and list_checkpoints(root):
            found = newest_complete(root, verify=False)
            if found:
                return found
    if os.path.exists(os.path.join(path, META)):
        why = check_complete(path, verify=False)
        if why:
            raise CheckpointError(f"{path} is not a complete checkpoint: {why}")
        return path
    raise CheckpointError(f"no checkpoint in {path}: pass a run folder, its checkpoints/ folder or a step_N folder")


def consolidated_state_dict(folder: str) -> Dict[str, torch.Tensor]:
    """The model's full fp32 weights from a checkpoint of any ZeRO stage (no process group
    needed): ZeRO 0-2 keep whole weights in the model-states file; ZeRO-3 shards them (one
    zero_pp_rank_N_mp_rank_00_model_states.pt per rank), and DeepSpeed's zero_to_fp32
    reassembles them."""
    states = os.path.join(folder, "mp_rank_00_model_states.pt")
    if os.path.exists(states):
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        if module and all(t.numel() > 0 for t in module.values()):
            return {k: v.float() for k, v in module.items()}
    elif not os.path.exists(os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt")):
        raise CheckpointError(f"{folder} has no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint?)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    root, tag = os.path.split(os.path.abspath(folder))
    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(root, tag=tag).items()}


def consolidated_optimizer_state(folder: str) -> Dict[str, Any]:
    """Adam's full fp32 moments from a ZeRO 1-3 checkpoint, put together from every rank's
    partition as zero_to_fp32 puts the weights together (no process group needed):
    {"steps": [Adam's step of each param group], "exp_avg": {name: tensor}, "exp_avg_sq": {...}}."""
    from deepspeed.utils import zero_to_fp32 as z2f
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        model_states = z2f.parse_model_states(z2f.get_model_state_files(folder))
    optim_files = z2f.get_optim_files(folder)
    sds = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in optim_files]
    stage = int(sds[0].get("zero_stage", 0))
    if stage < 1:
        raise CheckpointError(f"{folder} is a ZeRO-{stage} checkpoint: its optimizer state is not sharded "
                              f"(mp_rank_00_model_states.pt holds it whole)")
    counts = sds[0]["partition_count"]
    world = max(counts) if isinstance(counts, list) else int(counts)
    if world != len(sds):
        raise CheckpointError(f"{folder}: {len(sds)} optimizer shard files for a world of {world} ranks")
    inner = [sd["base_optimizer_state"] if stage <= 2 else sd["optimizer_state_dict"] for sd in sds]
    names = {n for group in model_states[0].param_shapes for n in group}
    out: Dict[str, Any] = {"steps": [int(inner[0]["state"][g]["step"]) for g in sorted(inner[0]["state"])]}
    for key in ("exp_avg", "exp_avg_sq"):
        flats = [[opt["state"][g][key] for g in sorted(opt["state"])] for opt in inner]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if stage <= 2:
                full = z2f._get_fp32_state_dict_from_zero2_checkpoint(
                    world, flats, model_states, True, sds[0].get("param_alignment_paddings"))
            else:
                full = z2f._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, True)
        out[key] = {k: v.float() for k, v in z2f.to_torch_tensor(full).items() if k in names}
    return out
