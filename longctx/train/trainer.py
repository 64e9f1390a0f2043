"""The training loop: a DeepSpeed engine (ZeRO 0-3, optional offload) driven step by step.

One optimizer step = `grad_accum` micro-batches on each of the dp x sp ranks. The loss each
rank backpropagates is its token-sum scaled so that the gradient DeepSpeed ends with (averaged
over ranks and micro-batches) is the gradient of the global token mean, exactly.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from longctx.config import ConfigError, deepspeed_config, model_signature, sp_degrees, sp_layout, to_yaml, validate
from longctx.model.transformer import DecoderLM, SegmentState, SeqContext, count_params, flops_per_token
from longctx.parallel.groups import build_mesh, init_distributed
from longctx.train import checkpoint as ckpt
from longctx.train import reshard
from longctx.train import faults
from longctx.parallel.comm import COMM
from longctx.train.metrics import JsonlLog, device_memory, measure_matmul_flops, peak_rss_bytes, plot_loss, read_jsonl


# Testing hooks: make the loss (or, with a finite loss, the gradients) of the N-th step (1-based,
# as in metrics.jsonl) NaN, to exercise train.on_nonfinite and the gradient check.
_INJECT_NAN_STEP = int(os.environ.get("LONGCTX_INJECT_NAN_STEP", "-1"))
_INJECT_NAN_GRAD_STEP = int(os.environ.get("LONGCTX_INJECT_NAN_GRAD_STEP", "-1"))
# Test hook: after the first step's backward, rank 0 saves every parameter's full gradient
# (gathered from ZeRO partitions) to this path; compares SP and ZeRO stages against SP=1.
_DUMP_GRADS = os.environ.get("LONGCTX_DUMP_GRADS")
# Test hook: sleep this many seconds at the start of every step, so that a signal or a kill
# lands mid-run at a known step (tests/distributed/test_faults.py).
_INJECT_STEP_SLEEP = float(os.environ.get("LONGCTX_INJECT_STEP_SLEEP", "0"))


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward (fault injection)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, unusable checkpoint, incompatible resume)."""


@dataclass
class TrainResult:
    run_dir: str
    first_step: int
    last_step: int
    losses: List[float]


