"""Collectives over explicit process groups, with a byte counter that tests assert on.

`COMM` counts what this process receives from others, per operation name: the quantity each
strategy's communication formula predicts (for an all-gather of n values from P ranks:
(P - 1) * n values)."""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.distributed as dist


class CommCounter:
    def __init__(self) -> None:
        self.bytes: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    def add(self, op: str, nbytes: int) -> None:
        self.bytes[op] += int(nbytes)
        self.calls[op] += 1

    def reset(self) -> None:
        self.bytes.clear()
        self.calls.clear()

    def total(self) -> int:
        return sum(self.bytes.values())


COMM = CommCounter()


def all_gather(x: torch.Tensor, group: Optional[dist.ProcessGroup], op: str = "all_gather") -> torch.Tensor:
    """(P, *x.shape): every rank's x, stacked in rank order of `group`. Not autograd-aware:
    callers wrap it in their own autograd.Function with the backward their math needs."""
    P = dist.get_world_size(group)
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(P)]
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
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return buf
