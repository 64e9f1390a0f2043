"""Retrieval tasks, generated locally and deterministically: passkey (the landmark paper's
format, see passkey.py) and RULER-style needle-in-a-haystack with one or several keys.

NIAH prompt: the instruction, a haystack of noise sentences with `n_keys` needles
"One of the special magic numbers for {key} is: {value}." (the asked-for needle at the chosen
depth, the others at random depths), then the question naming one key. The answer is the
7-digit value; the scorer reads the first integer of the model's continuation.
"""
from __future__ import annotations

from typing import Callable, List

import numpy as np

from longctx.eval.passkey import FILLER, passkey_sample

TASKS = ("passkey", "niah", "ppl")

NIAH_INSTRUCTION = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
                    "them. I will quiz you about the numbers afterwards.")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
KEY_WORDS = ("apple", "river", "candle", "violin", "harbor", "meadow", "lantern", "pepper", "glacier", "saddle",
             "orchid", "falcon", "marble", "thunder", "compass", "biscuit", "canyon", "feather", "hammock", "iris",
             "jigsaw", "kettle", "lobster", "mosaic", "nectar", "oyster", "puzzle", "quartz", "rocket", "saffron",
             "tulip", "umbrella")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: valid tasks are {', '.join(TASKS)}")
    return task


def trial_rng(seed: int, task: str, length: int, depth: float, trial: int) -> np.random.Generator:
    """The generator of one trial: a pure function of its coordinates, so any subset of trials
    (a resumed evaluation, another rank) draws the same samples."""
    return np.random.default_rng([seed, TASKS.index(task), length, int(round(depth * 10000)), trial])


def _fit(build: Callable[[int], str], tokenizer, length: int, answer: str) -> int:
    """Largest filler count n with tokens(build(n) + answer) <= length (bisection)."""
    fits = lambda n: len(tokenizer.encode(build(n))) + len(tokenizer.encode(answer)) <= length  # noqa: E731
    if not fits(0):
        need = len(tokenizer.encode(build(0))) + len(tokenizer.encode(answer))
        raise ValueError(f"length={length} cannot hold the prompt even without filler ({need} tokens needed): "
                         f"use lengths >= {need}")
    lo, hi = 0, max(1, length // max(1, len(tokenizer.encode(" " + FILLER))))
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def niah_sample(tokenizer, rng: np.random.Generator, length: int, depth: float, n_keys: int = 1) -> dict:
    """One NIAH example of at most `length` tokens (prompt + answer). Returns prompt_ids,
    answer_ids, answer (int), depth, keys (the needles' keys, the asked one first)."""
    if not 1 <= n_keys <= len(KEY_WORDS):
        raise ValueError(f"n_keys={n_keys}: use 1 (single needle) to {len(KEY_WORDS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is outside [0, 1]")
    keys = [KEY_WORDS[i] for i in rng.choice(len(KEY_WORDS), size=n_keys, replace=False)]
    values = [int(v) for v in rng.integers(1_000_000, 10_000_000, size=n_keys)]
    other_depths = [float(d) for d in rng.uniform(0.0, 1.0, size=n_keys - 1)]
    needles = [(depth, NEEDLE.format(key=keys[0], value=values[0]))]
    needles += [(d, NEEDLE.format(key=k, value=v)) for d, k, v in zip(other_depths, keys[1:], values[1:])]
    question = NIAH_QUESTION.format(key=keys[0])

    def build(n_filler: int) -> str:
        slots: List[List[str]] = [[] for _ in range(n_filler + 1)]
        for d, text in needles:  # needle after round(d * n_filler) fillers
            slots[int(round(d * n_filler))].append(text)
        parts = [NIAH_INSTRUCTION]
        for i in range(n_filler + 1):
            parts += slots[i]
            if i < n_filler:
                parts.append(FILLER)
        parts.append(question)
        return " ".join(parts)

    answer = " " + str(values[0])
    n = _fit(build, tokenizer, length, answer)
    return {"prompt_ids": np.asarray(tokenizer.encode(build(n)), dtype=np.int64),
            "answer_ids": np.asarray(tokenizer.encode(answer), dtype=np.int64),
            "answer": values[0], "depth": depth, "keys": keys}


def retrieval_sample(task: str, tokenizer, seed: int, length: int, depth: float, trial: int, n_keys: int = 1) -> dict:
    """The sample of one trial, with "answer" the integer the model must produce."""
    rng = trial_rng(seed, task, length, depth, trial)
    if task == "passkey":
        s = passkey_sample(tokenizer, rng, length, depth)
        s["answer"] = s["passkey"]
        return s
    if task == "niah":
        return niah_sample(tokenizer, rng, length, depth, n_keys)
    raise ValueError(f"task {task!r} is not a retrieval task: use passkey or niah")
