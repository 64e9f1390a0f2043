"""Attention transfer: lightning layers learn to reproduce the softmax layers they replace.

For each converted layer l the loss is the mean squared error between the lightning layer's
output and the frozen softmax layer's output on the same input, divided by the mean square of
the softmax output (a constant per batch, so that every layer weighs alike and 1.0 means "no
better than zero"); the step's loss is the mean over the converted layers. The inputs are what
the original (all-softmax) model feeds each layer: one forward of the frozen teacher gives
every converted layer's input and target at once, and the layers train independently of one
another. Only the lightning layers' parameters change.

Before the first step the output norm of each lightning layer is calibrated: its weight is
scaled per channel so that the gated, normalised linear-attention output has the softmax
output's RMS (measured before o_proj on the first batch).

This runs in one process (no sequence parallelism or ZeRO): the stage is short and touches a
few layers. `longctx extend --method hybrid` runs it as its stage 0.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from longctx.model.transformer import DecoderLM, SeqContext


def _ctx(batch) -> SeqContext:
    return SeqContext(positions=batch["positions"])


@torch.no_grad()
def _teacher_io(teacher: DecoderLM, layers: Sequence[int], batch, pre_o: bool = False):
    """{layer: {"x": mixer input, "y": mixer output[, "pre_o": o_proj input]}} of the teacher on one batch."""
    got: Dict[int, Dict[str, torch.Tensor]] = {i: {} for i in layers}
    hooks = []
    for i in layers:
        m = teacher.layers[i].mixer
        hooks.append(m.register_forward_hook(lambda mod, args, out, i=i: got[i].update(x=args[0], y=out)))
        if pre_o:
            hooks.append(m.o_proj.register_forward_pre_hook(lambda mod, args, i=i: got[i].update(pre_o=args[0])))
    try:
        teacher.hidden(batch["input_ids"], _ctx(batch))
    finally:
        for h in hooks:
            h.remove()
    return got


@torch.no_grad()
def calibrate(teacher: DecoderLM, student: DecoderLM, layers: Sequence[int], batch) -> Dict[int, float]:
    """Scale each lightning layer's output-norm weight per channel to the softmax layer's
    pre-o_proj RMS; returns the mean scale applied per layer."""
    io = _teacher_io(teacher, layers, batch, pre_o=True)
    scales = {}
    for i in layers:
        x, pre_t = io[i]["x"], io[i]["pre_o"]
        mix = student.layers[i].mixer
        seen: List[torch.Tensor] = []
        h = mix.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        try:
            mix(x, _ctx(batch))
        finally:
            h.remove()
        rms = lambda t: t.float().pow(2).flatten(0, -2).mean(0).sqrt()  # noqa: E731 (per channel)
        s = rms(pre_t) / rms(seen[0]).clamp_min(1e-6)
        mix.norm.weight.mul_(s.to(mix.norm.weight.dtype))
        scales[i] = float(s.mean())
    return scales


def attention_transfer(teacher: DecoderLM, student: DecoderLM, layers: Sequence[int],
                       batch_fn: Callable[[int], Dict[str, torch.Tensor]], steps: int, lr: float = 1e-3,
                       grad_clip: float = 1.0, calibrate_first: bool = True,
                       log: Optional[Callable[[int, float, Dict[int, float]], None]] = None) -> Dict[str, Any]:
    """Train student.layers[l].mixer (lightning) to match teacher.layers[l].mixer (softmax) for l
    in layers, for `steps` AdamW steps on batch_fn(step) (input_ids, positions). The other
    layers of the student are not used or changed. Returns the losses per step and per layer.
    log(step, loss, per-layer losses) is called after every step."""
    if steps < 0:
        raise ValueError(f"attention transfer steps={steps}: use >= 0")
    bad = [i for i in layers if type(student.layers[i].mixer).__name__ != "LightningAttention"
           or type(teacher.layers[i].mixer).__name__ != "SoftmaxAttention"]
    if bad:
        raise ValueError(f"attention transfer: layers {bad} are not lightning in the student and softmax in the "
                         f"teacher")
    teacher.eval().requires_grad_(False)
    mixers = {i: student.layers[i].mixer for i in layers}
    params = [p for m in mixers.values() for p in m.parameters()]
    scales = calibrate(teacher, student, layers, batch_fn(0)) if calibrate_first and steps else {}
    for m in mixers.values():
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses: List[float] = []
    per_layer: Dict[int, List[float]] = {i: [] for i in layers}
    t0 = time.perf_counter()
    for step in range(steps):
        batch = batch_fn(step)
        io = _teacher_io(teacher, layers, batch)
        total = 0.0
        opt.zero_grad(set_to_none=True)
        for i in layers:
            x, target = io[i]["x"], io[i]["y"]
            y = mixers[i](x, _ctx(batch))
            loss = F.mse_loss(y.float(), target.float()) / target.float().pow(2).mean().clamp_min(1e-12)
            (loss / len(layers)).backward()
            per_layer[i].append(float(loss.detach()))
            total += per_layer[i][-1] / len(layers)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if not torch.isfinite(torch.tensor(total)):
            raise FloatingPointError(f"attention transfer: non-finite loss at step {step + 1}; lower the transfer "
                                     f"learning rate (now {lr})")
        losses.append(total)
        if log is not None:
            log(step + 1, total, {i: per_layer[i][-1] for i in layers})
    for m in mixers.values():
        m.eval()
    return {"steps": steps, "lr": lr, "layers": list(layers), "loss": losses, "calibration_scale": scales,
            "layer_loss": {str(i): {"first": v[0], "last": v[-1]} for i, v in per_layer.items() if v},
            "seconds": time.perf_counter() - t0}
