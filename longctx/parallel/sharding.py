"""How a sequence is split over the ranks of a sequence-parallel group.

Two layouts, over a padded length Tp (a multiple of the layout's granularity):

- contiguous (granularity P): rank r holds [r * Tp/P, (r+1) * Tp/P). Needed by mixers whose
  state flows left to right across ranks (lightning attention, neural memory) and by Ulysses.
- zigzag (granularity 2P): the sequence is cut into 2R chunks for a ring of R groups; ring
  group i holds chunks i and 2R-1-i, so under a causal mask every ring step costs every rank
  the same work. Inside a ring group of U Ulysses ranks, each chunk is cut again into U
  pieces and Ulysses rank u holds piece u of both chunks (P = R * U; rank = i * U + u).

A length that is not a multiple of the granularity is padded at the end: pad tokens carry
label -100 (no loss), positions that continue past the end, and a document id of their own,
so under a causal mask no real token ever sees them (padding is masked, never mixed in).

A rank's local tokens are the concatenation of its pieces in order; every mixer gets their
global positions, so masks stay exact whatever the order.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")
Ranges = List[Tuple[int, int]]


def _check(T: int, P: int, rank: int, layout: str, ulysses: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
    if T < 1 or P < 1 or not 0 <= rank < P:
        raise ValueError(f"sharding T={T} over P={P} at rank {rank}: need T >= 1, P >= 1, 0 <= rank < P")
    if ulysses < 1 or P % ulysses:
        raise ValueError(f"ulysses={ulysses} must divide the SP degree P={P}")


def granularity(P: int, layout: str) -> int:
    """The padded length is a multiple of this."""
    return 2 * P if layout == "zigzag" and P > 1 else P


def padded_length(T: int, P: int, layout: str) -> int:
    g = granularity(P, layout)
    return -(-T // g) * g


def shard_ranges(T: int, P: int, rank: int, layout: str = "contiguous", ulysses: int = 1) -> Ranges:
    """[start, end) pieces of the padded sequence that `rank` holds, in local order. Pieces may
    reach past T (padding)."""
    _check(T, P, rank, layout, ulysses)
    Tp = padded_length(T, P, layout)
    if layout == "contiguous" or P == 1:
        n = Tp // P
        return [(rank * n, (rank + 1) * n)]
    R, U = P // ulysses, ulysses
    i, u = divmod(rank, U)
    c = Tp // (2 * R)  # chunk of a ring group
    p = c // U  # piece of a Ulysses rank
    return [(i * c + u * p, i * c + (u + 1) * p), ((2 * R - 1 - i) * c + u * p, (2 * R - 1 - i) * c + (u + 1) * p)]


def local_index(T: int, P: int, rank: int, layout: str = "contiguous", ulysses: int = 1) -> np.ndarray:
    """Global indices (int64, Tp/P) of rank's tokens in local order; values >= T are padding."""
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in shard_ranges(T, P, rank, layout, ulysses)])


def shard(x: torch.Tensor, P: int, rank: int, layout: str = "contiguous", ulysses: int = 1, dim: int = -1,
          pad_value=0) -> torch.Tensor:
    """This rank's piece of a full-length tensor along `dim` (padding filled with pad_value)."""
    T = x.shape[dim]
    idx = torch.from_numpy(local_index(T, P, rank, layout, ulysses)).to(x.device)
    real = idx < T
    out = x.index_select(dim, idx.clamp_max(T - 1))
    if not bool(real.all()):
        shape = [1] * x.dim()
        shape[dim] = idx.numel()
        out = out.masked_fill(~real.view(shape), pad_value)
    return out


def shard_batch(batch: dict, P: int, rank: int, layout: str = "contiguous", ulysses: int = 1) -> dict:
    """Shard a full-length batch of (B, T) tensors: input_ids, labels, positions, doc_ids.
    Padding: label -100, positions continue past T, document id = 1 + the row's last one."""
    T = batch["input_ids"].shape[1]
    idx = torch.from_numpy(local_index(T, P, rank, layout, ulysses))
    real = idx < T
    out = {}
    for key, x in batch.items():
        y = x.index_select(1, idx.clamp_max(T - 1))
        if key == "labels":
            y = y.masked_fill(~real, -100)
        elif key == "positions":
            y = torch.where(real, y, x[:, -1:] + 1 + idx - T)
        elif key == "doc_ids":
            y = torch.where(real, y, x[:, -1:] + 1)
        out[key] = y
    return out


def gather(x_local: torch.Tensor, T: int, group, P: int, layout: str = "contiguous", ulysses: int = 1,
           dim: int = -1) -> torch.Tensor:
    """Inverse of `shard`: every rank's piece all-gathered and put back in global order,
    padding dropped. Not autograd-aware (outputs, tests, evaluation)."""
    from longctx.parallel.comm import all_gather
    dim = dim % x_local.dim()
    parts = all_gather(x_local, group, op="gather_output") if P > 1 else x_local[None]
    Tp = padded_length(T, P, layout)
    shape = list(x_local.shape)
    shape[dim] = Tp
    full = x_local.new_empty(shape)
    for r in range(P):
        idx = torch.from_numpy(local_index(T, P, r, layout, ulysses)).to(x_local.device)
        full.index_copy_(dim, idx, parts[r])
    return full.narrow(dim, 0, T)


def check_positions_shared(positions_BL: torch.Tensor) -> torch.Tensor:
    """SP attention kernels take one position vector for the batch: the rows must agree."""
    if positions_BL.shape[0] > 1 and not bool((positions_BL == positions_BL[:1]).all()):
        raise ValueError("sequence-parallel attention needs the same positions in every row of a micro-batch")
    return positions_BL[0]


def world_ranks(group) -> Sequence[int]:
    """Global ranks of `group` in group order."""
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]