def lr_lambda(cfg: DictConfig):
    """Linear warmup to train.lr, then cosine to train.lr * min_lr_ratio at train.steps."""
    t = cfg.train
    warm, total, floor = t.warmup_steps, t.steps, t.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """No weight decay on norms, biases and other vectors (the usual LLaMA recipe)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _quiet_deepspeed() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _allreduce(values: List[float], device) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _log0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def _check_resume_compatible(meta: Dict[str, Any], cfg: DictConfig, world: int, folder: str) -> None:
    # Keys added to the schema after a checkpoint was written (e.g. model.rope_scaling) read as
    # their defaults, so older checkpoints of the same model still resume.
    from longctx.config import ModelConfig
    saved = {**OmegaConf.to_container(OmegaConf.structured(ModelConfig)), **meta.get("model", {})}
    now = model_signature(cfg)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        pairs = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}" for k in diff[:4])
        raise TrainingError(f"checkpoint {folder} was saved by another model config ({pairs}); "
                            f"use the config it was trained with or a new train.run_dir")
    _check_carry_resumable(meta, cfg, world, folder)
    # Another world size or SP degree is fine (train/reshard.py) if the global batch is the same.
    problem = reshard.global_batch_problem(meta, cfg.data.micro_batch_size, cfg.train.grad_accum, world,
                                           cfg.parallel.sp)
    if problem:
        raise TrainingError(f"cannot resume from checkpoint {folder}: {problem}")
    if meta.get("zero_stage") != cfg.deepspeed.zero_stage:
        raise TrainingError(f"checkpoint {folder} was saved with deepspeed.zero_stage={meta.get('zero_stage')} "
                            f"but the config says {cfg.deepspeed.zero_stage}: use the same stage to resume")
    if reshard.needs_universal(meta, world) and (cfg.deepspeed.offload_optimizer or cfg.deepspeed.offload_param):
        raise TrainingError(f"checkpoint {folder} was saved by {meta.get('world_size')} ranks and this run has "
                            f"{world}: resharding with deepspeed.offload_optimizer or offload_param is untested; "
                            f"resume with both false, or on {meta.get('world_size')} ranks")
    for key in ("seed", "seq_len", "kind"):
        if key in meta.get("data", {}) and meta["data"][key] != cfg.data[key]:
            raise TrainingError(f"checkpoint {folder} was saved with data.{key}={meta['data'].get(key)!r} but the "
                                f"config says {cfg.data[key]!r}: the data stream would not continue where it stopped")


def _check_carry_resumable(meta: Dict[str, Any], cfg: DictConfig, world: int, folder: str) -> None:
    """train.carry_state resumes only from a checkpoint that carried state, on the same ranks
    with the same rows per rank: each rank's saved state belongs to its own rows' streams."""
    saved, now = bool(meta.get("carry_state", False)), bool(cfg.train.carry_state)
    if saved != now:
        why = ("it holds no carried state, and the data would switch from shuffled windows to streams" if now else
               "its carried state would be dropped, and the data would switch from streams to shuffled windows")
        raise TrainingError(f"checkpoint {folder} was saved with train.carry_state={str(saved).lower()} but the "
                            f"config says {str(now).lower()}: {why}; resume with train.carry_state="
                            f"{str(saved).lower()}, or start a new run (train.run_dir) from its weights with "
                            f"init.from_checkpoint")
    if not now:
        return
    pairs = [("world size", meta.get("world_size"), world),
             ("data.micro_batch_size", meta.get("data", {}).get("micro_batch_size"), cfg.data.micro_batch_size),
             ("train.grad_accum", meta.get("grad_accum"), cfg.train.grad_accum)]
    diff = [f"{k}: checkpoint {a} vs now {b}" for k, a, b in pairs if a != b]
    if diff:
        raise TrainingError(f"cannot resume from checkpoint {folder} with train.carry_state=true: {', '.join(diff)}; "
                            f"every rank's carried state belongs to its own rows' streams, so resume on "
                            f"{meta.get('world_size')} ranks with the micro-batch and grad_accum it was saved with")


def _grads_finite(model: torch.nn.Module, device) -> bool:
    """All gradients finite (after DeepSpeed's all-reduce, so every rank agrees)."""
    flags = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    return bool(torch.stack(flags).all()) if flags else True


def _check_gradients(engine, t, step: int, last_good: Optional[str]) -> None:
    """After an optimizer step: were the gradients finite? DeepSpeed reports a skipped update
    (ZeRO-1/2 overflow checks, fp16/bf16 optimizers) through was_step_applied, and the global
    norm it clips with; outside fp16 loss scaling either means non-finite gradients."""
    if t.precision == "fp16":
        return  # overflow skips are the loss scaler's normal work
    gn = engine.get_global_grad_norm()
    bad_norm = gn is not None and not math.isfinite(float(gn))
    if not engine.was_step_applied():
        _nonfinite("gradients", step, last_good, t.on_nonfinite)  # DeepSpeed left the weights alone
    elif bad_norm:
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint saved yet"
        raise TrainingError(f"non-finite gradients at step {step} were applied to the weights ({where}); "
                            f"resume with --resume auto after lowering train.lr (or enable train.grad_clip)")


def _nonfinite(what: str, step: int, last_good: Optional[str], policy: str) -> None:
    """Stop with the step and the last good checkpoint named, or warn (policy 'skip')."""
    if policy == "stop":
        where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint saved yet"
        raise TrainingError(f"non-finite {what} at step {step} ({where}); resume with --resume auto after "
                            f"lowering train.lr, or set train.on_nonfinite=skip")
    _log0(f"warning: non-finite {what} at step {step}; the step is skipped (train.on_nonfinite=skip)")


def _dump_grads(model, path: str, rank: int) -> None:
    from deepspeed.utils import safe_get_full_grad
    grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}  # collective at ZeRO-3
    if rank == 0:
        torch.save({n: g.detach().float().cpu() for n, g in grads.items()}, path)


def load_weights_from_run(model: torch.nn.Module, path: str) -> None:
    """Copy the consolidated weights of a longctx run / checkpoint folder into `model`; every
    tensor must exist with the same shape (one ValueError naming the differences)."""
    folder = ckpt.resolve_folder(path)
    sd = ckpt.consolidated_state_dict(folder)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} in the checkpoint, {tuple(v.shape)} here"
              for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"init.from_checkpoint={path!r} ({folder}) does not fit model.*: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:4]}; use a "
                         f"checkpoint of the same architecture (layers, widths, heads, vocabulary, mixers)")
    model.load_state_dict(sd)


