"""One-million-token training on this CPU: configs/million-cpu.yaml (lightning, lightning, swa,
Titans memory; d_model 256; byte vocabulary; bf16) trained through the normal trainer and
launcher (torchrun, 2 sequence-parallel ranks, one thread each), 2 full steps (forward,
backward, optimizer) at each length, with the planner's prediction beside every measurement.

    python benchmarks/million_token.py                        # 64K, 256K and 1M, then 4M planned
    python benchmarks/million_token.py --lengths 1M           # one length
    python benchmarks/million_token.py --seq-len 4M           # the planner only: time and memory
    python benchmarks/million_token.py --out docs/million_token_cpu.json --docs docs/benchmarks.md

Per length it prints: time per step (step 2; step 1 pays first-touch page faults), tokens/s,
peak resident memory per rank (the trainer's ru_maxrss per rank) and in total (sum of the ranks'
peaks, and the largest sum of the processes' resident sizes sampled every 0.2 s), the time by
phase per rank (forward, backward, optimizer; and the seconds spent inside our collectives and
waits, i.e. SP hand-offs, halo exchanges, state all-gathers, including waiting for the other
rank), and the planner's per-rank peak and step time (at the FLOP rate the run achieved at the
previous length, so the prediction is made before the length is run). A length the planner says
will not fit in this machine's memory is not run: its plan is reported instead (time from the
FLOP rate achieved at the longest length measured).
--docs rewrites the table between the million_token markers of the given Markdown file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CONFIG = os.path.join(ROOT, "configs", "million-cpu.yaml")
GIB = 1024 ** 3


def parse_len(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KM" else s) * mult)


def fmt_len(n: int) -> str:
    return f"{n // 1024 ** 2}M" if n % 1024 ** 2 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def machine() -> str:
    import torch
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(l for l in f if l.startswith("MemTotal")).split()[1]) / 1024 ** 2
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} CPU threads, {mem:.0f} GiB, torch {torch.__version__}, {platform.node()}"


class TreeRSS(threading.Thread):
    """Largest sum of resident sizes over a process and its descendants, sampled."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0, threading.Event()

    def run(self):
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            time.sleep(self.every)


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_length(seq_len: int, steps: int, overrides, keep: bool) -> dict:
    """Train `steps` steps at seq_len under torchrun (2 ranks); metrics of every step."""
    work = tempfile.mkdtemp(prefix=f"million_{fmt_len(seq_len)}_")
    run_dir = os.path.join(work, "run")
    from longctx.parallel.groups import free_port
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "longctx.cli", "train", CONFIG, f"data.seq_len={seq_len}", f"train.steps={steps}",
           f"train.run_dir={run_dir}", "train.progress=false", "train.plot=false", "checkpoint.save_final=false",
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    t0 = time.time()
    load0 = load_avg()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mon = TreeRSS(proc.pid)
    mon.start()
    out = proc.communicate()[0]
    mon.stop.set()
    wall = time.time() - t0
    if proc.returncode:
        raise RuntimeError(f"training at {seq_len} failed (exit {proc.returncode}):\n{out[-4000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(x) for x in f if x.strip()]
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return {"records": recs, "wall_s": wall, "tree_peak_rss_gib": mon.peak / GIB, "load_before": load0,
            "load_after": load_avg()}


OVERRIDES: list = []  # the command line's config overrides: the plan describes the config that runs


def plan_for(seq_len: int):
    from longctx.config import load_config
    from longctx.train import planner
    cfg = load_config(CONFIG, [*OVERRIDES, f"data.seq_len={seq_len}", f"model.max_seq_len={max(seq_len, 1 << 20)}"])
    return cfg, planner.plan(cfg, 2)


def summarize(seq_len: int, res: dict, plan, rate_for_pred) -> dict:
    from longctx.train import planner
    last = res["records"][-1]
    first = res["records"][0]
    ranks = len(last["rank_peak_rss_gib"])
    peak_ranks = [max(r["rank_peak_rss_gib"][i] for r in res["records"]) for i in range(ranks)]
    rate = plan.flops_executed_rank / last["step_s"]  # achieved FLOP/s of one rank (recomputation counted)
    row = {
        "seq_len": seq_len, "ranks": ranks, "tokens_per_rank": plan.tokens_per_rank,
        "step_s": last["step_s"], "first_step_s": first["step_s"], "tokens_per_s": seq_len / last["step_s"],
        "loss": [r["loss"] for r in res["records"]],
        "peak_rss_gib_per_rank": peak_ranks, "peak_rss_gib_total": sum(peak_ranks),
        "sampled_total_rss_gib": res["tree_peak_rss_gib"],
        "phases_s_per_rank": {k: last[f"rank_{k}_s"] for k in ("fwd", "bwd", "opt", "comm")},
        "plan_peak_gib_per_rank": plan.peak_bytes / GIB, "plan_total_gib": plan.total_bytes / GIB,
        "plan_activation_bytes_per_token": plan.activation_per_token,
        "plan_memory_gib": {k: v / GIB for k, v in plan.memory.items()},
        "plan_vs_measured": plan.peak_bytes / GIB / max(peak_ranks),
        "flops_executed_rank": plan.flops_executed_rank, "flops_sequential_rank": plan.flops_sequential_rank,
        "model_flops": plan.model_flops, "achieved_flops_per_s_rank": rate,
        "plan_step_s": planner.step_seconds(plan, rate_for_pred) if rate_for_pred else None,
        "plan_rate_from": None, "wall_s": res["wall_s"], "load_avg": [res["load_before"], res["load_after"]],
    }
    if row["plan_step_s"]:
        row["plan_step_vs_measured"] = row["plan_step_s"] / row["step_s"]
    return row


def print_row(r: dict) -> None:
    ph = r["phases_s_per_rank"]
    print(f"\n== {fmt_len(r['seq_len'])} tokens ({r['seq_len']:,}), {r['ranks']} ranks x {r['tokens_per_rank']:,} tokens ==")
    print(f"time per step {r['step_s']:.1f} s (first step {r['first_step_s']:.1f} s), {r['tokens_per_s']:,.0f} tokens/s; "
          f"loss {', '.join(f'{x:.3f}' for x in r['loss'])}")
    print(f"peak resident memory per rank {', '.join(f'{x:.2f}' for x in r['peak_rss_gib_per_rank'])} GiB, "
          f"total {r['peak_rss_gib_total']:.2f} GiB (sampled simultaneous total {r['sampled_total_rss_gib']:.2f} GiB)")
    for i in range(r["ranks"]):
        print(f"  rank {i}: forward {ph['fwd'][i]:.1f} s, backward {ph['bwd'][i]:.1f} s, optimizer {ph['opt'][i]:.2f} s, "
              f"in collectives/waits {ph['comm'][i]:.1f} s")
    pred_t = f"{r['plan_step_s']:.1f} s" if r.get("plan_step_s") else "-"
    print(f"planner: {r['plan_peak_gib_per_rank']:.2f} GiB per rank ({r['plan_vs_measured']:.2f}x measured), "
          f"{r['plan_total_gib']:.2f} GiB total; step {pred_t}; executed {r['flops_executed_rank'] / 1e12:.2f} TFLOP "
          f"per rank (+{r['flops_sequential_rank'] / 1e12:.2f} in the hand-off chain) -> achieved "
          f"{r['achieved_flops_per_s_rank'] / 1e9:.1f} GFLOP/s per rank")


def plan_only(seq_len: int, rate) -> dict:
    from longctx.train import planner
    cfg, p = plan_for(seq_len)
    avail = planner.available_bytes()
    fits, _, msg = planner.check_fits(cfg, 2, 2, avail) if avail else (None, p, "")
    row = {"seq_len": seq_len, "planned_only": True, "ranks": 2, "tokens_per_rank": p.tokens_per_rank,
           "plan_peak_gib_per_rank": p.peak_bytes / GIB, "plan_total_gib": p.total_bytes / GIB,
           "plan_memory_gib": {k: v / GIB for k, v in p.memory.items()},
           "plan_activation_bytes_per_token": p.activation_per_token, "model_flops": p.model_flops,
           "flops_executed_rank": p.flops_executed_rank, "flops_sequential_rank": p.flops_sequential_rank,
           "plan_step_s": planner.step_seconds(p, rate) if rate else None, "rate_used": rate,
           "fits_here": fits, "refusal": msg}
    print(f"\n== {fmt_len(seq_len)} tokens ({seq_len:,}): planner only ==")
    print(f"needs {p.peak_bytes / GIB:.2f} GiB per rank, {p.total_bytes / GIB:.2f} GiB for 2 ranks "
          f"({p.activation_per_token:,.0f} activation bytes/token x {p.tokens_per_rank:,} tokens per rank); "
          f"{p.flops_executed_rank / 1e12:.1f} TFLOP per rank per step")
    if rate:
        print(f"time per step at the {rate / 1e9:.1f} GFLOP/s per rank achieved at the longest measured length: "
              f"{row['plan_step_s']:.0f} s ({seq_len / row['plan_step_s']:,.0f} tokens/s)")
    if fits is False:
        print("this machine: " + msg.replace("\n", "\n  "))
    return row


def replan(rows: dict) -> None:
    """Recompute every row's planner columns with the planner as it is now (after a calibration
    change), from the measured rows' stored figures; step-time predictions use the FLOP rate
    achieved at the next shorter measured length, as when the lengths are run in order."""
    from longctx.train import planner
    rate = None
    for L in sorted(rows):
        r = rows[L]
        _, p = plan_for(L)
        if r.get("planned_only"):
            continue
        r.update(plan_peak_gib_per_rank=p.peak_bytes / GIB, plan_total_gib=p.total_bytes / GIB,
                 plan_activation_bytes_per_token=p.activation_per_token,
                 plan_memory_gib={k: v / GIB for k, v in p.memory.items()},
                 plan_vs_measured=p.peak_bytes / GIB / max(r["peak_rss_gib_per_rank"]),
                 flops_executed_rank=p.flops_executed_rank, flops_sequential_rank=p.flops_sequential_rank,
                 model_flops=p.model_flops, achieved_flops_per_s_rank=p.flops_executed_rank / r["step_s"],
                 plan_step_s=planner.step_seconds(p, rate) if rate else None)
        if r["plan_step_s"]:
            r["plan_step_vs_measured"] = r["plan_step_s"] / r["step_s"]
        rate = r["achieved_flops_per_s_rank"]


def table(data: dict) -> str:
    lines = [f"Machine: {data['machine']}; {data['date']}; config `configs/million-cpu.yaml` "
             f"({data['model']}), 2 ranks (torchrun, 1 thread each), bf16, ZeRO-1.", "",
             "| tokens | time/step s (1st) | tokens/s | fwd / bwd / opt / comm s (rank 0; rank 1) | peak RSS GiB per rank | "
             "total GiB | planner GiB per rank (ratio) | planner step s (ratio) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("planned_only"):
            t = f"{r['plan_step_s']:.0f}" if r.get("plan_step_s") else "-"
            lines.append(f"| {fmt_len(r['seq_len'])} | not run | — | — | — | — | "
                         f"{r['plan_peak_gib_per_rank']:.2f} (total {r['plan_total_gib']:.1f}) | {t} (planned) |")
            continue
        ph = r["phases_s_per_rank"]
        phs = "; ".join(" / ".join(f"{ph[k][i]:.1f}" for k in ("fwd", "bwd", "opt", "comm")) for i in range(r["ranks"]))
        pt = f"{r['plan_step_s']:.0f} ({r['plan_step_vs_measured']:.2f})" if r.get("plan_step_s") else "—"
        lines.append(f"| {fmt_len(r['seq_len'])} | {r['step_s']:.1f} ({r['first_step_s']:.1f}) | {r['tokens_per_s']:,.0f} | "
                     f"{phs} | {', '.join(f'{x:.2f}' for x in r['peak_rss_gib_per_rank'])} | "
                     f"{r['peak_rss_gib_total']:.2f} | {r['plan_peak_gib_per_rank']:.2f} ({r['plan_vs_measured']:.2f}) | {pt} |")
    return "\n".join(lines)


def write_docs(path: str, text: str) -> None:
    begin, end = "<!-- million_token:begin -->", "<!-- million_token:end -->"
    with open(path) as f:
        doc = f.read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path}: markers {begin} ... {end} not found")
    a, b = doc.index(begin) + len(begin), doc.index(end)
    with open(path, "w") as f:
        f.write(doc[:a] + "\n" + text + "\n" + doc[b:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="64K,256K,1M", help="lengths to run, e.g. 64K,256K,1M")
    ap.add_argument("--seq-len", default=None, help="one length; 4M (or any the planner refuses) is planned only")
    ap.add_argument("--plan-lengths", default="4M", help="lengths to report from the planner only")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON results (merged into an existing file by length)")
    ap.add_argument("--docs", default=None, help="Markdown file whose million_token table is rewritten")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: recompute the planner's columns for the rows in --out and print/write")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides for every run")
    args = ap.parse_args()
    from longctx.train import planner
    prev = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            prev = json.load(f)
    rows = {r["seq_len"]: r for r in prev.get("rows", [])}
    lengths = [parse_len(x) for x in (args.seq_len or args.lengths).split(",") if x]
    plan_lengths = [] if args.seq_len else [parse_len(x) for x in args.plan_lengths.split(",") if x]
    print(f"machine: {machine()}")
    cfg, _ = plan_for(1 << 20)
    m = cfg.model
    model = f"{m.n_layers} layers {', '.join(m.mixers)}, d_model {m.d_model}, {m.n_heads} heads, ffn {m.ffn_hidden}"
    rate = None  # FLOP/s per rank achieved at the last measured length
    if args.report_only:
        replan(rows)
        lengths = []
    OVERRIDES[:] = list(args.overrides or [])

    def rate_below(L):
        """(FLOP/s per rank, length) of the longest measured length shorter than L: the step-time
        prediction for L never uses a measurement of L itself."""
        below = [r for r in rows.values() if not r.get("planned_only") and r["seq_len"] < L]
        if not below:
            return None, None
        r = max(below, key=lambda r: r["seq_len"])
        return r["achieved_flops_per_s_rank"], r["seq_len"]

    for L in lengths:
        rate, rate_from = rate_below(L)
        cfg, p = plan_for(L)
        avail = planner.available_bytes()
        fits = planner.check_fits(cfg, 2, 2, avail)[0] if avail else True
        if not fits:
            rows[L] = plan_only(L, rate)
            continue
        print(f"\nrunning {fmt_len(L)} ({L:,} tokens, {args.steps} steps); planner: {p.peak_bytes / GIB:.2f} GiB per "
              f"rank; load average {load_avg():.1f}", flush=True)
        res = run_length(L, args.steps, args.overrides, args.keep)
        row = summarize(L, res, p, rate)
        row["plan_rate_from"] = rate_from
        print_row(row)
        rows[L] = row
    for L in plan_lengths:
        longest = max((r for r in rows.values() if not r.get("planned_only")), key=lambda r: r["seq_len"], default=None)
        rows[L] = plan_only(L, longest["achieved_flops_per_s_rank"] if longest else rate)
    data = {"machine": prev.get("machine", machine()) if args.report_only else machine(),
            "date": prev.get("date", time.strftime("%Y-%m-%d")) if args.report_only else time.strftime("%Y-%m-%d"),
            "model": model, "config": "configs/million-cpu.yaml",
            "goals": {"peak_total_gib": 20, "step_s": 300, "planner_ratio": [0.75, 1.25]},
            "rows": [rows[k] for k in sorted(rows)]}
    text = table(data)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {args.out}")
    if args.docs:
        write_docs(args.docs, text)
        print(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
