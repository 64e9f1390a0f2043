"""Pictures: retrieval heatmaps (depth x length), perplexity vs length for several models, and
the curves of a training run. Each function returns the data it drew (tests check both)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    _plt().close(fig)
    os.replace(tmp, path)


def _len_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def retrieval_heatmap(res: Dict, path: str) -> np.ndarray:
    """Accuracy per (depth, length) as a heatmap PNG; returns the (depths, lengths) grid."""
    from longctx.eval.harness import accuracy_grid
    g = accuracy_grid(res)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * g.shape[1], 1.2 + 0.45 * g.shape[0]), dpi=100)
    im = ax.imshow(np.nan_to_num(g, nan=0.0), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(g.shape[1]), [_len_label(L) for L in res["lengths"]])
    ax.set_yticks(range(g.shape[0]), [f"{d:.2g}" for d in res["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth")
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            if not np.isnan(g[i, j]):
                ax.text(j, i, f"{100 * g[i, j]:.0f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(f"{res['task']} — {res.get('model', '')}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return g


def ppl_plot(results: Sequence[Dict], path: str, labels: Sequence[str] = ()) -> Dict[str, List]:
    """Perplexity vs context length, one line per result (several models on one plot)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    series = {}
    for i, res in enumerate(results):
        label = labels[i] if i < len(labels) else res.get("model", f"model {i}")
        pts = sorted((c["length"], c["ppl"]) for c in res["cells"].values())
        series[label] = pts
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return series


RUN_CURVES = (("loss", "loss (nats/token)"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"),
              ("peak_rss_gib", "peak RSS (GiB)"))


def plot_run(run_dir: str, path: str = "") -> Dict[str, List]:
    """Loss, learning rate, tokens/s and memory against step from run_dir/metrics.jsonl, as
    run_dir/curves.png (or `path`). Returns {curve: [(step, value), ...]}."""
    from longctx.train.metrics import read_jsonl
    mpath = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(mpath):
        raise ValueError(f"{run_dir} has no metrics.jsonl: pass a run folder made by `longctx train`")
    recs = [r for r in read_jsonl(mpath) if "step" in r]
    if not recs:
        raise ValueError(f"{mpath} has no step records yet")
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6), dpi=100)
    out = {}
    for ax, (key, label) in zip(axes.flat, RUN_CURVES):
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
        out[key] = pts
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    _save(fig, path or os.path.join(run_dir, "curves.png"))
    return out


def plot_paths(paths: Sequence[str], out: str = "") -> str:
    """`longctx plot`: a run folder -> its curves; retrieval JSON -> heatmap; one or more
    perplexity JSONs -> one perplexity-vs-length plot. Returns the PNG written."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        png = out or os.path.join(paths[0], "curves.png")
        plot_run(paths[0], png)
        return png
    results = []
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"{p}: not a run folder or an evaluation JSON")
        with open(p) as f:
            results.append(json.load(f))
    tasks = {r.get("task") for r in results}
    if tasks == {"ppl"}:
        png = out or os.path.splitext(paths[0])[0] + ".png"
        ppl_plot(results, png)
        return png
    if len(results) == 1 and tasks <= {"passkey", "niah"}:
        png = out or os.path.splitext(paths[0])[0] + ".png"
        retrieval_heatmap(results[0], png)
        return png
    raise ValueError(f"cannot plot {', '.join(paths)} together (tasks {sorted(map(str, tasks))}): give one run "
                     f"folder, one retrieval JSON, or perplexity JSONs")
