"""Where a landmark model's passkey misses are: accuracy by the key's depth and by the phase of
its digits within their landmark block (the benchmark's trials, retrieval as it reads them).

    python benchmarks/passkey_misses.py RUN_DIR [--lengths 512,2k] [--trials 200] [--top-k 4]

RUN_DIR: a landmark run (e.g. runs/passkey-landmark-bench/landmark-more3). Trials are
benchmarks/passkey_landmark.py's (depth (i + 0.5) / trials, seed --seed); a trial's phase is the
index of the key's first digit (its first occurrence, in the key sentence) modulo the block size,
counted in regular tokens. Prints accuracy per depth quintile and per phase of 4 tokens.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from passkey_landmark import eval_landmark, trials  # noqa: E402

from longctx.eval.harness import parse_lengths  # noqa: E402
from longctx.eval.lm import load_eval_model  # noqa: E402


def key_phase(sample: dict, block: int) -> int:
    """Index of the key's first digit in the prompt (regular tokens) modulo the block size."""
    p, a = list(sample["prompt_ids"]), list(sample["answer_ids"])
    first = next(j for j in range(len(p) - len(a) + 1) if p[j:j + len(a)] == a)
    return first % block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--lengths", default="512,2k")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lm, tok, cfg, name = load_eval_model(args.run)
    block = int(cfg.model.landmark_block)
    for L in parse_lengths(args.lengths):
        samples = trials(tok, L, args.trials, args.seed)
        ok = np.array(eval_landmark(lm, tok, samples, args.top_k, args.batch, lambda k: None))
        q = np.array_split(np.arange(args.trials), 5)  # trial i sits at depth (i + 0.5) / trials
        phase = np.array([key_phase(s, block) for s in samples])
        print(f"{name} at {L}: {ok.mean():.3f} of {args.trials}; by depth quintile "
              + " / ".join(f"{ok[i].mean():.2f}" for i in q))
        bins = {lo: (phase >= lo) & (phase < lo + 4) for lo in range(0, block, 4)}
        cells = [f"{lo}-{lo + 3}: {ok[m].mean():.2f} ({int(m.sum())})" for lo, m in bins.items() if m.any()]
        print("  by the key's phase in its block (trials): " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
