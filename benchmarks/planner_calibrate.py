"""Measure the planner's per-token constants on this machine (longctx/train/planner.py,
CALIBRATION): peak tensor bytes of one training forward + backward (torch's allocator events,
`longctx.train.metrics.peak_tensor_bytes`) of one- and two-layer models at two lengths, per
mixer and precision; the slope between the lengths is the per-token cost, in bytes per token per
d_model:

  A   one layer, block checkpointed (the Titans memory with model.memory.recompute: not, it
      recomputes itself), lean settings (loss_chunk, mlp_tile)     = (slope - 32) / d
  A0  the same, block not checkpointed
  S   two layers not checkpointed minus one: what a block below holds       = delta slope / d
  A1  lightning with one head per kernel group (its long-sequence regime)
  A_sp, A1_sp  the same sequence-parallel: 2 gloo ranks, L tokens each (the larger rank's peak)

and, with --rss, the resident size of real `longctx train` runs (2 ranks, torchrun): the process
overhead (a tiny model) and the allocator factor (resident / planned tensors + overhead).

    python benchmarks/planner_calibrate.py [--lengths 4096 12288] [--rss]

Prints a table and the CALIBRATION dict to paste (figures measured, never typed)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPE = ["model.d_model=256", "model.n_heads=4", "model.n_kv_heads=null", "model.ffn_hidden=512",
         "model.vocab_size=320", "model.memory.depth=1", "model.memory.chunk=128", "model.memory.max_lr=0.0025",
         "model.swa_window=256", "model.loss_chunk=2048", "model.mlp_tile=2048", "model.max_seq_len=1048576",
         "model.memory.window=256"]
SP_MIXERS = ("swa", "lightning", "memory")  # also measured sequence-parallel (their SP paths add buffers)
MIXERS = {  # name in CALIBRATION -> (mixer, extra overrides)
    "softmax": ("softmax", []),
    "swa": ("swa", []),
    "lightning": ("lightning", []),
    "memory": ("memory", ["model.memory.recompute=2048"]),
    "memory_plain": ("memory", []),
    "mag": ("mag", []),
}


def peak(mixer: str, extra, n_layers: int, ckpt: bool, L: int, bf16: bool, one_head: bool = False) -> int:
    import torch

    from longctx.config import load_config
    from longctx.kernels import lightning_torch
    from longctx.model.transformer import DecoderLM
    from longctx.train.metrics import peak_tensor_bytes
    cfg = load_config(os.path.join(ROOT, "configs/tiny-cpu.yaml"),
                      [*SHAPE, *extra, f"model.mixers=[{mixer}]", f"model.n_layers={n_layers}",
                       f"model.activation_checkpointing={str(ckpt).lower()}"]).model
    torch.manual_seed(0)
    m = DecoderLM(cfg)
    if bf16:
        m = m.bfloat16()
    m.train()
    fn = lightning_torch.lightning_fwd_torch  # its last default, group_elems, sets the heads per group
    old = fn.__defaults__
    if one_head:
        fn.__defaults__ = old[:-1] + (1,)
    try:
        ids = torch.randint(0, 259, (1, L), generator=torch.Generator().manual_seed(L))
        return peak_tensor_bytes(lambda: m(ids, None, ids.roll(-1, 1))[0].backward())[1]
    finally:
        fn.__defaults__ = old


def _sp_worker(rank, world, port, mixer, extra, ckpt, L, bf16, one_head, out):
    """One rank of an SP=2 measurement: the peak tensor bytes of its shard's forward + backward."""
    import torch
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from longctx.config import load_config
    from longctx.kernels import lightning_torch
    from longctx.model.transformer import DecoderLM, SeqContext
    from longctx.parallel.groups import SPHandle, shutdown_distributed
    from longctx.train.metrics import peak_tensor_bytes
    cfg = load_config(os.path.join(ROOT, "configs/tiny-cpu.yaml"),
                      [*SHAPE, *extra, f"model.mixers=[{mixer}]", "model.n_layers=1",
                       f"model.activation_checkpointing={str(ckpt).lower()}"]).model
    torch.manual_seed(0)
    m = DecoderLM(cfg)
    m = (m.bfloat16() if bf16 else m).train()
    fn = lightning_torch.lightning_fwd_torch
    if one_head:
        fn.__defaults__ = fn.__defaults__[:-1] + (1,)
    ids = torch.randint(0, 259, (1, L * world), generator=torch.Generator().manual_seed(L))
    sl = slice(rank * L, (rank + 1) * L)
    ctx = SeqContext(positions=torch.arange(sl.start, sl.stop)[None], sp=SPHandle(dist.group.WORLD, rank, world))
    pk = peak_tensor_bytes(lambda: m(ids[:, sl], ctx, ids.roll(-1, 1)[:, sl])[0].backward())[1]
    res = [None] * world
    dist.all_gather_object(res, pk)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    shutdown_distributed()


