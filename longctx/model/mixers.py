"""Registry of sequence mixers. A mixer is an nn.Module built as `cls(cfg, layer_idx)` with
`forward(x_BLD, ctx) -> y_BLD`. New mixers register here by name and need no change to the
block code; the model config picks one per layer with a repeating pattern.
"""
from __future__ import annotations

from typing import Callable, Dict, List

MIXERS: Dict[str, Callable] = {}


def register_mixer(name: str):
    def deco(cls):
        if name in MIXERS and MIXERS[name] is not cls:
            raise ValueError(f"mixer '{name}' is already registered by {MIXERS[name].__module__}")
        MIXERS[name] = cls
        return cls
    return deco


def layer_mixers(pattern: List[str], n_layers: int) -> List[str]:
    """Expand a repeating pattern to one mixer name per layer: [a, b] over 5 layers -> a b a b a."""
    return [pattern[i % len(pattern)] for i in range(n_layers)]


def build_mixer(name: str, cfg, layer_idx: int):
    if name not in MIXERS:
        raise ValueError(f"unknown mixer '{name}'; registered: {', '.join(sorted(MIXERS))}")
    return MIXERS[name](cfg, layer_idx)


# Importing the modules registers their mixers.
from longctx.model import lightning as _lightning  # noqa: E402,F401
from longctx.model import softmax as _softmax  # noqa: E402,F401
from longctx.model import landmark as _landmark  # noqa: E402,F401
from longctx.model import swa as _swa  # noqa: E402,F401
from longctx.memory import titans_mixers as _titans  # noqa: E402,F401


def sp_capable(name: str) -> bool:
    """Whether a mixer runs under sequence parallelism (class attribute `supports_sp`)."""
    return bool(getattr(MIXERS[name], "supports_sp", False))


def sp_layouts(name: str) -> tuple:
    """Sequence layouts a mixer accepts under SP (class attribute `sp_layouts`)."""
    return tuple(getattr(MIXERS[name], "sp_layouts", ("contiguous",)))


# The Titans mixers (memory/titans_mixers.py) leave "<mixer>.<layer>" state with ctx.carry but
# do not declare it with the class attribute yet.
_TITANS_CARRY = ("memory", "mag", "mal", "mac")


def carries_state(name: str) -> bool:
    """Whether a mixer leaves its state in ctx.state with ctx.carry (class attribute
    `carries_state`; the Titans mixers by name), so train.carry_state streams it."""
    return name in _TITANS_CARRY or bool(getattr(MIXERS[name], "carries_state", False))
