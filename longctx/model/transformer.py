"""Decoder language model: embedding -> N blocks -> RMSNorm -> head.

A block is `x + mixer(norm(x), ctx)` then `x + mlp(norm(x))`; the mixer of each layer comes
from the registry (model/mixers.py) by a repeating pattern, so new mixers need no change here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from longctx.kernels.linear_ce import linear_cross_entropy
from longctx.model.layers import RMSNorm, SwiGLU, llama_ffn_hidden
from longctx.model.mixers import build_mixer, layer_mixers
from longctx.model.rope import rope_cos_sin, rope_params


@dataclass
class SeqContext:
    """What a mixer needs to stay correct under sharding and streaming.

    positions: (B, L) global position ids of this rank's tokens.
    doc_ids:   (B, L) document index per token, or None (one document / no masking).
    sp:        sequence-parallel handle (group, rank, size, layout) or None.
    state:     carried per-layer state for streaming (memory weights, recurrent state, caches).
    carry:     when True, mixers start from `state` (if they find theirs) and leave their final
               state there, so consecutive segments of a row behave as one long sequence.
    """
    positions: torch.Tensor
    doc_ids: Optional[torch.Tensor] = None
    sp: Any = None
    state: Dict[str, Any] = field(default_factory=dict)
    carry: bool = False
    _cache: Dict[Any, Any] = field(default_factory=dict, repr=False)

    def rope(self, head_dim: int, theta: float, dtype: torch.dtype, scaling: tuple = ()):
        """cos, sin (B, 1, L, head_dim), computed once per step and shared by all layers.

        scaling: `rope.scaling_key(cfg.rope_scaling)` (hashable); () is plain RoPE. YaRN's
        attention factor multiplies cos and sin. Dynamic NTK reads the current length as the
        largest position + 1 over the whole sequence (all SP ranks), as transformers does
        from the position ids of one forward."""
        key = ("rope", head_dim, float(theta), dtype, scaling)
        if key not in self._cache:
            s = dict(scaling) if scaling else None
            seq_len = self._global_len() if s and s.get("rope_type") == "dynamic" else None
            inv, att = rope_params(head_dim, theta, s, seq_len, device=self.positions.device)
            cos, sin = rope_cos_sin(self.positions, inv, torch.float32)
            self._cache[key] = ((cos * att).to(dtype), (sin * att).to(dtype))
        return self._cache[key]

    def _global_len(self) -> int:
        """Largest global position + 1 of this step (a MAX all-reduce under sequence parallelism)."""
        top = self.positions.max().reshape(1).to(torch.int64)
        if self.sp is not None and self.sp.size > 1:
            import torch.distributed as dist
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.sp.group)
        return int(top.item()) + 1

    def sp_meta(self):
        """(positions (L,), doc ids (B, L) or None, gathered meta) for sequence-parallel
        attention: computed once per step and shared by all layers."""
        if "sp_meta" not in self._cache:
            from longctx.parallel.sharding import check_positions_shared
            from longctx.parallel.ulysses import gather_meta
            pos = check_positions_shared(self.positions)
            self._cache["sp_meta"] = (pos, self.doc_ids, gather_meta(self.sp, pos, self.doc_ids))
        return self._cache["sp_meta"]

    def causal_doc_mask(self) -> Optional[torch.Tensor]:
        """(B, 1, L, L) boolean mask, True where attention is allowed: causal and same document."""
        if self.doc_ids is None:
            return None
        if "docmask" not in self._cache:
            d = self.doc_ids
            L = d.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=d.device).tril()
            self._cache["docmask"] = (causal & (d[:, :, None] == d[:, None, :]))[:, None]
        return self._cache["docmask"]


class SegmentState(dict):
    """ctx.state for one segment of a carried stream (train.carry_state): reads see the state the
    segment starts from, writes collect the state it ends in, in `after`. A block that activation
    checkpointing runs again in backward then starts from the same state as its forward did (with
    a plain dict it would read the state its own forward left). Mixers use only get, [] and []=."""

    def __init__(self, before: Dict[str, Any]):
        super().__init__(before)
        self.after: Dict[str, Any] = {}

    def __setitem__(self, key, value) -> None:
        self.after[key] = value


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int, mixer: str):
        super().__init__()
        self.mixer_name = mixer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(mixer, cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden or llama_ffn_hidden(cfg.d_model),
                          tile=getattr(cfg, "mlp_tile", 0))
        # a mixer that recomputes itself piece by piece (the Titans memory with
        # model.memory.recompute) is not checkpointed again as a whole block
        self.checkpointed = not getattr(self.mixer, "recomputes_itself", False)

    def forward(self, x_BLD: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        return self.mlp_half(self.mixer_half(x_BLD, ctx))

    def mixer_half(self, x_BLD: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        return x_BLD + self.mixer(self.attn_norm(x_BLD), ctx)

    def mlp_half(self, x_BLD: torch.Tensor) -> torch.Tensor:
        return x_BLD + self.mlp(self.mlp_norm(x_BLD))


class DecoderLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        names = layer_mixers(list(cfg.mixers), cfg.n_layers)
        self.layers = nn.ModuleList(Block(cfg, i, n) for i, n in enumerate(names))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.activation_checkpointing = bool(cfg.activation_checkpointing)
        self.offload_activations = bool(getattr(cfg, "offload_activations", False))
        self.loss_chunk = int(getattr(cfg, "loss_chunk", 0))
        self.recompute_mlp = bool(getattr(cfg, "recompute_mlp", True))
        self.reset_parameters(cfg.init_std, cfg.n_layers)

    def reset_parameters(self, std: float, n_layers: int) -> None:
        """Normal(0, std) everywhere; output projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
            nn.init.normal_(p, 0.0, s)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def hidden(self, input_ids_BL: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
        """Final-norm hidden states (B, L, D)."""
        x = self.embed(input_ids_BL)
        for layer in self.layers:
            if self.activation_checkpointing and layer.checkpointed and self.training and torch.is_grad_enabled():
                if self.offload_activations:  # the checkpoint keeps x_host, not x
                    x = checkpoint(_run_onloaded, layer, offload_to_host(x), ctx, x.device, use_reentrant=False)
                elif not self.recompute_mlp:  # only the mixer half is recomputed (model.recompute_mlp)
                    x = layer.mlp_half(checkpoint(layer.mixer_half, x, ctx, use_reentrant=False))
                else:
                    x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        return self.norm(x)

    def forward(self, input_ids_BL: torch.Tensor, ctx: Optional[SeqContext] = None,
                labels_BL: Optional[torch.Tensor] = None):
        """Logits (B, L, V) without labels; with labels, (sum of token cross-entropies, number
        of target tokens), labels -100 ignored. With model.loss_chunk > 0 the loss goes through
        the fused chunked head + cross-entropy (kernels/linear_ce.py): no (B, L, V) logits.

        The sum and the count (not the mean) let the trainer form the exact global mean over
        data- and sequence-parallel ranks and micro-batches. Training goes through forward (not
        another method) so that ZeRO-3's parameter-gathering hooks see every use."""
        if ctx is None:
            ctx = default_context(input_ids_BL)
        h = self.hidden(input_ids_BL, ctx)
        if labels_BL is not None and self.loss_chunk:
            return linear_cross_entropy(h, self.head_weight, labels_BL, self.loss_chunk, ignore_index=-100)
        logits = F.linear(h, self.head_weight)
        if labels_BL is None:
            return logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: fp32 loss
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels_BL.reshape(-1),
                               ignore_index=-100, reduction="sum")
        return loss, (labels_BL != -100).sum()