def _check_memory(cfg: DictConfig, world: int, local_world: int, device) -> None:
    """Refuse, before anything is allocated, a step the planner says will not fit: on CPU the
    ranks of this machine together against its available memory (or train.memory_gib), on a GPU
    each rank against its device. Every rank decides for its own machine; one refusal stops all."""
    if not cfg.train.memory_check:
        return
    from longctx.train import planner
    from longctx.train.metrics import current_rss_bytes
    msg = ""
    try:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            budget = cfg.train.memory_gib * planner.GIB if cfg.train.memory_gib else free
            ok, _, msg = planner.check_fits(cfg, world, 1, budget, device="cuda")
        else:
            avail = planner.available_bytes()
            budget = cfg.train.memory_gib * planner.GIB if cfg.train.memory_gib else avail
            if budget is not None:
                # this process (and its local peers) are resident already: count what they add
                already = 0.0 if cfg.train.memory_gib else float(current_rss_bytes())
                ok, _, msg = planner.check_fits(cfg, world, local_world, budget, already_bytes=already)
    except Exception as exc:  # noqa: BLE001 - a plan the planner cannot make: say so, do not block the run
        # (any exception: every rank must reach the all_gather below, or the others hang)
        print(f"longctx: rank {dist.get_rank()}: memory check skipped: {type(exc).__name__}: {exc}",
              file=sys.stderr, flush=True)
        msg = ""
    msgs: List[Any] = [None] * world
    dist.all_gather_object(msgs, msg)
    bad = [(r, m) for r, m in enumerate(msgs) if m]
    if bad:
        r, m = bad[0]
        where = "" if world == 1 else f" (rank {r}'s machine)"
        raise TrainingError(f"{m.splitlines()[0]}{where}\n" + "\n".join(m.splitlines()[1:])
                            + "\n(train.memory_check=false skips this check)")


def carried_after(state: SegmentState, step: int) -> Dict[str, Any]:
    """The state a segment's forward left (train.carry_state), to carry into the next step. Every
    layer that started from a state must have left one: a missing key would restart that layer's
    stream silently."""
    lost = sorted(set(state) - set(state.after))
    if lost:
        raise TrainingError(f"step {step}: layer state {lost} was carried in but not out of the forward "
                            f"(train.carry_state): a mixer did not store its state in ctx.state")
    return state.after


def _clock(device, sync: bool) -> float:
    """Wall time for the per-phase split (rank_fwd_s / rank_bwd_s / rank_opt_s). With `sync` (the
    steps whose phases are logged) on a GPU after the queued work is done, so a phase is not just
    its launch time; other steps add no synchronisation to the training loop."""
    if sync and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def grad_divisor(engine) -> float:
    """What DeepSpeed divides the gradient sum over the dp x sp ranks by. Our mesh (the mpu)
    presents all of dp x sp as data parallel, so every stage divides by the world size (see
    Mesh). tests/distributed/test_sp_gradients.py checks each ZeRO stage's gradients under SP
    against an SP=1 run, so a DeepSpeed change here cannot pass silently."""
    return engine.seq_dp_world_size / engine.sequence_parallel_size


def train(cfg: DictConfig, resume: Optional[str] = None) -> TrainResult:
    """Run (or resume) training as configured. Every rank calls this. The first SIGTERM or
    SIGINT stops the run after the current step, on every rank, with a checkpoint
    (train/faults.py); the handlers are restored on return."""
    with faults.StopGuard() as guard:
        return _train(cfg, resume, guard)


