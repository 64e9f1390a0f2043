"""Rotary position embedding, driven by global position ids so that sequence shards agree.

Convention: the "rotate half" layout of Hugging Face LLaMA (first half of the head dim pairs
with the second half), so imported weights need no permutation. Scaling methods (PI, dynamic
NTK, YaRN, llama3) change the inverse frequencies and, for YaRN, scale cos/sin: `rope_params`.
"""
from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies theta^(-2i/d), in fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)).float()


def rope_cos_sin(positions_BL: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B, 1, L, head_dim) for the given global positions.

    Angles are formed in fp32 from integer positions (exact up to 2^24 tokens) so that a
    sharded sequence gets exactly the angles of the unsharded one.
    """
    ang = positions_BL.to(torch.float32)[..., None] * inv_freq.to(positions_BL.device)  # (B, L, D/2)
    emb = torch.cat([ang, ang], dim=-1)[:, None]  # (B, 1, L, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@torch.no_grad()
def apply_rope_nograd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope's result (up to rounding: one rounding per element where apply_rope has three,
    so 1 ulp apart in bf16) in three passes over x (no rotate-half copy, no negation pass), for
    inference: [x1 cos1 - x2 sin1, x2 cos2 + x1 sin2] with x1, x2 the halves of the head dim."""
    h = x.shape[-1] // 2
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1.0)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x_BHLD * cos + _rotate_half(x_BHLD) * sin


# -- context extension: scaled inverse frequencies ----------------------------------------------
# Each method maps (head_dim, theta, scaling parameters) to (inverse frequencies (head_dim/2,),
# attention factor). The attention factor multiplies cos and sin (so q.k scales by its square),
# as Hugging Face does for YaRN. Parameter names mirror transformers' `rope_scaling` /
# `rope_parameters` dict so configs translate key for key. All arithmetic is float64, rounded
# to fp32 at the end: transformers computes in fp32, and the two agree to ~1e-7.

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _base_inv_freq64(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _linear(head_dim, theta, s, seq_len):
    """Position interpolation (PI): positions / factor, i.e. every frequency / factor."""
    return _base_inv_freq64(head_dim, theta) / s["factor"], 1.0


def _dynamic(head_dim, theta, s, seq_len):
    """Dynamic NTK: the base is raised for the current length L (never below the trained one):
    theta' = theta * (factor * L / L0 - (factor - 1)) ** (d / (d - 2)), L0 the trained length.
    At L <= L0 this is plain RoPE."""
    L0 = s["original_max_position_embeddings"]
    L = max(int(seq_len or L0), L0)
    if L == L0:  # bit-identical to plain RoPE (the formula gives theta, rounded differently)
        return rope_inv_freq(head_dim, theta), 1.0
    base = theta * ((s["factor"] * L / L0) - (s["factor"] - 1)) ** (head_dim / (head_dim - 2))
    return _base_inv_freq64(head_dim, base), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim, theta, s, seq_len):
    """YaRN: per-dimension ramp between interpolation (long wavelengths, / factor) and
    extrapolation (short wavelengths, unchanged), the ramp set by how many rotations a dimension
    makes over the trained length (beta_fast .. beta_slow); attention temperature
    0.1 ln(factor) + 1 unless attention_factor is given."""
    factor, L0 = s["factor"], s["original_max_position_embeddings"]
    att = s.get("attention_factor")
    if att is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        att = _yarn_mscale(factor, m) / _yarn_mscale(factor, m_all) if (m and m_all) else _yarn_mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32.0, s.get("beta_slow") or 1.0

    def corr_dim(rot: float) -> float:  # the dimension that makes `rot` rotations over L0
        return head_dim * math.log(L0 / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extra = 1 - ramp  # 1: keep the frequency (extrapolate), 0: divide by factor (interpolate)
    base = _base_inv_freq64(head_dim, theta)
    return base / factor * (1 - extra) + base * extra, float(att)


def _llama3(head_dim, theta, s, seq_len):
    """llama3 (Llama 3.1): wavelengths above L0/low_freq_factor are divided by factor, those
    below L0/high_freq_factor kept, and the band between interpolated smoothly."""
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    L0 = s["original_max_position_embeddings"]
    inv = _base_inv_freq64(head_dim, theta)
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > L0 / lo, inv / factor, inv)
    smooth = (L0 / wavelen - lo) / (hi - lo)
    mid = (wavelen >= L0 / hi) & (wavelen <= L0 / lo)
    return torch.where(mid, (1 - smooth) * out / factor + smooth * out, out), 1.0


_METHODS = {"linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3}


def rope_params(head_dim: int, theta: float, scaling=None, seq_len=None, device=None):
    """(inverse frequencies (head_dim/2,) fp32, attention factor) for RoPE with optional scaling.

    scaling: None or a mapping with `rope_type` in ROPE_TYPES and that method's parameters.
    seq_len: the current sequence length (max position + 1), read only by `dynamic`.
    """
    kind = "default" if scaling is None else scaling.get("rope_type", "default")
    if kind == "default":
        return rope_inv_freq(head_dim, theta, device), 1.0
    if kind not in _METHODS:
        raise ValueError(f"rope_type={kind!r} is not supported: use one of {', '.join(ROPE_TYPES)}")
    inv, att = _METHODS[kind](head_dim, float(theta), scaling, seq_len)
    return inv.float().to(device), att


def scaling_key(model_cfg) -> tuple:
    """A hashable form of model_cfg.rope_scaling (config node or dict); () for plain RoPE.
    original_max_position_embeddings left null becomes max_seq_len / factor (the trained length
    when max_seq_len is the extended one)."""
    scaling = getattr(model_cfg, "rope_scaling", None)
    if scaling is None or scaling.get("rope_type", "default") == "default":
        return ()
    s = {k: v for k, v in dict(scaling).items() if v is not None}
    if "original_max_position_embeddings" not in s:
        s["original_max_position_embeddings"] = max(1, int(model_cfg.max_seq_len / max(s.get("factor", 1.0), 1.0)))
    return tuple(sorted(s.items()))