def peak_sp(mixer, extra, ckpt, L, bf16, one_head=False) -> int:
    """The larger rank's peak of an SP=2 run with L tokens per rank."""
    import torch.multiprocessing as mp

    from longctx.parallel.groups import free_port
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "peaks.json")
        mp.spawn(_sp_worker, args=(2, free_port(), mixer, extra, ckpt, L, bf16, one_head, out), nprocs=2)
        with open(out) as f:
            return max(json.load(f))


def slope(fn, lengths):
    a, b = (fn(L) for L in lengths)
    return (b - a) / (lengths[1] - lengths[0]), a - (b - a) / (lengths[1] - lengths[0]) * lengths[0]


def calibrate_tensors(lengths, d=256):
    import torch
    torch.set_num_threads(1)
    from longctx.kernels.cpu import tune_allocator
    tune_allocator()
    out = {}
    for prec in ("fp32", "bf16"):
        bf = prec == "bf16"
        tab = {}
        for name, (mixer, extra) in MIXERS.items():
            t0 = time.time()
            self_rec = name == "memory"
            a, ia = slope(lambda L: peak(mixer, extra, 1, not self_rec, L, bf), lengths)
            a0, _ = slope(lambda L: peak(mixer, extra, 1, False, L, bf), lengths)
            a2, _ = slope(lambda L: peak(mixer, extra, 2, False, L, bf), lengths)
            row = {"A": round((a - 32) / d, 1), "A0": round((a0 - 32) / d, 1), "S": round((a2 - a0) / d, 1),
                   "intercept_mib": round(ia / 2 ** 20, 1)}
            if name == "lightning":
                a1, _ = slope(lambda L: peak(mixer, extra, 1, True, L, bf, one_head=True), lengths)
                row["A1"] = round((a1 - 32) / d, 1)
            if name in SP_MIXERS:  # the same layer sequence-parallel (2 ranks, L tokens each)
                asp, _ = slope(lambda L: peak_sp(mixer, extra, not self_rec, L, bf), lengths)
                row["A_sp"] = round((asp - 32) / d, 1)
                if name == "lightning":
                    a1, _ = slope(lambda L: peak_sp(mixer, extra, True, L, bf, one_head=True), lengths)
                    row["A1_sp"] = round((a1 - 32) / d, 1)
            tab[name] = row
            print(f"{prec:5} {name:13} " + "  ".join(f"{k} {v}" for k, v in row.items()) +
                  f"   ({time.time() - t0:.0f}s)", flush=True)
        out[prec] = tab
    return out


def train_rss(overrides, nproc: int, workdir: str):
    """Peak RSS per rank (GiB) of a 1-step `longctx train` under torchrun."""
    run = os.path.join(workdir, f"run{len(os.listdir(workdir))}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29533",
           "-m", "longctx.cli", "train", os.path.join(ROOT, "configs/million-cpu.yaml"), *overrides,
           f"train.run_dir={run}", "train.steps=1", "checkpoint.save_final=false", "train.progress=false",
           "train.plot=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rec = [json.loads(x) for x in f if x.strip()][-1]
    return rec["rank_peak_rss_gib"]


def calibrate_rss(seq_len: int):
    from longctx.config import load_config
    from longctx.train import planner
    tmp = tempfile.mkdtemp(prefix="calib_")
    tiny = ["data.seq_len=2048", "model.max_seq_len=2048"]
    rss_tiny = train_rss(tiny, 2, tmp)
    cfg = load_config(os.path.join(ROOT, "configs/million-cpu.yaml"), tiny)
    p = planner.plan(cfg, 2)
    tensors = sum(v for k, v in p.memory.items() if k != "process")
    process = min(rss_tiny) * planner.GIB - tensors
    ov = [f"data.seq_len={seq_len}"]
    rss = train_rss(ov, 2, tmp)
    p = planner.plan(load_config(os.path.join(ROOT, "configs/million-cpu.yaml"), ov), 2)
    tensors = sum(v for k, v in p.memory.items() if k != "process")
    factor = max(rss) * planner.GIB / (tensors + process)
    print(f"process overhead {process / 2**30:.3f} GiB (tiny run: {rss_tiny} GiB per rank); at {seq_len}: "
          f"{rss} GiB per rank, planned tensors {tensors / 2**30:.3f} GiB -> factor {factor:.3f}")
    return {"process_bytes": round(process / 2 ** 30, 3), "rss_factor": round(factor, 3)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs=2, default=[4096, 12288])
    ap.add_argument("--rss", action="store_true", help="also measure process overhead and allocator factor")
    ap.add_argument("--rss-seq-len", type=int, default=32768)
    ap.add_argument("--skip-tensors", action="store_true")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    args = ap.parse_args()
    res = {}
    if not args.skip_tensors:
        res.update(calibrate_tensors(args.lengths))
    if args.rss:
        res.update(calibrate_rss(args.rss_seq_len))
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