def _train(cfg: DictConfig, resume: Optional[str], guard: faults.StopGuard) -> TrainResult:
    _quiet_deepspeed()
    import deepspeed  # after DS_ACCELERATOR is set
    deepspeed.utils.logger.setLevel(logging.WARNING)
    from longctx.train.data import make_sampler

    launcher = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    validate(cfg, world_size=world)
    ulysses, _ = sp_degrees(cfg.parallel)
    layout = sp_layout(cfg)
    mesh = build_mesh(cfg.parallel.sp, ulysses)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # set by every launcher we support
    if device.type == "cpu":
        from longctx.kernels.cpu import mmap_large, tune_allocator
        tune_allocator()
        if cfg.train.malloc_mmap_mib and not mmap_large(cfg.train.malloc_mmap_mib):
            _log0(f"train.malloc_mmap_mib={cfg.train.malloc_mmap_mib}: mallopt did not take effect here "
                  f"(not glibc?): every allocation stays in the heap")
        torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // max(1, local_world)))
    _check_memory(cfg, world, local_world, device)  # before the model, data or optimizer exist

    t, c = cfg.train, cfg.checkpoint
    run_dir = os.path.abspath(t.run_dir)
    ckpt_root = os.path.join(run_dir, "checkpoints")
    # Decide the resume point on rank 0 and share it, so all ranks agree even mid-write.
    decision: List[Any] = [None, None]
    if rank == 0:
        try:
            decision[0] = ckpt.resolve_resume(ckpt_root, resume, c.verify)
            if resume == "auto":  # newer but unusable checkpoints: say so, and keep them out of the way
                for note in ckpt.set_aside_unusable(ckpt_root, decision[0], c.verify):
                    _log0(f"--resume auto: {note}")
        except ckpt.CheckpointError as exc:
            decision[1] = str(exc)
    dist.broadcast_object_list(decision, src=0)
    if decision[1]:
        raise TrainingError(decision[1])
    resume_folder = decision[0]
    if resume == "auto" and resume_folder is None:
        _log0(f"--resume auto: no complete checkpoint in {ckpt_root}; starting fresh")
    universal = False  # resume at another world size: through DeepSpeed's universal checkpoint
    if resume_folder is not None:  # before building anything: a mismatch is one clear line
        saved = ckpt.read_meta(resume_folder)
        _check_resume_compatible(saved, cfg, world, resume_folder)
        universal = reshard.needs_universal(saved, world)
        if saved.get("world_size") != world or saved.get("sp", 1) != cfg.parallel.sp:
            _log0(f"resharding {resume_folder}: {reshard.describe(saved, world, cfg.parallel.sp)}"
                  f"{' through its universal conversion' if universal else ''}")
        if universal:
            reshard.prepare_universal(resume_folder)  # collective: rank 0 converts, once

    # Data: each rank reads only its own samples (and its own sequence shard).
    landmark_block = cfg.model.landmark_block if "landmark" in cfg.model.mixers else 0  # data inserts landmarks
    sampler, vocab_needed = make_sampler(cfg.data, cfg.data.tokenizer, mesh.dp_rank, mesh.dp, mesh.sp_rank, mesh.sp,
                                         layout, ulysses, landmark_block, stream=t.carry_state,
                                         grad_accum=t.grad_accum)
    if vocab_needed > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the data's vocabulary "
                          f"({vocab_needed} ids): set model.vocab_size >= {vocab_needed}")

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = DecoderLM(cfg.model)
    if cfg.init.from_hf:  # imported weights; a resumed run then loads its checkpoint over them
        from longctx.model import hf
        hf.check_matches(cfg.model, cfg.init.from_hf)
        hf.load_hf_weights(model, cfg.init.from_hf)
    if cfg.init.from_checkpoint:  # weights of an earlier run (a curriculum stage); a resume loads over them
        load_weights_from_run(model, cfg.init.from_checkpoint)
    if cfg.model.tie_embeddings and cfg.deepspeed.zero_stage == 3:
        # the head reuses embed.weight outside the embedding's forward: tell ZeRO-3 to gather it
        deepspeed.zero.register_external_parameter(model, model.embed.weight)
    ds_cfg = deepspeed_config(cfg, dp_size=world)  # DeepSpeed's data parallel: every replica (dp x sp)
    if universal:
        ds_cfg["checkpoint"] = {**ds_cfg.get("checkpoint", {}), "load_universal": True}
    sched_fn = lr_lambda(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, t.weight_decay), config=ds_cfg, mpu=mesh,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched_fn), dist_init_required=False)
    divisor = grad_divisor(engine)
    guard.arm(ckpt_root, cfg.parallel.timeout_s)  # every group (mesh, DeepSpeed's) gets the timeout

    # Per-rank RNG streams differ (seeded by rank) for anything stochastic in the step.
    torch.manual_seed(t.seed + 1 + rank)
    start_step, tokens_seen = 0, 0
    # train.carry_state: per micro-batch, the (detached) state its rows' streams ended the last step in
    carried: List[Dict[str, Any]] = [{} for _ in range(t.grad_accum)]
    if resume_folder is not None:
        meta = ckpt.load(engine, resume_folder, universal=universal)
        start_step, tokens_seen = meta["step"], meta["tokens"]
        sampler.load_state_dict(meta["sampler"])
        if t.carry_state:
            carried = ckpt.load_carried(resume_folder, start_step, t.grad_accum, device)
        _log0(f"resumed from {resume_folder} at step {start_step}")

    log = JsonlLog(os.path.join(run_dir, "metrics.jsonl"))
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        ckpt.atomic_write(os.path.join(run_dir, "config.yaml"), to_yaml(cfg).encode())
        dropped = log.truncate_after(start_step)
        if dropped:
            _log0(f"metrics.jsonl: dropped {dropped} records past step {start_step} (they will be re-run)")

    # MFU ceiling: each rank's measured matmul rate, summed over ranks.
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
    peak = t.peak_flops * world if t.peak_flops else _allreduce([measure_matmul_flops(device, dtype, seconds=0.5)], device)[0]
    seq_len, mb, ga = cfg.data.seq_len, cfg.data.micro_batch_size, t.grad_accum
    tokens_per_step = seq_len * mb * ga * mesh.dp
    fpt = flops_per_token(cfg.model, seq_len)
    params = count_params(model)
    end_step = t.steps if t.stop_after is None else t.stop_after
    _log0(f"longctx: {launcher} launch, world {world} (dp {mesh.dp} x sp {mesh.sp}), {device.type}, "
          f"ZeRO-{cfg.deepspeed.zero_stage}, {params['total'] / 1e6:.2f}M params, "
          f"{tokens_per_step} tokens/step, steps {start_step}->{end_step} of {t.steps}, run dir {run_dir}")

    if start_step >= end_step:
        _log0(f"nothing to do: the checkpoint is at step {start_step} and the run ends at step {end_step}")
    bar = None
    if rank == 0 and t.progress and start_step < end_step:
        from tqdm import tqdm
        bar = tqdm(total=end_step, initial=start_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    zero0 = cfg.deepspeed.zero_stage == 0 and t.precision != "fp16"
    sp_handle = mesh.sp_handle(layout)
    last_good = resume_folder
    losses: List[float] = []
    engine.train()
    t_last = time.perf_counter()
    for step in range(start_step, end_step):
        if _INJECT_STEP_SLEEP:
            time.sleep(_INJECT_STEP_SLEEP)
        batches = [sampler.batch(step, micro=m, grad_accum=ga) for m in range(ga)]
        if t.carry_state and sampler.starts_stream(step):
            carried = [{} for _ in range(ga)]  # the streams start over: nothing to carry
        n_local = sum(int((b["labels"] != -100).sum()) for b in batches)
        n_global = _allreduce([n_local], device)[0]
        if n_global == 0:
            raise TrainingError(f"step {step + 1}: the batch has no target tokens (all labels are -100)")
        loss_sum_local, skipped = 0.0, False
        phase = [0.0, 0.0, 0.0]  # forward, backward, optimizer seconds of this step
        logged = (step + 1) % t.log_every == 0 or step + 1 == end_step  # its phases are reported
        comm0 = COMM.seconds
        for m, b in enumerate(batches):
            b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            ctx = SeqContext(positions=b["positions"], doc_ids=b["doc_ids"] if cfg.data.mask_documents else None,
                             sp=sp_handle, state=SegmentState(carried[m]) if t.carry_state else {},
                             carry=t.carry_state)
            tp = _clock(device, logged)
            loss_sum, _ = engine(b["input_ids"], ctx, b["labels"])
            phase[0] += _clock(device, logged) - tp
            if t.carry_state:
                carried[m] = carried_after(ctx.state, step + 1)
            if step + 1 == _INJECT_NAN_STEP:
                loss_sum = loss_sum * float("nan")  # fault injection for tests (LONGCTX_INJECT_NAN_STEP)
            if step + 1 == _INJECT_NAN_GRAD_STEP:
                loss_sum = _NanGrad.apply(loss_sum)
            # Agree across ranks before backward: every rank stops or skips together.
            if _allreduce([0.0 if torch.isfinite(loss_sum.detach()) else 1.0], device)[0]:
                _nonfinite("loss", step + 1, last_good, t.on_nonfinite)
                skipped = True  # grad_accum is 1 under on_nonfinite=skip (config check): nothing accumulated
                break
            # DeepSpeed divides by grad_accum and by `divisor` after summing over dp x sp: undo
            # both so the result is d(sum of all ranks' token losses / n_global).
            tp = _clock(device, logged)
            engine.backward(loss_sum * (divisor * ga / n_global))
            phase[1] += _clock(device, logged) - tp
            if zero0 and engine.is_gradient_accumulation_boundary() and not _grads_finite(model, device):
                # ZeRO-0 has no overflow check and reports no norm: stop before the update lands
                where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint saved yet"
                raise TrainingError(f"non-finite gradients at step {step + 1} with a finite loss ({where}); "
                                    f"the update was not applied; resume with --resume auto after lowering train.lr")
            if _DUMP_GRADS and step == start_step and engine.is_gradient_accumulation_boundary():
                _dump_grads(model, _DUMP_GRADS, rank)
            tp = _clock(device, logged)
            engine.step()
            phase[2] += _clock(device, logged) - tp
            loss_sum_local += float(loss_sum.detach())
        if not skipped:
            _check_gradients(engine, t, step + 1, last_good)
        sampler.advance(step)
        if not skipped:
            loss = _allreduce([loss_sum_local], device)[0] / n_global
            losses.append(loss)
            tokens_seen += tokens_per_step
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            if logged:
                # every rank's phases and peak memory (one small all-reduce, on logged steps)
                per = torch.zeros(world, 5, dtype=torch.float64, device=device)
                per[rank] = torch.tensor([*phase, COMM.seconds - comm0, float(peak_rss_bytes())], dtype=torch.float64)
                if world > 1:
                    dist.all_reduce(per)
                per = per.tolist()
            if rank == 0 and logged:
                gn = engine.get_global_grad_norm()
                tps = tokens_per_step / dt
                rec = {"step": step + 1, "loss": loss, "lr": t.lr * sched_fn(step), "tokens": tokens_seen,
                       "tokens_per_s": tps, "mfu": fpt * tps / peak, "step_s": dt,
                       "grad_norm": float(gn) if gn is not None else None, **device_memory(device),
                       # per rank: forward / backward / optimizer seconds, seconds inside our collectives
                       # and waits (SP hand-offs, halos, all-to-alls; DeepSpeed's own not included; host
                       # time: on a GPU, NCCL calls return before the transfer ends), peak RSS
                       "rank_fwd_s": [r[0] for r in per], "rank_bwd_s": [r[1] for r in per],
                       "rank_opt_s": [r[2] for r in per], "rank_comm_s": [r[3] for r in per],
                       "rank_peak_rss_gib": [r[4] / 1024 ** 3 for r in per]}
                log.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{rec['mfu']:.1%}", refresh=False)
        if bar is not None:
            bar.update(1)
        done = step + 1
        stop = guard.agree(device)  # SIGTERM/SIGINT on any rank: all stop after this step, with a checkpoint
        if done % c.every == 0 or (done == end_step and c.save_final) or stop:
            meta = {"step": done, "tokens": tokens_seen, "sampler": sampler.state_dict(), "world_size": world,
                    "zero_stage": cfg.deepspeed.zero_stage, "model": model_signature(cfg),
                    "data": {k: cfg.data[k] for k in ("seed", "seq_len", "kind", "micro_batch_size")},
                    "grad_accum": t.grad_accum, "sp": cfg.parallel.sp, "carry_state": bool(t.carry_state),
                    "config": OmegaConf.to_container(cfg, resolve=True)}
            last_good = ckpt.save(engine, ckpt_root, done, meta, c.keep_last, carried if t.carry_state else None)
            if rank == 0 and t.plot:
                plot_loss(read_jsonl(log.path), os.path.join(run_dir, "loss.png"), title=os.path.basename(run_dir))
            t_last = time.perf_counter()  # keep checkpoint time out of tokens/s
        if stop and done < end_step:
            _log0(f"stopped after step {done} on {stop[0]} (rank {stop[1]}): checkpoint {last_good}; "
                  f"continue with --resume auto")
            end_step = done
            break
    if bar is not None:
        bar.close()
    if rank == 0 and t.plot and os.path.exists(log.path):
        plot_loss(read_jsonl(log.path), os.path.join(run_dir, "loss.png"), title=os.path.basename(run_dir))
    if losses:
        _log0(f"done: step {end_step}, loss {losses[0]:.4f} -> {losses[-1]:.4f}; run dir {run_dir}")
    return TrainResult(run_dir, start_step, end_step, losses)
