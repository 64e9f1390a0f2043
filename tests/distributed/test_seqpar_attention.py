"""Sequence-parallel softmax attention (Ulysses, zigzag ring, 2-D hybrid) on P gloo processes
against one float64 process: forward and every gradient, causal and not, grouped-query heads,
packed documents, lengths the layout does not divide; bytes moved against each formula."""
import math

import pytest
import torch
import torch.distributed as dist

from mp import run_world

from longctx.kernels.flash import flash_attn
from longctx.parallel.comm import COMM
from longctx.parallel.groups import build_mesh
from longctx.parallel.sharding import gather, local_index, padded_length, shard
from longctx.parallel.ulysses import sp_attention

B, D = 2, 8


def heads(P):
    """(H, Hkv): KV heads split at P=2, replicated at P=3 and 4, GQA everywhere."""
    return {1: (2, 1), 2: (4, 2), 3: (6, 1), 4: (8, 2)}[P]


def strategies(P):
    """(name, ulysses degree, layout) for an SP degree P."""
    out = [("ulysses", P, "contiguous"), ("ring", 1, "zigzag"), ("ring-contiguous", 1, "contiguous")]
    if P == 4:
        out.append(("hybrid", 2, "zigzag"))
    return out


# (T, causal, document starts per row or None)
CASES = [(24, True, None), (37, True, [[5, 20], [11]]), (29, True, None), (24, False, [[0, 9], [3, 23]])]


def inputs(T, docs, P, seed):
    H, Hkv = heads(P)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) for _ in range(2))
    go = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    doc = None
    if docs:
        s = torch.zeros(B, T, dtype=torch.long)
        for b, ps in enumerate(docs):
            for p in ps:
                s[b, p] = 1
        doc = s.cumsum(1)
    return q, k, v, go, doc


def textbook(q, k, v, causal, doc):
    """softmax(q k^T / sqrt(d) + mask) v written out, with GQA by repeating K/V."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T = q.shape[2]
    allow = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allow = allow.tril()
    allow = allow[None, None].expand(q.shape[0], 1, T, T)
    if doc is not None:
        allow = allow & (doc[:, None, :, None] == doc[:, None, None, :])
    return torch.softmax(s.masked_fill(~allow, -math.inf), -1) @ v


def worker(rank, world):
    results = {}
    for name, U, layout in strategies(world):
        mesh = build_mesh(world, U)
        sp = mesh.sp_handle(layout)
        for i, (T, causal, docs) in enumerate(CASES):
            q, k, v, go, doc = inputs(T, docs, world, i)
            if not causal and doc is None and padded_length(T, world, layout) != T:
                continue  # non-causal attention needs document ids to keep padding out
            pos = torch.arange(T)
            sh = lambda x, pad=0.0: shard(x, world, rank, layout, U, dim=2, pad_value=pad)
            ql, kl, vl = (sh(x).clone().requires_grad_() for x in (q, k, v))
            idx = torch.from_numpy(local_index(T, world, rank, layout, U))
            pl = idx  # positions continue past T on padding
            dl = None if doc is None else torch.where(idx < T, doc.index_select(1, idx.clamp_max(T - 1)),
                                                      doc[:, -1:] + 1)
            COMM.reset()
            if sp is None:
                o = flash_attn(ql, kl, vl, causal, doc_ids=dl, q_pos=pl, k_pos=pl)[0]
            else:
                o = sp_attention(ql, kl, vl, sp, pl, dl, causal=causal)
            fwd_bytes = dict(COMM.bytes)
            COMM.reset()
            grads = torch.autograd.grad((o * sh(go)).sum(), (ql, kl, vl))
            bwd_bytes = dict(COMM.bytes)
            group = sp.group if sp is not None else None
            full = [gather(x.detach(), T, group, world, layout, U, dim=2) for x in (o,) + grads]
            results[(name, i)] = (full, fwd_bytes, bwd_bytes, (ql.shape, kl.shape, None if dl is None else dl.shape))
    return results


def expected_bytes(name, U, P, qs, ks, ds, el=8):
    """Bytes each rank receives, forward and backward, by the strategies' formulas."""
    n = lambda s: math.prod(s)
    B_, H, L, Dq = qs
    Hkv = ks[1]
    R = P // U
    fwd, bwd = {}, {}
    if U > 1:
        kv_heads = Hkv if Hkv % U == 0 else U  # replicated to one KV head per rank
        fwd["ulysses"] = (U - 1) * el * (n(qs) + 2 * B_ * kv_heads * L * Dq + n(qs)) // U  # q, k, v in; o back
        bwd["ulysses_grad"] = fwd["ulysses"]
        fwd["ulysses_meta"] = (U - 1) * 8 * (L + (0 if ds is None else n(ds)))
    if R > 1:
        Lr = L * U  # the sequence a ring step carries (after the Ulysses gather)
        kvh = Hkv if U == 1 else (Hkv // U if Hkv % U == 0 else 1)
        blk = 2 * B_ * kvh * Lr * Dq * el + Lr * 8 + (0 if ds is None else B_ * Lr * 8)
        fwd["ring_kv"] = (R - 1) * blk
        bwd["ring_kv_grad"] = (R - 1) * blk
        bwd["ring_dkv"] = R * 2 * B_ * kvh * Lr * Dq * el
    return fwd, bwd


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_seqpar_attention_exact(world):
    res = run_world(world, worker)
    for name, U, layout in strategies(world):
        for i, (T, causal, docs) in enumerate(CASES):
            if (name, i) not in res[0]:
                continue
            q, k, v, go, doc = inputs(T, docs, world, i)
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            o = textbook(q, k, v, causal, doc)
            ref = [o.detach()] + list(torch.autograd.grad((o * go).sum(), (q, k, v)))
            for r in range(world):
                full, fwd_b, bwd_b, shapes = res[r][(name, i)]
                for what, a, b in zip(("out", "dq", "dk", "dv"), full, ref):
                    err = float((a - b).abs().max())
                    assert err < 1e-10, f"{name} P={world} case {i} rank {r}: {what} differs by {err}"
                if world > 1:
                    qs, ks, ds = shapes
                    fwd, bwd = expected_bytes(name, U, world, tuple(qs), tuple(ks), ds and tuple(ds))
                    assert fwd_b == fwd, f"{name} P={world} case {i}: forward bytes {fwd_b} != formula {fwd}"
                    assert bwd_b == bwd, f"{name} P={world} case {i}: backward bytes {bwd_b} != formula {bwd}"
