"""Which training recipe makes a small model learn passkey retrieval within a CPU budget?

A research sweep behind benchmarks/passkey_landmark.py: trains variants of the passkey models
in-process (same model, sampler, AdamW, warmup + cosine and clipping as `longctx train`, no
DeepSpeed), several at once in worker processes, and records after every `--eval-every` steps
the exact-answer rate on held-out prompts (teacher forcing: every answer token and the eos
after it must be the argmax) at the stage's length, 128, 512 and 2K (full attention, for
landmark models the full grouped softmax), and at the end the landmark models' greedy answers
through the retrieval cache (top-4 blocks, compressed positions; --retrieval) at 2K and 8K.
Steps are the currency: a recipe that learns in N steps here learns in N steps on the CPU.
Variants may save their weights and others start from them (`save` / `init`: one short stage,
several long stages). Findings: docs/landmark.md, Status; docs/passkey_sweep_*.json.

    python benchmarks/passkey_sweep.py --variants all --workers 8 --out runs/passkey_sweep.json
    python benchmarks/passkey_sweep.py --variants short-lr1e-3 && \
        python benchmarks/passkey_sweep.py --variants long-lr2e-3,long-lr5e-4 --workers 2
    python benchmarks/passkey_sweep.py --list
    python benchmarks/passkey_sweep.py --table docs/passkey_sweep_h100.json docs/passkey_sweep_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "passkey-landmark-cpu.yaml")


def stage(L: int, batch: int, steps: int, lr: float, targets: str = "all", warmup: int = 20, mix512: int = 0,
          jitter: int = 0, min_len: int = 0, **model) -> dict:
    """One training stage: L regular tokens per window, `batch` windows per step; mix512 > 0:
    every second step is instead mix512 windows of 512 tokens; `model`: model overrides for
    this stage only (e.g. landmark_block), weights carried over. jitter > 0: position skips
    (PoSE-like): at every group boundary positions jump by 0..jitter whole groups, drawn per
    row, so distances between blocks vary as retrieval's compressed positions change them.
    min_len > 0: prompt lengths uniform in min_len..L (data.passkey_min_len)."""
    return {"L": L, "batch": batch, "steps": steps, "lr": lr, "targets": targets, "warmup": warmup,
            "mix512": mix512, "jitter": jitter, "min_len": min_len, "model": model}


def jitter_positions(pos_BT: torch.Tensor, W: int, jitter: int, gen: torch.Generator) -> torch.Tensor:
    """Positions with a skip of 0..jitter groups (of W) at every group boundary, per row."""
    B, T = pos_BT.shape
    n_groups = (T + W - 1) // W
    skips = torch.randint(0, jitter + 1, (B, n_groups), generator=gen)
    skips[:, 0] = 0
    offs = (skips.cumsum(1) * W).repeat_interleave(W, 1)[:, :T]
    return pos_BT + offs


CUR = [stage(128, 32, 800, 3e-3), stage(512, 8, 300, 2e-3)]  # the benchmark's recipe today


def _v(model: Dict, stages: List[dict], plain: bool = False, seed: int = 0, key_digits: int = 0,
       init: str = "", save: str = "", weight_decay: float = None) -> dict:
    """key_digits > 0: training keys are random strings of 1..key_digits digits (held-out
    prompts keep the task's keys, 1..50000). init / save: a state dict to start from / to write
    after the last stage (paths relative to the repository root)."""
    return {"model": model, "stages": stages, "plain": plain, "seed": seed, "key_digits": key_digits,
            "init": init, "save": save, "weight_decay": weight_decay}


K2 = [stage(128, 32, 600, 3e-3), stage(512, 8, 300, 2e-3)]
# benchmarks/passkey_landmark.py's three stages (lr 1e-3 throughout, prompts of 70-L after the first)
BENCH512 = [stage(128, 32, 800, 1e-3), stage(256, 16, 400, 1e-3, min_len=70), stage(512, 8, 700, 1e-3, min_len=70)]
HALF512 = [stage(128, 16, 800, 1e-3), stage(256, 8, 400, 1e-3, min_len=70), stage(512, 4, 700, 1e-3, min_len=70)]


VARIANTS: Dict[str, dict] = {
    "cur": _v({}, CUR),
    "cur-s1": _v({}, CUR, seed=1),
    "plain-cur": _v({}, CUR, plain=True),
    "lr1e-3": _v({}, [stage(128, 32, 800, 1e-3), stage(512, 8, 300, 1e-3)]),
    "lr6e-3": _v({}, [stage(128, 32, 800, 6e-3), stage(512, 8, 300, 2e-3)]),
    "lr1e-2": _v({}, [stage(128, 32, 800, 1e-2), stage(512, 8, 300, 3e-3)]),
    "L2": _v({"n_layers": 2}, CUR),
    "L4": _v({"n_layers": 4}, CUR),
    "h8": _v({"n_heads": 8, "n_kv_heads": 8}, CUR),
    "d256": _v({"d_model": 256, "n_heads": 8, "n_kv_heads": 8}, CUR),
    "answer": _v({}, [stage(128, 32, 800, 3e-3, "answer"), stage(512, 8, 300, 2e-3, "answer")]),
    "direct512": _v({}, [stage(512, 8, 1100, 3e-3)]),
    "direct512-b16": _v({}, [stage(512, 16, 1100, 3e-3)]),
    "s256": _v({}, [stage(256, 16, 800, 3e-3), stage(512, 8, 300, 2e-3)]),
    "b64": _v({}, [stage(128, 64, 800, 3e-3), stage(512, 8, 300, 2e-3)]),
    "blk16": _v({"landmark_block": 16}, CUR),
    "blk64": _v({"landmark_block": 64}, [stage(128, 32, 800, 3e-3), stage(512, 8, 300, 2e-3)]),
    "long1600": _v({}, [stage(128, 32, 1600, 3e-3), stage(512, 8, 600, 2e-3)]),
    "plain-lr6e-3": _v({}, [stage(128, 32, 800, 6e-3), stage(512, 8, 300, 2e-3)], plain=True),
    "plain-L2": _v({"n_layers": 2}, CUR, plain=True),
    "plain-direct512": _v({}, [stage(512, 8, 1100, 3e-3)], plain=True),
    "L2-lr6e-3": _v({"n_layers": 2}, [stage(128, 32, 800, 6e-3), stage(512, 8, 300, 2e-3)]),
    "h8-lr6e-3": _v({"n_heads": 8, "n_kv_heads": 8}, [stage(128, 32, 800, 6e-3), stage(512, 8, 300, 2e-3)]),
    "wd0": _v({}, CUR, weight_decay=0.0),
    # round 2: long keys (more copy targets per sample)
    "k16": _v({}, K2, key_digits=16),
    "plain-k16": _v({}, K2, plain=True, key_digits=16),
    "k32": _v({}, K2, key_digits=32),
    "k16-lr1e-3": _v({}, [stage(128, 32, 600, 1e-3), stage(512, 8, 300, 1e-3)], key_digits=16),
    "k16-d512": _v({}, [stage(512, 8, 900, 3e-3)], key_digits=16),
    "plain-k16-d512": _v({}, [stage(512, 8, 900, 3e-3)], plain=True, key_digits=16),
    "L2-k16": _v({"n_layers": 2}, K2, key_digits=16),
    "k16-blk16": _v({"landmark_block": 16}, K2, key_digits=16),
    # round 3: learn copying with one block per prompt (plain softmax inside it), then blocks of 32
    "oneblock-then-32": _v({}, [stage(128, 32, 600, 3e-3, landmark_block=128), stage(512, 8, 600, 2e-3)]),
    # round 4 (this CPU): one short stage saved, then long-stage variants from its weights
    "short-lr1e-3": _v({}, [stage(128, 32, 800, 1e-3)], save="runs/passkey_sweep/short-lr1e-3.pt"),
    "long-lr2e-3": _v({}, [stage(512, 8, 300, 2e-3)], init="runs/passkey_sweep/short-lr1e-3.pt"),
    "long-lr5e-4": _v({}, [stage(512, 8, 300, 5e-4, warmup=50)], init="runs/passkey_sweep/short-lr1e-3.pt"),
    "long-lr2e-3-save": _v({}, [stage(512, 8, 300, 2e-3)], init="runs/passkey_sweep/short-lr1e-3.pt",
                           save="runs/passkey_sweep/long-lr2e-3.pt"),
    "long-jitter3": _v({}, [stage(512, 8, 300, 2e-3, jitter=3)], init="runs/passkey_sweep/short-lr1e-3.pt",
                       save="runs/passkey_sweep/long-jitter3.pt"),
    "jitter-short": _v({}, [stage(128, 32, 800, 1e-3, jitter=3)], save="runs/passkey_sweep/jitter-short.pt"),
    "jitter-long": _v({}, [stage(512, 8, 300, 2e-3, jitter=3)], init="runs/passkey_sweep/jitter-short.pt"),
    "var256": _v({}, [stage(256, 16, 800, 1e-3, min_len=70)], save="runs/passkey_sweep/var256.pt"),
    "var128": _v({}, [stage(128, 32, 800, 1e-3, min_len=70)], save="runs/passkey_sweep/var128.pt"),
    "var256-from-short": _v({}, [stage(256, 16, 400, 1e-3, min_len=70)], init="runs/passkey_sweep/short-lr1e-3.pt",
                            save="runs/passkey_sweep/var256-from-short.pt"),
    "var512-from-var256": _v({}, [stage(512, 8, 300, 1e-3, min_len=70)], init="runs/passkey_sweep/var256-from-short.pt",
                             save="runs/passkey_sweep/var512-from-var256.pt"),
    "var512-more": _v({}, [stage(512, 8, 400, 1e-3, min_len=70)], init="runs/passkey_sweep/var512-from-var256.pt",
                      save="runs/passkey_sweep/var512-more.pt"),
    # session 9 (H100): the benchmark's chain from scratch as one variant, its seed-to-seed spread,
    # shorter chains, and windows of 1024 (batch 4: same tokens per step) for the last stage
    "b512-s0": _v({}, BENCH512, seed=0),
    "b512-s1": _v({}, BENCH512, seed=1),
    "b512-s2": _v({}, BENCH512, seed=2),
    "b512-2cyc": _v({}, BENCH512[:2] + [stage(512, 8, 300, 1e-3, min_len=70), stage(512, 8, 400, 1e-3, min_len=70)]),
    "f512": _v({}, [stage(128, 32, 600, 1e-3), stage(256, 16, 300, 1e-3, min_len=70), stage(512, 8, 500, 1e-3, min_len=70)]),
    "f512-lr2e-3": _v({}, [stage(128, 32, 600, 1e-3), stage(256, 16, 300, 2e-3, min_len=70),
                           stage(512, 8, 500, 2e-3, min_len=70)]),
    "b1024": _v({"max_seq_len": 2048}, BENCH512[:2] + [stage(1024, 4, 700, 1e-3, min_len=70)]),
    "skip-mid": _v({}, [stage(128, 32, 800, 1e-3), stage(512, 8, 1100, 1e-3, min_len=70)]),
    # cheaper chains: half the tokens per step (half the batch), fewer short or long steps
    "half-s0": _v({}, HALF512, seed=0),
    "half-s1": _v({}, HALF512, seed=1),
    "half-s2": _v({}, HALF512, seed=2),
    "half-skipmid": _v({}, [stage(128, 16, 800, 1e-3), stage(512, 4, 1100, 1e-3, min_len=70)]),
    "b512-short600": _v({}, [stage(128, 32, 600, 1e-3)] + BENCH512[1:]),
    "b512-long500": _v({}, BENCH512[:2] + [stage(512, 8, 500, 1e-3, min_len=70)], seed=1),
    "plain-b512": _v({}, BENCH512, plain=True),
    "plain-half": _v({}, HALF512, plain=True),
    "long-mixed": _v({}, [stage(128, 32, 300, 5e-4, warmup=50, mix512=8)], init="runs/passkey_sweep/short-lr1e-3.pt"),
}


def _long_keys(max_digits: int):
    """A stand-in for longctx.eval.passkey._draw_passkey: a string of 1..max_digits random digits."""
    def draw(rng):
        n = int(rng.integers(1, max_digits + 1))
        return "".join(str(d) for d in rng.integers(0, 10, n))
    return draw


def _cfg(variant: dict, tok_path: str, stage_model: Dict = None):
    from longctx.config import load_config
    ov = [f"data.tokenizer={tok_path}", "model.vocab_size=64"]
    ov += [f"model.{k}={v}" for k, v in {**variant["model"], **(stage_model or {})}.items()]
    if variant["plain"]:
        ov += ["model.mixers=[softmax]"]
    return load_config(CONFIG, ov)


def _sampler(cfg, tok, L: int, batch: int, seed: int, targets: str, min_len: int = 0):
    from longctx.train.data import PasskeySampler
    block = 0 if "landmark" not in list(cfg.model.mixers) else int(cfg.model.landmark_block)
    seq_len = L + (L // block if block else 0)
    return PasskeySampler(tok, seq_len, batch, seed, landmark_block=block, landmark_id=tok.landmark_id if block else -1,
                          targets=targets, min_len=min_len)


@torch.no_grad()
def exact_rate(model, cfg, tok, L: int, n: int, device, batch: int = 32) -> float:
    """Share of n held-out prompts of L regular tokens whose answer + eos are all argmax."""
    from longctx.model.transformer import SeqContext
    s = _sampler(cfg, tok, L, min(batch, n), seed=987654, targets="answer")
    model.eval()
    ok, done = 0, 0
    for step in range(math.ceil(n / s.micro_batch_size)):
        b = s.batch(step)
        ids, lab = b["input_ids"].to(device), b["labels"].to(device)
        h = model.hidden(ids, SeqContext(positions=b["positions"].to(device)))
        pred = torch.nn.functional.linear(h, model.head_weight).argmax(-1)
        good = ((pred == lab) | (lab == -100)).all(-1)
        ok += int(good.sum())
        done += ids.shape[0]
    model.train()
    return ok / done


def run(name: str, variant: dict, tok_path: str, device: str, eval_every: int, n_eval: int,
        retrieval=((2048, 64), (8192, 32)), save_dir: str = "") -> dict:
    """Train one variant; retrieval: (length, trials) pairs of the final retrieval check;
    save_dir: also write the final weights to save_dir/<name>.pt (variants without their own save)."""
    from longctx.train.data import load_tokenizer
    from longctx.model.transformer import DecoderLM, SeqContext
    torch.manual_seed(variant["seed"])
    cfg = _cfg(variant, tok_path)
    tok = load_tokenizer(tok_path)
    dev = torch.device(device)
    model = DecoderLM(cfg.model).to(dev)
    if variant.get("init"):
        model.load_state_dict(torch.load(os.path.join(ROOT, variant["init"]), map_location=dev))
    curve, t0, gstep = [], time.perf_counter(), 0
    gen = torch.Generator().manual_seed(variant["seed"])
    for si, st in enumerate(variant["stages"]):
        scfg = _cfg(variant, tok_path, st.get("model"))
        if scfg.model != cfg.model:  # this stage's model settings: same weights, new layout
            cfg, sd = scfg, model.state_dict()
            model = DecoderLM(cfg.model).to(dev)
            model.load_state_dict(sd)
        sampler = _sampler(cfg, tok, st["L"], st["batch"], seed=1234 + 17 * si + variant["seed"], targets=st["targets"],
                           min_len=st.get("min_len", 0))
        if st.get("mix512"):
            s512 = _sampler(cfg, tok, 512, st["mix512"], seed=4321 + 17 * si + variant["seed"], targets=st["targets"])
        wd = cfg.train.weight_decay if variant.get("weight_decay") is None else variant["weight_decay"]
        opt = torch.optim.AdamW(model.parameters(), lr=st["lr"], betas=(0.9, 0.95), weight_decay=wd)
        for step in range(st["steps"]):
            w = st["warmup"]
            frac = (step + 1) / w if step < w else None
            if frac is None:
                p = (step - w) / max(1, st["steps"] - w)
                frac = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))
            for g in opt.param_groups:
                g["lr"] = st["lr"] * frac
            if variant.get("key_digits"):
                import longctx.eval.passkey as pk
                orig, pk._draw_passkey = pk._draw_passkey, _long_keys(variant["key_digits"])
                try:
                    b = sampler.batch(step)
                finally:
                    pk._draw_passkey = orig
            elif st.get("mix512") and step % 2:
                b = s512.batch(step // 2)
            else:
                b = sampler.batch(step)
            if st.get("jitter"):
                W = int(cfg.model.landmark_block) + 1 if "landmark" in list(cfg.model.mixers) else 33
                b["positions"] = jitter_positions(b["positions"], W, st["jitter"], gen)
            loss_sum, n = model(b["input_ids"].to(dev), SeqContext(positions=b["positions"].to(dev)),
                                b["labels"].to(dev))
            loss = loss_sum / n
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            gstep += 1
            if (step + 1) % eval_every == 0 or step + 1 == st["steps"]:
                row = {"step": gstep, "stage": si, "loss": round(float(loss.detach()), 4), "s": round(time.perf_counter() - t0, 1)}
                for L in sorted({128, st["L"], 512, 2048}):
                    row[f"exact{L}"] = exact_rate(model, cfg, tok, L, n_eval, dev)
                curve.append(row)
                print(f"{name}: {row}", flush=True)
    out = {"name": name, "variant": variant, "curve": curve}
    save = variant.get("save") or (os.path.join(os.path.abspath(save_dir), name + ".pt") if save_dir else "")
    if save:
        path = os.path.join(ROOT, save)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(model.state_dict(), path)
    if not variant["plain"]:
        from passkey_landmark import eval_landmark, trials
        class _LM:  # the attributes eval_landmark reads
            pass
        lm = _LM()
        lm.cfg, lm.model = cfg, model.eval()
        try:
            for L, n in retrieval:
                ok = eval_landmark(lm, tok, trials(tok, L, n, 0), 4, 32, lambda k: None)
                out[f"retrieval{L}"] = sum(ok) / n
            print(f"{name}: retrieval " + ", ".join(f"{L}: {out[f'retrieval{L}']:.2f}" for L, _ in retrieval), flush=True)
        except Exception as exc:  # keep the training curve
            out["retrieval_error"] = f"{type(exc).__name__}: {exc}"
    from longctx.model.landmark import LOCAL_GROUPS
    out["retrieval_local_groups"] = LOCAL_GROUPS
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def table(paths: List[str]) -> str:
    """The markdown table of finished variants in sweep JSONs (each a list of results, or a dict
    whose list values are; 'machine' names the device, shown as H100 or CPU)."""
    lines = ["| variant | model | where | steps, first stage | exact@128 after it | steps, all | exact@512 | "
             "exact@2K (full) | retrieval@2K (k=4) | retrieval@8K (k=4) |", "|---" * 10 + "|"]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        where = "H100" if "H100" in str(data.get("machine", "")) else "CPU" if isinstance(data, dict) else "?"
        runs = data if isinstance(data, list) else [r for v in data.values() if isinstance(v, list) for r in v]
        for r in runs:
            if "error" in r:
                continue
            cv = r["curve"]
            first, last = [x for x in cv if x["stage"] == 0][-1], cv[-1]
            e128, ret, ret8 = first.get("exact128"), r.get("retrieval2048"), r.get("retrieval8192")
            fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            win = r.get("retrieval_local_groups")  # recorded from the local window's introduction on
            lines.append(f"| {r['name']} | {'plain' if r['variant']['plain'] else 'landmark'} | {where} | "
                         f"{first['step']} | {fmt(e128)} | {last['step']} | {last['exact512']:.2f} | "
                         f"{last['exact2048']:.2f} | {fmt(ret)}{f' (window {win})' if win and ret is not None else ''} | "
                         f"{fmt(ret8)} |")
    return "\n".join(lines)


def _worker(args):
    name, variant, tok_path, device, eval_every, n_eval, retrieval, save_dir = args
    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "2")))
    try:
        return run(name, variant, tok_path, device, eval_every, n_eval, retrieval, save_dir)
    except Exception as exc:  # a variant's failure is recorded, the sweep goes on
        import traceback
        return {"name": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="all", help="comma-separated names, or all")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the markdown table of sweep JSONs and exit")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--scale-steps", type=float, default=1.0, help="multiply every stage's steps (quick checks)")
    ap.add_argument("--retrieval", default="2048:64,8192:32", help="LENGTH:TRIALS,... of the final retrieval check")
    ap.add_argument("--out", default="runs/passkey_sweep.json")
    ap.add_argument("--save-dir", default="", help="write each variant's final weights to DIR/<name>.pt")
    args = ap.parse_args(argv)
    from longctx.kernels.cpu import tune_allocator
    tune_allocator()  # large temporaries reuse heap pages, as under the CLI (benchmarks/passkey_landmark.py's retrieval ran faster)
    if args.table:
        print(table(args.table))
        return 0
    if args.list:
        for k, v in VARIANTS.items():
            print(k, json.dumps(v))
        return 0
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}: pick from {list(VARIANTS)}")
    from passkey_landmark import write_word_tokenizer
    retrieval = [tuple(int(x) for x in item.split(":")) for item in args.retrieval.split(",") if item]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    tok_path = write_word_tokenizer(os.path.splitext(os.path.abspath(args.out))[0] + ".tokenizer.json")
    jobs = []
    for n in names:
        v = json.loads(json.dumps(VARIANTS[n]))
        for st in v["stages"]:
            st["steps"] = max(1, int(st["steps"] * args.scale_steps))
        jobs.append((n, v, tok_path, args.device, args.eval_every, args.n_eval, retrieval, args.save_dir))
    results = []
    if args.workers <= 1:
        results = [_worker(j) for j in jobs]
    else:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(args.workers) as pool:
            for r in pool.imap_unordered(_worker, jobs):
                results.append(r)
                with open(args.out, "w") as f:  # partial results survive a timeout
                    json.dump(results, f, indent=1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for r in results:
        if "error" in r:
            print(f"{r['name']}: ERROR {r['error']}")
            continue
        last = r["curve"][-1]
        first_ok = next((c["step"] for c in r["curve"] if c.get("exact512", 0) >= 0.9), None)
        print(f"{r['name']:>16}: exact512 {last['exact512']:.2f} exact2048 {last['exact2048']:.2f} "
              f"retr2K {r.get('retrieval2048', float('nan')):.2f} retr8K {r.get('retrieval8192', float('nan')):.2f} "
              f"first>=0.9@512 step {first_ok} ({r['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