class _ToHost(torch.autograd.Function):
    """x -> a host copy (pinned, asynchronous on CUDA); the gradient goes back to x's device.
    On a CPU tensor the "copy" is x itself (a view), so the CPU runs the same code path."""

    @staticmethod
    def forward(ctx, x):
        ctx.device = x.device
        if x.device.type == "cpu":
            return x.view_as(x)
        out = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=torch.cuda.is_available())
        return out.copy_(x, non_blocking=True)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.device, non_blocking=True)


def offload_to_host(x: torch.Tensor) -> torch.Tensor:
    """Differentiable copy of x in host memory (x itself, as a view, when x is on the CPU)."""
    return _ToHost.apply(x)


def _run_onloaded(layer: nn.Module, x_host: torch.Tensor, ctx: SeqContext, device: torch.device) -> torch.Tensor:
    """A block on its input brought back from host memory: what an offloaded checkpoint runs
    (and reruns in backward), so only x_host stays referenced between forward and backward."""
    return layer(x_host.to(device, non_blocking=True), ctx)


def default_context(input_ids_BL: torch.Tensor) -> SeqContext:
    B, L = input_ids_BL.shape
    pos = torch.arange(L, device=input_ids_BL.device).expand(B, L)
    return SeqContext(positions=pos)


def count_params(model: nn.Module) -> Dict[str, int]:
    """Parameter counts: total, embedding, and the matmul parameters that drive FLOPs."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel()
    head = 0 if model.head is None else model.head.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if p.dim() < 2)
    matmul = total - emb - head - norms + model.embed.weight.numel()  # the head matmul always runs
    return {"total": total, "embedding": emb, "matmul": matmul}


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM-style accounting:
    6 x matmul parameters, plus each mixer's sequence-mixing matmuls. A mixer class may define
    `mixer_fwd_flops(cfg, seq_len) -> (projection params, forward mixing FLOPs per token)`;
    the default is softmax attention: q, k, v, o projections and causal QK^T and AV (2*T*d each
    over all heads, halved by causality)."""
    from longctx.model.mixers import MIXERS
    d = cfg.d_model
    ffn = cfg.ffn_hidden or llama_ffn_hidden(d)
    matmul, mix_fwd = d * cfg.vocab_size, 0.0
    for name in layer_mixers(list(cfg.mixers), cfg.n_layers):
        f = getattr(MIXERS[name], "mixer_fwd_flops", None) or softmax_fwd_flops
        params, fwd = f(cfg, seq_len)
        matmul += params + 3 * d * ffn
        mix_fwd += fwd
    return 6.0 * matmul + 3.0 * mix_fwd


def softmax_fwd_flops(cfg, seq_len: int):
    d = cfg.d_model
    kv = (cfg.n_kv_heads or cfg.n_heads) * (d // cfg.n_heads)
    return 2 * d * d + 2 * d * kv, (2 * seq_len * d + 2 * seq_len * d) * 0.5
