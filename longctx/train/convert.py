"""Model conversions for context extension (`longctx extend --method landmark | hybrid`).

Both take a DecoderLM and its model config (a dict of model.* keys) and return a new model and
config; the source is left as it was.

landmark: every attention layer becomes landmark attention (LandmarkAttention subclasses
    SoftmaxAttention: the same q/k/v/o weights, copied as they are). The tokenizer reserves a
    landmark id (the byte tokenizer 258; a Hugging Face tokenizer its size, one past its last
    token): the vocabulary grows to hold it when it is not already inside, and its embedding
    row (and the untied head's row) is set to the mean of the rows of the tokenizer's tokens
    (ids 0 .. landmark_id - 1), as the landmark paper does.
hybrid: the chosen softmax layers become lightning attention. q_proj and o_proj are copied;
    k_proj and v_proj (n_kv_heads heads under grouped-query attention) are repeated per query
    head, as the softmax layer shares them; q/k/v biases are copied. Lightning's extras: the
    output gate g_proj starts at zero (sigmoid 1/2 on every channel, no token preferred) and
    the output RMSNorm's weight at 2 (so the gate starts as the identity); the per-head decay
    is a fixed buffer (TransNormerLLM's slopes for the layer's depth). The layer then learns to
    match the softmax layer's outputs (attention transfer: train/transfer.py) before the LM
    fine-tune.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from longctx.model.mixers import layer_mixers
from longctx.model.transformer import DecoderLM


def _build(mcfg: Dict[str, Any]) -> Tuple[DecoderLM, Dict[str, Any]]:
    from omegaconf import OmegaConf
    from longctx.model.hf import _validated_model_cfg
    node = _validated_model_cfg(mcfg)
    return DecoderLM(node), OmegaConf.to_container(node, resolve=True)


def _copy_matching(dst: DecoderLM, src: DecoderLM, skip=lambda name: False) -> None:
    """Copy every tensor of src's state dict into dst's tensor of the same name and shape."""
    sd, out = src.state_dict(), dst.state_dict()
    with torch.no_grad():
        for name, t in out.items():
            if skip(name):
                continue
            if name not in sd or sd[name].shape != t.shape:
                raise ValueError(f"conversion: tensor {name} {tuple(t.shape)} has no counterpart in the source model "
                                 f"({tuple(sd[name].shape) if name in sd else 'missing'})")
            t.copy_(sd[name])


def _check_softmax_source(mcfg: Dict[str, Any], what: str) -> List[str]:
    mixers = layer_mixers(list(mcfg["mixers"]), mcfg["n_layers"])
    bad = sorted(set(mixers) - {"softmax"})
    if bad:
        raise ValueError(f"{what} conversion starts from a softmax-attention model; the source has "
                         f"{', '.join(bad)} layers (model.mixers={mixers})")
    return mixers


# -- landmark ----------------------------------------------------------------------------------
def landmark_model_config(mcfg: Dict[str, Any], landmark_id: int, block: int) -> Dict[str, Any]:
    """The landmark model's model.* keys (checked): vocabulary grown to hold landmark_id."""
    _check_softmax_source(mcfg, "landmark")
    V = int(mcfg["vocab_size"])
    if block < 1:
        raise ValueError(f"--landmark-block {block}: use >= 1 regular tokens per landmark (the paper uses 50, "
                         f"64 is common)")
    if not 1 <= landmark_id <= V:
        raise ValueError(f"the tokenizer's landmark_id={landmark_id} does not fit the model's vocabulary of {V}: "
                         f"it must be inside it (a reserved id) or exactly {V} (the vocabulary grows by one); is "
                         f"the tokenizer the model's?")
    return {**mcfg, "vocab_size": max(V, landmark_id + 1), "mixers": ["landmark"], "landmark_block": int(block)}


def to_landmark(model: DecoderLM, mcfg: Dict[str, Any], landmark_id: int,
                block: int) -> Tuple[DecoderLM, Dict[str, Any]]:
    """(landmark model, its model config): landmark attention in every layer, block regular
    tokens per landmark, the landmark token's embedding (and untied head row) the mean of the
    tokenizer's rows 0 .. landmark_id - 1."""
    V = int(mcfg["vocab_size"])
    new, cfg = _build(landmark_model_config(mcfg, landmark_id, block))
    vocab_rows = ("embed.weight", "head.weight")
    _copy_matching(new, model, skip=lambda n: n in vocab_rows)
    out, sd = new.state_dict(), model.state_dict()
    with torch.no_grad():
        for name in vocab_rows:
            if name not in out:
                continue  # tied head
            src, dst = sd[name], out[name]
            dst[:V].copy_(src)
            dst[landmark_id].copy_(src[:landmark_id].double().mean(0).to(dst.dtype))
    return new.eval(), cfg


