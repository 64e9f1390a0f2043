"""Evaluation runs: retrieval accuracy over a length x depth grid, and perplexity vs length.

A model is anything with
    generate(prompt_ids: np.ndarray, max_new_tokens: int) -> List[int]   (greedy continuation)
    nll(ids: np.ndarray) -> Tuple[float, int]   (sum of -log p(ids[t+1] | ids[:t+1]), count)
and optionally `check_length(n) -> None` that raises ValueError for lengths it cannot run
(lm.py adapts our checkpoints). Results are JSON; an interrupted run resumes from the partial
file it left (every finished cell is written atomically), with a progress bar and ETA.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from longctx.eval.passkey import first_integer
from longctx.eval.tasks import check_task, retrieval_sample
from longctx.train.files import atomic_write


def parse_lengths(spec: str) -> List[int]:
    """'1k,4k,16k' or '512,2048' -> token counts (k = 1024, m = 1048576)."""
    out = []
    for part in str(spec).split(","):
        p = part.strip().lower()
        mult = {"k": 1024, "m": 1024 ** 2}.get(p[-1:], 1)
        try:
            n = int(float(p[:-1] if mult > 1 else p) * mult)
        except ValueError:
            raise ValueError(f"--lengths: cannot read {part!r}: use numbers such as 512,2k,16k") from None
        if n < 1:
            raise ValueError(f"--lengths: {part!r} is not a positive length")
        out.append(n)
    return out


def parse_depths(spec: str) -> List[float]:
    """'0:1:0.1' (start:stop:step, stop included) or '0,0.5,1' -> depths in [0, 1]."""
    s = str(spec)
    if ":" in s:
        try:
            a, b, st = (float(x) for x in s.split(":"))
        except ValueError:
            raise ValueError(f"--depths: {spec!r} is not start:stop:step (e.g. 0:1:0.1)") from None
        if st <= 0 or b < a:
            raise ValueError(f"--depths: {spec!r} needs step > 0 and stop >= start")
        vals = [round(a + i * st, 6) for i in range(int(math.floor((b - a) / st + 1e-9)) + 1)]
    else:
        try:
            vals = [float(x) for x in s.split(",")]
        except ValueError:
            raise ValueError(f"--depths: cannot read {spec!r}: use 0:1:0.1 or 0,0.5,1") from None
    bad = [v for v in vals if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"--depths: {bad} outside [0, 1] (0 = start of the context, 1 = its end)")
    return vals


def _load_partial(path: str, header: Dict) -> Dict:
    if not path or not os.path.exists(path):
        return {**header, "cells": {}, "complete": False}
    with open(path) as f:
        old = json.load(f)
    differs = [k for k in header if k not in ("model", "started") and old.get(k) != header[k]]
    if differs:
        raise ValueError(f"{path} holds an evaluation with other settings ({', '.join(differs)}): "
                         f"pass another --out or delete it")
    return old


def _save(path: Optional[str], res: Dict) -> None:
    if path:
        atomic_write(path, json.dumps(res, indent=1).encode())


def run_retrieval(task: str, model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int,
                  out: Optional[str] = None, seed: int = 0, n_keys: int = 1, max_new_tokens: int = 12,
                  progress: bool = True, model_name: str = "model", write: bool = True) -> Dict:
    """Accuracy of `model` on `task` (passkey | niah) for every (length, depth), `trials` each.
    Cells already in `out` (a partial run) are kept and not run again. write=False: read `out`
    but leave writing it to another rank (sequence-parallel evaluation)."""
    check_task(task)
    if task == "ppl":
        raise ValueError("task ppl is not a retrieval task: use run_ppl")
    if trials < 1:
        raise ValueError(f"--trials={trials}: use at least 1")
    for L in lengths:  # refuse up front, before any trial runs
        retrieval_sample(task, tokenizer, seed, L, depths[0], 0, n_keys)  # too short for the prompt?
        if hasattr(model, "check_length"):
            model.check_length(L)
    header = {"task": task, "seed": seed, "n_keys": n_keys if task == "niah" else None, "trials": trials,
              "lengths": list(lengths), "depths": list(depths), "model": model_name}
    res = _load_partial(out, header)
    cells = res["cells"]
    todo = [(L, d) for L in lengths for d in depths if f"{L}|{d}" not in cells]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(lengths) * len(depths) * trials, initial=(len(lengths) * len(depths) - len(todo)) * trials,
                   desc=f"eval {task}", unit="trial", dynamic_ncols=True)
    for L, d in todo:
        correct, answers = 0, []
        for t in range(trials):
            s = retrieval_sample(task, tokenizer, seed, L, d, t, n_keys)
            gen = model.generate(s["prompt_ids"], max_new_tokens)
            got = first_integer(tokenizer.decode(gen))
            correct += int(got == s["answer"])
            answers.append([s["answer"], got])
            if bar is not None:
                bar.update(1)
        cells[f"{L}|{d}"] = {"length": L, "depth": d, "correct": correct, "total": trials,
                             "accuracy": correct / trials, "answers": answers}
        _save(out if write else None, res)  # a finished cell is never run again
    if bar is not None:
        bar.close()
    res["complete"] = True
    res["accuracy_by_length"] = {str(L): sum(cells[f"{L}|{d}"]["correct"] for d in depths) / (len(depths) * trials)
                                 for L in lengths}
    _save(out if write else None, res)
    return res


def accuracy_grid(res: Dict) -> np.ndarray:
    """(depths, lengths) accuracy matrix of a retrieval result (NaN for missing cells)."""
    g = np.full((len(res["depths"]), len(res["lengths"])), np.nan)
    for i, d in enumerate(res["depths"]):
        for j, L in enumerate(res["lengths"]):
            c = res["cells"].get(f"{L}|{d}")
            if c:
                g[i, j] = c["accuracy"]
    return g


def ppl_windows(n_tokens: int, length: int, n_windows: int, seed: int) -> List[int]:
    """Start offsets of `n_windows` windows of length + 1 tokens, spread evenly over the file
    (deterministic; `seed` shifts them)."""
    span = n_tokens - (length + 1)
    if span < 0:
        raise ValueError(f"length {length} needs {length + 1} tokens but the token file has {n_tokens}: "
                         f"use shorter lengths or a larger file")
    rng = np.random.default_rng([seed, length])
    off = int(rng.integers(0, max(1, span // max(1, n_windows)) + 1))
    return [min(span, off + i * (span // max(1, n_windows))) for i in range(n_windows)]


def run_ppl(model, token_reader: Callable[[int, int], np.ndarray], n_tokens: int, lengths: Sequence[int],
            n_windows: int = 4, out: Optional[str] = None, seed: int = 0, progress: bool = True,
            model_name: str = "model", write: bool = True) -> Dict:
    """Perplexity at each context length: windows of length + 1 tokens from a token file; the
    model predicts every token from all before it in the window. Also the perplexity of each
    window's last quarter (the tokens with the most context), where long context helps most."""
    for L in lengths:
        ppl_windows(n_tokens, L, n_windows, seed)
        if hasattr(model, "check_length"):
            model.check_length(L)
    header = {"task": "ppl", "seed": seed, "windows": n_windows, "lengths": list(lengths), "model": model_name}
    res = _load_partial(out, header)
    cells = res["cells"]
    todo = [L for L in lengths if str(L) not in cells]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(lengths) * n_windows, initial=(len(lengths) - len(todo)) * n_windows, desc="eval ppl",
                   unit="window", dynamic_ncols=True)
    for L in todo:
        tot, cnt, tail_tot, tail_cnt = 0.0, 0, 0.0, 0
        t0 = time.perf_counter()
        for start in ppl_windows(n_tokens, L, n_windows, seed):
            ids = token_reader(start, start + L + 1)
            per_tok = model.nll_per_token(ids) if hasattr(model, "nll_per_token") else None
            if per_tok is None:
                s, c = model.nll(ids)
                tot, cnt = tot + s, cnt + c
            else:
                tot, cnt = tot + float(per_tok.sum()), cnt + per_tok.size
                q = per_tok[-max(1, per_tok.size // 4):]
                tail_tot, tail_cnt = tail_tot + float(q.sum()), tail_cnt + q.size
            if bar is not None:
                bar.update(1)
        cells[str(L)] = {"length": L, "nll": tot / cnt, "ppl": math.exp(tot / cnt), "tokens": cnt,
                         "tail_ppl": math.exp(tail_tot / tail_cnt) if tail_cnt else None,
                         "seconds": time.perf_counter() - t0}
        _save(out if write else None, res)
    if bar is not None:
        bar.close()
    res["complete"] = True
    _save(out if write else None, res)
    return res
