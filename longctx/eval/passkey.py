"""The passkey-retrieval task of the landmark-attention paper (Mohtashami & Jaggi, 2023).

A prompt hides one "pass key" sentence inside repeated filler text at a chosen relative depth
and ends with a question; a model that attends over the whole context answers with the key.
The scorer reads the first integer of the generated text, as the paper's evaluation does.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import numpy as np

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {N}. Remember it. {N} is the pass key."
QUESTION = "What is the pass key? The pass key is"
PASSKEY_MIN = 1
PASSKEY_MAX = 50000

_INT_RE = re.compile(r"\d+")


def _check_depth(depth: float) -> float:
    """Return `depth` as float; ValueError unless it lies in [0, 1]."""
    depth = float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is outside [0, 1]: pass the key's relative position, "
                         f"0 = right after the instruction, 1 = right before the question")
    return depth


def _draw_passkey(rng: np.random.Generator) -> int:
    """One passkey, uniform in PASSKEY_MIN..PASSKEY_MAX inclusive."""
    return int(rng.integers(PASSKEY_MIN, PASSKEY_MAX + 1))


def build_prompt(passkey: int, n_filler: int, depth: float) -> str:
    """The prompt text for a given key: instruction, fillers with the key sentence after
    round(depth * n_filler) of them, then the question; all parts joined by single spaces."""
    if n_filler < 0:
        raise ValueError(f"n_filler={n_filler} is negative: pass a count >= 0")
    depth = _check_depth(depth)
    n_before = int(round(depth * n_filler))
    parts = [INSTRUCTION]
    parts += [FILLER] * n_before
    parts.append(KEY_SENTENCE.format(N=passkey))
    parts += [FILLER] * (n_filler - n_before)
    parts.append(QUESTION)
    return " ".join(parts)


def passkey_prompt(rng: np.random.Generator, n_filler: int, depth: float) -> Tuple[str, int]:
    """Draw a passkey from `rng` and build its prompt.

    Returns (prompt_text, passkey); the answer the model should continue with is " {passkey}".
    """
    depth = _check_depth(depth)
    passkey = _draw_passkey(rng)
    return build_prompt(passkey, n_filler, depth), passkey


def _n_tokens(tokenizer, passkey: int, n_filler: int, depth: float, answer_len: Optional[int] = None) -> int:
    """Tokens needed for prompt + answer with `n_filler` fillers.

    Both the joint encoding and the separate prompt/answer encodings are counted (their max),
    because the sampler concatenates the separate ones and a subword tokenizer may merge
    differently across the boundary. answer_len: the answer's own token count, if known.
    """
    prompt = build_prompt(passkey, n_filler, depth)
    answer = " " + str(passkey)
    joint = len(tokenizer.encode(prompt + answer))
    if answer_len is None:
        answer_len = len(tokenizer.encode(answer))
    return max(joint, len(tokenizer.encode(prompt)) + answer_len)


def _max_fillers(tokenizer, passkey: int, length: int, depth: float, base: Optional[int] = None,
                 answer_len: Optional[int] = None) -> int:
    """Largest n_filler whose prompt + answer fits in `length` tokens; the caller has checked
    that 0 fillers fit.

    Token counts grow with the filler count, so the largest fitting count is one number; the
    search starts at the guess (length - tokens without filler) // tokens per filler, exact for
    a tokenizer that encodes every filler alike (word-level, bytes), where two checks confirm
    it (a training batch draws many prompts: a bisection from 0 encoded ~3x as many), then
    widens by doubling steps and bisects (subword tokenizers may merge across fillers). base /
    answer_len: _n_tokens with 0 fillers / the answer's token count, when the caller has them."""
    if answer_len is None:
        answer_len = len(tokenizer.encode(" " + str(passkey)))
    fits = lambda n: _n_tokens(tokenizer, passkey, n, depth, answer_len) <= length  # noqa: E731
    per_filler = max(1, len(tokenizer.encode(" " + FILLER)))
    if base is None:
        base = _n_tokens(tokenizer, passkey, 0, depth, answer_len)
    guess = max(0, (length - base) // per_filler)
    step = 1
    if fits(guess):  # lo fits, hi does not
        lo, hi = guess, guess + 1
        while fits(hi):
            lo, hi, step = hi, hi + 2 * step, 2 * step
    else:  # guess >= 1 here, as 0 fits
        lo, hi = guess - 1, guess
        while not fits(lo):
            lo, hi, step = max(0, lo - 2 * step), lo, 2 * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def passkey_sample(tokenizer, rng: np.random.Generator, length: int, depth: float) -> dict:
    """One passkey example filling at most `length` tokens (prompt + answer).

    Uses the largest filler count that fits. Returns
    {"prompt_ids": int64 (Lp,), "answer_ids": int64 (La,) = tokens of " {passkey}",
     "passkey": int, "depth": float}, with Lp + La <= length.
    """
    depth = _check_depth(depth)
    passkey = _draw_passkey(rng)
    answer_ids = np.asarray(tokenizer.encode(" " + str(passkey)), dtype=np.int64)
    need = _n_tokens(tokenizer, passkey, 0, depth, answer_ids.size)
    if need > length:
        raise ValueError(f"length={length} cannot hold a passkey prompt even with zero fillers "
                         f"({need} tokens needed): use length >= {need}")
    n_filler = _max_fillers(tokenizer, passkey, length, depth, need, answer_ids.size)
    prompt = build_prompt(passkey, n_filler, depth)
    return {
        "prompt_ids": np.asarray(tokenizer.encode(prompt), dtype=np.int64),
        "answer_ids": answer_ids,
        "passkey": passkey,
        "depth": depth,
    }


def first_integer(text: str) -> Optional[int]:
    """The first run of digits in `text` as an int (the paper's scorer), or None if none."""
    match = _INT_RE.search(text)
    return int(match.group()) if match else None
