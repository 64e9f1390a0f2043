"""Training metrics: the machine's matmul rate (for MFU), memory, a JSONL log and loss plots."""
from __future__ import annotations

import json
import os
import resource
import time
from typing import Dict, Iterable, List, Optional

import torch


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                         seconds: float = 1.0) -> float:
    """Dense matmul rate (FLOP/s) of this process on `device`: the ceiling MFU is reported
    against, measured in the same run as the training step rather than read from a data sheet.
    The best of many short repetitions, so a busy moment does not lower the ceiling (which
    would inflate MFU)."""
    if device.type == "cuda":
        n = max(n, 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.mm(a, b)  # warm-up (thread pools, kernel selection)
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync()
        best = max(best, 4 * 2.0 * n ** 3 / (time.perf_counter() - t0))
    return best


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        return peak_rss_bytes()


def device_memory(device: torch.device) -> Dict[str, float]:
    gib = 1024 ** 3
    out = {"rss_gib": current_rss_bytes() / gib, "peak_rss_gib": peak_rss_bytes() / gib}
    if device.type == "cuda":
        out["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / gib
    return out


def peak_tensor_bytes(fn, device: torch.device = torch.device("cpu")):
    """(fn(), peak bytes of tensor memory allocated while fn runs, above what was allocated when
    it started). CUDA: the caching allocator's peak statistics. CPU: torch's allocator events as
    the profiler records them (exact bytes of every tensor allocation and free, in order; the
    profiler slows fn down, so use it for measurements, not inside training)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted([(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU],
                    key=lambda ev: ev[0])  # stable: equal timestamps keep the recorded order
    cur = peak = 0
    for _, nbytes in events:  # allocations positive, frees negative
        cur += nbytes
        peak = max(peak, cur)
    return out, peak


class JsonlLog:
    """Append-only metrics log. On resume, records past the resumed step are dropped (they
    belong to steps that will be run again), by an atomic rewrite."""

    def __init__(self, path: str):
        self.path = path

    def truncate_after(self, step: int) -> int:
        if not os.path.exists(self.path):
            return 0
        keep, dropped = [], 0
        for rec in read_jsonl(self.path):
            if rec.get("step", -1) <= step:
                keep.append(rec)
            else:
                dropped += 1
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for rec in keep:
                f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return dropped

    def write(self, rec: Dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def read_jsonl(path: str) -> List[Dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut by a crash mid-write
                    continue
    return out


def plot_loss(records: Iterable[Dict], path: str, title: Optional[str] = None) -> None:
    """Loss (and learning rate on a second axis) against step, written as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if "loss" in r]
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in recs], color="tab:blue", lw=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)", color="tab:blue")
    ax.grid(alpha=0.3)
    if "lr" in recs[0]:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in recs], color="tab:orange", lw=0.8, alpha=0.7)
        ax2.set_ylabel("learning rate", color="tab:orange")
    ax.set_title(title or "training loss")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def available_bytes() -> Optional[int]:
    """MemAvailable of this machine in bytes (Linux /proc/meminfo), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
