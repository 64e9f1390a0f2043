"""Training-step throughput on this machine: longctx's trainer against plain loops, one run.

A full step (forward, backward, optimizer) of a 4-layer d=512 softmax model at 4K tokens, three
ways, each measured here and now:
  torch      the model with torch.optim.AdamW, no DeepSpeed (the floor of what any trainer adds)
  deepspeed  the model in a bare DeepSpeed engine (ZeRO-1), written out in 10 lines
  longctx    `longctx.train.trainer.train` with the same shapes (progress bar, metrics, checks)
MFU = model FLOPs per second / the dense fp32 matmul rate measured in the same process.
The paths run in turn, `--rounds` times, and report the best and the median step.

    python benchmarks/train_throughput.py [--seq-len 4096] [--steps 8] [--warmup 2] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from longctx.config import load_config  # noqa: E402
from longctx.model.transformer import DecoderLM, flops_per_token  # noqa: E402
from longctx.parallel.groups import init_distributed  # noqa: E402
from longctx.train.metrics import measure_matmul_flops  # noqa: E402
from longctx.train.trainer import param_groups, train  # noqa: E402


OVERRIDES: list = []


def overrides(args, run_dir):
    return ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=8",
            f"model.max_seq_len={args.seq_len}", "model.tie_embeddings=false", f"data.seq_len={args.seq_len}",
            "data.micro_batch_size=1", "data.synthetic_tokens=2000000", f"train.steps={args.steps + args.warmup}",
            f"train.warmup_steps={args.warmup}", "train.progress=false", "train.plot=false",
            f"train.run_dir={run_dir}", "checkpoint.every=1000000", "checkpoint.save_final=false",
            "deepspeed.zero_stage=1"]


def batches(cfg, n):
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        ids = torch.randint(0, 259, (1, cfg.data.seq_len + 1), generator=g)
        yield ids[:, :-1], ids[:, 1:]


def time_plain_torch(cfg, steps, warmup):
    torch.manual_seed(0)
    model = DecoderLM(cfg.model)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    times = []
    for i, (x, y) in enumerate(batches(cfg, steps + warmup)):
        t0 = time.perf_counter()
        loss, n = model(x, None, y)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_plain_deepspeed(cfg, steps, warmup):
    import deepspeed
    torch.manual_seed(0)
    model = DecoderLM(cfg.model)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=ds,
                                      dist_init_required=False)
    times = []
    for i, (x, y) in enumerate(batches(cfg, steps + warmup)):
        t0 = time.perf_counter()
        loss, n = engine(x, None, y)
        engine.backward(loss / n)
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def time_longctx(cfg, warmup, run_dir):
    cfg = load_config(None, [*OVERRIDES, f"train.run_dir={run_dir}"])
    train(cfg)
    recs = [json.loads(l) for l in open(os.path.join(cfg.train.run_dir, "metrics.jsonl"))]
    return [r["step_s"] for r in recs[warmup:]]


def main():
    from longctx.kernels.cpu import tune_allocator
    tune_allocator()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2,
                   help="repeat the three paths in turn (ABCABC) so that drift of a shared machine hits all alike")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    init_distributed("gloo", 600)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-cpu.yaml"),
                          overrides(args, os.path.join(tmp, "run")))
        fpt = flops_per_token(cfg.model, args.seq_len)
        peak = measure_matmul_flops(torch.device("cpu"), torch.float32, n=2048, seconds=3.0)
        OVERRIDES[:] = [*overrides(args, os.path.join(tmp, "run")), f"train.peak_flops={peak}"]
        cfg = load_config(None, OVERRIDES)
        paths = {"torch": lambda r: time_plain_torch(cfg, args.steps, args.warmup),
                 "deepspeed": lambda r: time_plain_deepspeed(cfg, args.steps, args.warmup),
                 "longctx": lambda r: time_longctx(cfg, args.warmup, os.path.join(tmp, f"run{r}"))}
        times = {name: [] for name in paths}
        for r in range(args.rounds):
            for name, fn in paths.items():
                print(f"round {r + 1}/{args.rounds}: timing {name} ...", file=sys.stderr, flush=True)
                times[name].extend(fn(r))
        results = {}
        for name, ts in times.items():
            best, med = min(ts), statistics.median(ts)
            results[name] = {"steps_timed": len(ts), "best_step_s": best, "median_step_s": med,
                             "tokens_per_s": args.seq_len / best, "mfu_best": fpt * args.seq_len / best / peak,
                             "mfu_median": fpt * args.seq_len / med / peak}
    print(f"\nmachine: {os.cpu_count()} CPU threads, torch {torch.__version__}; fp32 matmul rate measured "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"model: 4 layers, d=512, 8 heads, seq {args.seq_len}, {fpt / 1e6:.1f} MFLOP/token (fwd+bwd)")
    print(f"{'path':<10} {'best s':>8} {'median s':>9} {'tokens/s':>9} {'MFU best':>9} {'MFU median':>11} "
          f"{'vs torch':>9}")
    for name, r in results.items():
        print(f"{name:<10} {r['best_step_s']:8.3f} {r['median_step_s']:9.3f} {r['tokens_per_s']:9.0f} "
              f"{r['mfu_best']:9.1%} {r['mfu_median']:11.1%} "
              f"{results['torch']['best_step_s'] / r['best_step_s']:8.2f}x")
    print("MFU counts causal attention as half the square (6*L*T*d per token); tokens/s from the best step.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "flops_per_token": fpt, "seq_len": args.seq_len, **results}, f, indent=1)


if __name__ == "__main__":
    main()