# -- hybrid ------------------------------------------------------------------------------------
def hybrid_layers(n_layers: int, layers: Union[None, str, Sequence[int]] = None,
                  ratio: Optional[float] = None) -> List[int]:
    """The layers that become lightning attention: an explicit list ("0,2" or [0, 2]), or a
    ratio in (0, 1] of the layers, spread so that the softmax layers that stay are evenly
    spaced and the last layer is one of them (ratio 0.75 over 4 layers: 0, 1, 2)."""
    if layers is not None and ratio is not None:
        raise ValueError(f"--hybrid-layers {layers!r} and --hybrid-ratio {ratio!r}: give one of them")
    if layers is not None:
        if isinstance(layers, str):
            try:
                idx = [int(x) for x in layers.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"--hybrid-layers {layers!r}: give layer indices such as 0,2 (0 .. "
                                 f"{n_layers - 1})") from None
        else:
            idx = [int(x) for x in layers]
        bad = [i for i in idx if not 0 <= i < n_layers]
        if not idx or bad or len(set(idx)) != len(idx):
            raise ValueError(f"--hybrid-layers {layers!r}: need distinct layer indices in 0 .. {n_layers - 1} "
                             f"(the model has {n_layers} layers)" + (f"; out of range: {bad}" if bad else ""))
        return sorted(idx)
    r = 0.75 if ratio is None else float(ratio)
    n_lin = math.floor(r * n_layers + 1e-9)
    if not 0 < r <= 1 or n_lin < 1:
        raise ValueError(f"--hybrid-ratio {ratio}: need a ratio in (0, 1] that converts at least one of the "
                         f"{n_layers} layers (>= {1 / n_layers:.3g})")
    n_soft = n_layers - n_lin
    soft = {n_layers - 1 - (j * n_layers) // n_soft for j in range(n_soft)}
    return [i for i in range(n_layers) if i not in soft]


def init_lightning_from_softmax(lin, soft) -> None:
    """Fill a LightningAttention from a SoftmaxAttention of the same layer (see the module
    docstring): q, o copied, k, v repeated per query head, biases copied, gate 0, norm 2."""
    H, Hkv, D = soft.n_heads, soft.n_kv_heads, soft.head_dim
    if lin.n_heads != H or lin.head_dim != D:
        raise ValueError(f"lightning layer ({lin.n_heads} heads x {lin.head_dim}) and softmax layer ({H} x {D}) differ")
    rep = H // Hkv
    with torch.no_grad():
        lin.q_proj.weight.copy_(soft.q_proj.weight)
        lin.o_proj.weight.copy_(soft.o_proj.weight)
        for name in ("k_proj", "v_proj"):
            s, t = getattr(soft, name), getattr(lin, name)
            t.weight.copy_(s.weight.view(Hkv, D, -1).repeat_interleave(rep, 0).reshape(H * D, -1))
            if s.bias is not None:
                t.bias.copy_(s.bias.view(Hkv, D).repeat_interleave(rep, 0).reshape(-1))
        if soft.q_proj.bias is not None:
            lin.q_proj.bias.copy_(soft.q_proj.bias)
        lin.g_proj.weight.zero_()
        lin.norm.weight.fill_(2.0)


def hybrid_model_config(mcfg: Dict[str, Any], layers: Sequence[int]) -> Dict[str, Any]:
    """The hybrid model's model.* keys: model.mixers one name per layer, lightning at `layers`."""
    mixers = _check_softmax_source(mcfg, "hybrid")
    layers = hybrid_layers(len(mixers), list(layers))
    return {**mcfg, "mixers": ["lightning" if i in layers else m for i, m in enumerate(mixers)]}


def to_hybrid(model: DecoderLM, mcfg: Dict[str, Any], layers: Sequence[int]) -> Tuple[DecoderLM, Dict[str, Any]]:
    """(hybrid model, its model config): the given layers lightning attention initialised from
    their softmax weights, every other tensor copied."""
    layers = hybrid_layers(mcfg["n_layers"], list(layers))
    new, cfg = _build(hybrid_model_config(mcfg, layers))
    prefixes = tuple(f"layers.{i}.mixer." for i in layers)
    _copy_matching(new, model, skip=lambda n: n.startswith(prefixes))
    for i in layers:
        init_lightning_from_softmax(new.layers[i].mixer, model.layers[i].mixer)
    return new.eval(), cfg
