"""Where a training step's time goes, block by block, on one process: for each layer of a config
(and the fused head + loss), the seconds of its forward and of its backward (the backward of a
checkpointed block includes its recompute), measured in isolation on random inputs of the real
shape, with the step's dtype, checkpointing and thread count. The share of each block, and its
FLOP rate from the planner's FLOP counts, point at what to speed up next.

    python benchmarks/profile_blocks.py configs/million-cpu.yaml --seq-len 65536 [--threads 1] [--reps 2]

Sequence parallelism is not simulated (one process, the given length = one rank's share):
communication is measured by benchmarks/million_token.py instead."""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402


def _time(fn, reps: int) -> float:
    """Best of `reps` wall times after one untimed warm-up (first calls pay allocation and
    page-fault costs that would otherwise make the forward look slower than forward+backward)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens in the process (one rank's share)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2, help="best of this many runs per measurement")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    if a.seq_len < 1 or a.threads < 1 or a.reps < 1:
        ap.error(f"--seq-len {a.seq_len}, --threads {a.threads}, --reps {a.reps}: each must be >= 1")
    torch.set_num_threads(a.threads)
    from longctx.config import load_config
    from longctx.kernels.linear_ce import linear_cross_entropy
    from longctx.model.mixers import MIXERS, layer_mixers
    from longctx.model.transformer import Block, SeqContext, softmax_fwd_flops
    from longctx.train.planner import _ffn
    cfg = load_config(a.config, [f"data.seq_len={a.seq_len}", "parallel.sp=1",
                                 f"model.max_seq_len={max(a.seq_len, 1)}", *a.overrides])
    m = cfg.model
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.precision]
    T, D = a.seq_len, m.d_model
    ctx = SeqContext(positions=torch.arange(T)[None])
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, T, D, generator=g) * 0.5).to(dtype)
    go = (torch.randn(1, T, D, generator=g) * 1e-3).to(dtype)
    rows = []
    names = layer_mixers(list(m.mixers), m.n_layers)
    for i, name in enumerate(names):
        torch.manual_seed(i)
        blk = Block(m, i, name).to(dtype)
        ck = bool(m.activation_checkpointing) and blk.checkpointed

        def fwd(blk=blk, ck=ck):
            xi = x.detach().requires_grad_()
            y = checkpoint(blk, xi, ctx, use_reentrant=False) if ck else blk(xi, ctx)
            return xi, y

        tf = _time(lambda: fwd(), a.reps)

        def fb():
            xi, y = fwd()
            y.backward(go)

        tfb = _time(fb, a.reps)
        f = getattr(MIXERS[name], "mixer_fwd_flops", None) or softmax_fwd_flops
        params, mix = f(m, T)
        flops = (2 * params + mix + 6 * D * _ffn(m)) * T * (4 if ck else 3)
        rows.append((f"{i} {name}{' (ckpt)' if ck else ''}", tf, tfb - tf, flops / tfb))
        del blk
    # head + fused loss
    w = (torch.randn(m.vocab_size, D, generator=g) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, m.vocab_size, (1, T), generator=g)

    def head():
        h = x.detach().requires_grad_()
        loss, _ = linear_cross_entropy(h, w, labels, m.loss_chunk or T, ignore_index=-100)
        return loss

    th = _time(head, a.reps)
    thb = _time(lambda: head().backward(), a.reps)
    rows.append(("head + loss", th, thb - th, 6 * D * m.vocab_size * T / thb))
    total = sum(r[1] + r[2] for r in rows)
    print(f"{a.config}: {T:,} tokens, {cfg.train.precision}, {a.threads} thread(s), best of {a.reps}")
    print(f"{'block':<24}{'fwd s':>9}{'bwd s':>9}{'share':>8}{'GFLOP/s':>10}")
    for n, tf, tb, fl in rows:
        print(f"{n:<24}{tf:9.2f}{tb:9.2f}{(tf + tb) / total:8.1%}{fl / 1e9:10.1f}")
    print(f"{'total':<24}{sum(r[1] for r in rows):9.2f}{sum(r[2] for r in rows):9.2f}")


if __name__ == "__main__":
    main()
