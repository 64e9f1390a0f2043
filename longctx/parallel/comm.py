"""Collectives over explicit process groups (the Ulysses all-to-all autograd-aware), with a
byte counter that tests assert on.

`COMM` counts what this process receives from others, per operation name: the quantity each
strategy's communication formula predicts (for an all-gather of n values from P ranks:
(P - 1) * n values)."""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch
import torch.distributed as dist


class CommCounter:
    def __init__(self) -> None:
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)
        # wall seconds spent inside our collectives and waits (transfer plus waiting for the
        # peer: a rank that waits for a slower one counts the wait here)
        self.seconds = 0.0

    def add(self, op: str, nbytes: int) -> None:
        self.bytes[op] += int(nbytes)
        self.calls[op] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()
        self.seconds = 0.0

    @contextmanager
    def timer(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0

    def total(self) -> int:
        return sum(self.bytes.values())


COMM = CommCounter()


def wait_all(reqs) -> None:
    """Wait for every request of a batch_isend_irecv (timed in COMM.seconds)."""
    with COMM.timer():
        for r in reqs:
            r.wait()


def all_gather(x: torch.Tensor, group: Optional[dist.ProcessGroup], op: str = "all_gather") -> torch.Tensor:
    """(P, *x.shape): every rank's x, stacked in rank order of `group`. Not autograd-aware:
    callers wrap it in their own autograd.Function with the backward their math needs."""
    P = dist.get_world_size(group)
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(P)]
    with COMM.timer():
        dist.all_gather(out, x, group=group)
    COMM.add(op, (P - 1) * x.numel() * x.element_size())
    return torch.stack(out)


def send_recv(send: Optional[torch.Tensor], dst: Optional[int], recv_like: Optional[torch.Tensor],
              src: Optional[int], group: Optional[dist.ProcessGroup], op: str = "p2p") -> Optional[torch.Tensor]:
    """Batched isend/irecv (global ranks): send `send` to dst and/or receive a tensor shaped like
    `recv_like` from src. Returns the received tensor (or None)."""
    ops: List[dist.P2POp] = []
    buf = None
    if send is not None and dst is not None:
        ops.append(dist.P2POp(dist.isend, send.contiguous(), dst, group=group))
    if recv_like is not None and src is not None:
        buf = torch.empty_like(recv_like)
        ops.append(dist.P2POp(dist.irecv, buf, src, group=group))
        COMM.add(op, buf.numel() * buf.element_size())
    if ops:
        wait_all(dist.batch_isend_irecv(ops))
    return buf


def all_to_all(x: torch.Tensor, group: Optional[dist.ProcessGroup], op: str = "all_to_all") -> torch.Tensor:
    """x: (P, ...) -> (P, ...): row j goes to rank j of `group`; row j of the result came from rank j.
    Not autograd-aware (its own inverse: see `SeqToHeads`)."""
    P = dist.get_world_size(group)
    x = x.contiguous()
    out = torch.empty_like(x)
    with COMM.timer():
        dist.all_to_all_single(out, x, group=group)
    COMM.add(op, (P - 1) * (x.numel() // P) * x.element_size())
    return out


def _seq_to_heads(x: torch.Tensor, group, op: str) -> torch.Tensor:
    """(B, H, L, D) with this rank's sequence piece -> (B, H/P, P*L, D) with its head group."""
    P = dist.get_world_size(group)
    B, H, L, D = x.shape
    y = all_to_all(x.view(B, P, H // P, L, D).transpose(0, 1), group, op)  # (P, B, H/P, L, D)
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * L, D)


def _heads_to_seq(x: torch.Tensor, group, op: str) -> torch.Tensor:
    """(B, h, P*L, D) -> (B, P*h, L, D): the inverse of `_seq_to_heads`."""
    P = dist.get_world_size(group)
    B, h, PL, D = x.shape
    y = all_to_all(x.view(B, h, P, PL // P, D).permute(2, 0, 1, 3, 4), group, op)  # (P, B, h, L, D)
    return y.transpose(0, 1).reshape(B, P * h, PL // P, D)


class SeqToHeads(torch.autograd.Function):
    """Ulysses' all-to-all: sequence shards -> head shards; the backward is the inverse."""

    @staticmethod
    def forward(ctx, x, group, op):
        ctx.group, ctx.op = group, op
        return _seq_to_heads(x, group, op)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group, ctx.op + "_grad"), None, None


class HeadsToSeq(torch.autograd.Function):
    """Ulysses' all-to-all back: head shards -> sequence shards; the backward is the inverse."""

    @staticmethod
    def forward(ctx, x, group, op):
        ctx.group, ctx.op = group, op
        return _heads_to_seq(x, group, op)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group, ctx.op + "_grad"), None, None


class Exchange:
    """Batched isend/irecv started now, finished by `wait()`, so communication overlaps the
    compute issued in between (ring attention). Sends `send` tensors to global rank dst and
    receives tensors shaped like `send` from global rank src."""

    def __init__(self, send: List[torch.Tensor], dst: int, src: int, group: Optional[dist.ProcessGroup],
                 op: str = "p2p") -> None:
        ops: List[dist.P2POp] = []
        self._send = [t.contiguous() for t in send]  # kept alive until the sends complete
        self.recv = [torch.empty_like(t) for t in self._send]
        for t in self._send:
            ops.append(dist.P2POp(dist.isend, t, dst, group=group))
        for b in self.recv:
            ops.append(dist.P2POp(dist.irecv, b, src, group=group))
            COMM.add(op, b.numel() * b.element_size())
        self._reqs = dist.batch_isend_irecv(ops)

    def wait(self) -> List[torch.Tensor]:
        wait_all(self._reqs)
        return self.recv
