"""Structured configuration: one schema (dataclasses), loaded from YAML, merged with
`key=value` overrides, validated at load time.

Every failure raises :class:`ConfigError` with one line naming the key, the value and the fix:
unknown keys suggest the nearest valid name, wrong types name the expected type, and
inconsistent values (heads vs kv heads, seq_len vs SP degree) say what would be valid.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem, phrased as one line: what is wrong and how to fix it."""


@dataclass
class MemoryConfig:
    """Titans neural memory (mixers memory, mac, mag, mal; see longctx/memory/titans.py)."""
    depth: int = 2              # 1: matrix memory; 2: MLP x + silu(x W1) W2
    chunk: int = 64             # tokens per mini-batch of the inner gradient step
    heads: Optional[int] = None  # memory heads; None means model.n_heads
    expansion: int = 2          # depth-2 hidden width = expansion * memory head dim
    # inner learning rate θ = max_lr * sigmoid(.). A chunk sums b gradients taken at the same
    # weights, and SiLU-then-l2 keys are correlated, so the step along their common direction is
    # about 2·b·θ·mean(k·k'): 0.05-0.1 already diverge at chunk 64 on random inputs. (titans-pytorch
    # averages the loss over the head dim, so its max_lr 1.0 is ~ our 1/d_h.)
    max_lr: float = 0.02
    max_state_norm: float = 1.0e4  # a memory weight/momentum norm above this is divergence
    conv: int = 4               # depthwise causal conv kernel on q, k, v
    window: int = 256           # sliding-window attention of mag / mal
    segment: int = 256          # mac segment length (a multiple of chunk; under SP it divides each shard)
    n_persistent: int = 4       # mac persistent memory tokens
    # Training: run the memory this many tokens at a time, each piece recomputed in backward
    # (memory linear in length with a small constant); 0: off. A memory layer that does this is
    # not also checkpointed as a whole block (model.activation_checkpointing skips it).
    recompute: int = 0
    # Sequence parallelism of `memory` layers: handoff = the memory state passes rank r -> r+1
    # (exact; ranks wait for each other: the scan runs one rank after another); ulysses = one
    # all-to-all gives each rank whole sequences for heads/sp memory heads, which it scans alone
    # (no waiting; needs memory heads divisible by parallel.sp). mag / mal / mac always hand off.
    sp_mode: str = "handoff"


@dataclass
class RopeScalingConfig:
    """RoPE context extension, keys as in transformers' `rope_scaling` (see model/rope.py).
    rope_type: default (plain RoPE; raise model.rope_theta for base/"ABF" scaling) | linear (PI)
    | dynamic (NTK, base raised for the current length) | yarn | llama3."""
    rope_type: str = "default"
    factor: float = 1.0
    # The length the model was trained at (L0); None means model.max_seq_len / factor.
    original_max_position_embeddings: Optional[int] = None
    low_freq_factor: float = 1.0      # llama3
    high_freq_factor: float = 4.0     # llama3
    beta_fast: float = 32.0           # yarn: ramp ends (rotations over L0)
    beta_slow: float = 1.0
    attention_factor: Optional[float] = None  # yarn: None means 0.1 ln(factor) + 1
    mscale: Optional[float] = None            # yarn (DeepSeek form), with mscale_all_dim
    mscale_all_dim: Optional[float] = None
    truncate: bool = True                     # yarn: round the ramp ends to whole dimensions


@dataclass
class ModelConfig:
    vocab_size: int = 320
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # None means n_heads (plain multi-head attention); fewer gives grouped-query attention.
    n_kv_heads: Optional[int] = None
    # None means the LLaMA rule: 8/3 * d_model rounded up to a multiple of 64.
    ffn_hidden: Optional[int] = None
    # Repeating per-layer pattern of mixer names (see longctx.model.mixers.MIXERS).
    mixers: List[str] = field(default_factory=lambda: ["softmax"])
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    max_seq_len: int = 4096
    # Mistral-style sliding-window attention is not implemented: an imported model's window is
    # kept here so that lengths beyond it are refused (up to it, full causal attention is exact).
    sliding_window: Optional[int] = None
    tie_embeddings: bool = False
    attn_bias: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    activation_checkpointing: bool = False
    # Memory-lean step (docs/training.md, "Memory-lean step"). loss_chunk: tokens per chunk of
    # the fused head + cross-entropy (kernels/linear_ce.py; logits never exist for the whole
    # sequence), 0 = plain logits. mlp_tile: tokens per tile of the SwiGLU, recomputed in
    # backward (the (L, ffn_hidden) intermediates exist for one tile), 0 = plain.
    # offload_activations: with activation_checkpointing, keep each block's input in host memory.
    loss_chunk: int = 0
    mlp_tile: int = 0
    offload_activations: bool = False
    # With activation_checkpointing and mlp_tile: false checkpoints only each block's mixer half,
    # so its MLP is not run again in the recomputation (its tiles recompute their own gate/up in
    # backward anyway): one MLP forward less per block and step, for two more values of d_model
    # per token and block kept (the MLP's input and its normalised copy).
    recompute_mlp: bool = True
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    # Landmark attention (mixer `landmark`): a landmark token follows every landmark_block
    # regular tokens; the data pipeline inserts them when a layer uses the mixer.
    landmark_block: int = 64
    # Sliding-window softmax attention (mixer `swa`): each token sees itself and the
    # swa_window - 1 tokens before it.
    swa_window: int = 256


@dataclass
class DataConfig:
    # tokens: a token file made by `longctx data prepare`; synthetic: the seeded demo corpus,
    # generated on first use; passkey: the landmark paper's passkey-retrieval task.
    kind: str = "synthetic"
    path: Optional[str] = None
    tokenizer: str = "byte"
    seq_len: int = 256
    micro_batch_size: int = 8
    seed: int = 1234
    # Block attention across packed document boundaries (doc ids reach every mixer).
    mask_documents: bool = False
    synthetic_tokens: int = 4_000_000
    cache_dir: Optional[str] = None
    # passkey: which tokens carry a loss. answer = only the key after the question (the task);
    # all = every prompt token too (filler, and the key sentence's second copy of the key, which
    # teaches copying at short range first: a small model learns the task much sooner).
    passkey_targets: str = "answer"
    # passkey: 0 = every prompt fills the window (the question always sits at the same
    # position); N > 0 = each sample's length drawn uniformly from N..the window's regular
    # tokens (seq_len less its landmarks; right-padded). A model trained at one length learns
    # copying tied to that length and fails at any other, including the short contexts
    # landmark retrieval builds.
    passkey_min_len: int = 0
    # tokens / synthetic: this share of the samples (drawn per sample from (seed, index)) are
    # passkey samples instead of LM windows (with passkey_targets), so that one model learns
    # both the corpus and the retrieval; 0: none.
    passkey_fraction: float = 0.0


@dataclass
class ParallelConfig:
    # Sequence-parallel degree; data-parallel degree is world_size / sp.
    sp: int = 1
    # Softmax attention under SP: sp = sp_ulysses x sp_ring. 0 = derive: Ulysses alone when
    # only sp is set, or sp / the other degree when one of them is set.
    sp_ulysses: int = 0
    sp_ring: int = 0
    # How the sequence is split: auto = zigzag when a ring is used and every mixer allows it,
    # contiguous otherwise (see parallel/sharding.py).
    layout: str = "auto"
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: int = 600


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 100
    # Stop (with a checkpoint) after this step though the LR schedule runs to `steps`: for
    # time-limited jobs that resume, and for testing that resume is exact.
    stop_after: Optional[int] = None
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    seed: int = 0
    # What a non-finite loss does: stop (name the step and the last good checkpoint) or skip.
    on_nonfinite: str = "stop"
    log_every: int = 1
    progress: bool = True
    plot: bool = True
    # Peak FLOP/s used for MFU; None measures a matmul rate at start-up.
    peak_flops: Optional[float] = None
    threads: Optional[int] = None
    # Before anything is allocated, the planner (train/planner.py) predicts the step's peak memory
    # per rank; a run that would not fit is refused with the numbers and settings that would.
    # memory_gib: what this machine (CPU: all its ranks together) or device may use; None = what
    # it has available now (MemAvailable, or the GPU's free memory).
    memory_check: bool = True
    memory_gib: Optional[float] = None
    # CPU: allocations of at least this many MiB get their own mappings, returned to the OS when
    # freed (kernels/cpu.py mmap_large); None keeps every allocation in the heap (fastest, but the
    # heap can reach 2-3x the live tensors of a long step).
    malloc_mmap_mib: Optional[float] = None
    # Truncated backpropagation through time (docs/training.md, "Streaming with carried memory
    # state"): each row streams consecutive data.seq_len segments of one region of the token stream
    # (data.StreamSampler), and the state the mixers leave (Titans memory weights and momentum,
    # conv and window tails, lightning's recurrent state) is carried, detached, into the next step
    # and saved in checkpoints, so a resumed run continues exactly.
    carry_state: bool = False


@dataclass
class CheckpointConfig:
    every: int = 50
    keep_last: int = 3
    save_final: bool = True
    # Check every file's SHA-256 against the manifest before resuming.
    verify: bool = True


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    # Escape hatch: raw DeepSpeed JSON keys merged last over the derived config.
    raw: Dict[str, Any] = field(default_factory=dict)


@dataclass
class InitConfig:
    # A Hugging Face model folder (config.json + safetensors): training starts from its weights
    # (model.* must describe the same shapes; `longctx.model.hf.model_config` derives them).
    from_hf: Optional[str] = None
    # A longctx run or checkpoint folder: training starts from its weights only (a new run:
    # fresh optimizer, step 0, new data settings; model.* may differ in settings without
    # weights, e.g. landmark_block or rope scaling). For a curriculum of stages.
    from_checkpoint: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)


CHOICES = {
    "data.kind": ("tokens", "synthetic", "passkey"),
    "data.passkey_targets": ("answer", "all"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "parallel.layout": ("auto", "contiguous", "zigzag"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.on_nonfinite": ("stop", "skip"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "model.rope_scaling.rope_type": ("default", "linear", "dynamic", "yarn", "llama3"),
}


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _valid_keys(node_cls, prefix: str = "") -> List[str]:
    out = []
    for f in fields(node_cls):
        name = f"{prefix}{f.name}"
        out.append(name)
        typ = _default(f)
        if is_dataclass(typ):
            out.extend(_valid_keys(type(typ), name + "."))
    return out


def _suggest(key: str) -> str:
    keys = _valid_keys(Config)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # try the last component against every last component
        last = key.split(".")[-1]
        tails = {k.split(".")[-1]: k for k in keys}
        m = difflib.get_close_matches(last, list(tails), n=1, cutoff=0.6)
        close = [tails[m[0]]] if m else []
    return f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(k for k in keys if '.' not in k)}"


def _full_key(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    return str(key)


def _rewrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = _full_key(exc)
    if isinstance(exc, ConfigKeyError) or "not in struct" in str(exc) or "Key '" in str(exc):
        return ConfigError(f"{source}: unknown config key '{key}': {_suggest(key)}")
    if isinstance(exc, ValidationError):
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {str(exc).splitlines()[0]} (key '{key}')")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not key=value (for example train.steps=200)")
    key, _, raw = item.partition("=")
    key = key.strip()
    try:  # YAML typing, as on the command line of other OmegaConf tools: 3, 1e-3, true, [a, b], null
        value = OmegaConf.to_container(OmegaConf.create(f"v: {raw}"))["v"]
    except Exception:
        value = raw
    return key, value


def _check_known(d: Any, cls, prefix: str, source: str) -> None:
    if not isinstance(d, dict):
        return
    by_name = {f.name: f for f in fields(cls)}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in by_name:
            raise ConfigError(f"{source}: unknown config key '{key}': {_suggest(key)}")
        f = by_name[k]
        sub = _default(f)
        if is_dataclass(sub):
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{source}: '{key}' must be a mapping of keys, got {v!r}")
            _check_known(v, type(sub), key + ".", source)


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                world_size: Optional[int] = None, base: Optional[Dict[str, Any]] = None) -> DictConfig:
    """Load a YAML config over the schema defaults, apply `key=value` overrides, validate.
    base: a config as a dict (e.g. the one a checkpoint saved) used instead of a YAML file.

    Raises ConfigError (one line: key, value, fix) on any problem.
    """
    schema = OmegaConf.structured(Config)
    layers = []
    if base is not None:
        _check_known(base, Config, "", "saved config")
        layers.append(("saved config", base))
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file '{path}' does not exist (see configs/ for examples)")
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path))
        except Exception as exc:  # YAML syntax
            raise ConfigError(f"{path}: cannot parse YAML: {str(exc).splitlines()[0]}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping with sections {', '.join(f.name for f in fields(Config))}")
        _check_known(raw, Config, "", path)
        layers.append((path, raw))
    for item in overrides or []:
        key, value = _parse_override(item)
        nested: Dict[str, Any] = {}
        cur = nested
        parts = key.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = value
        _check_known(nested, Config, "", f"override '{item}'")
        layers.append((f"override '{item}'", nested))
    cfg = schema
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise _rewrap(exc, source) from None
    validate(cfg, world_size=world_size)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def sp_degrees(p) -> Tuple[int, int]:
    """(ulysses, ring) degrees from parallel.sp / sp_ulysses / sp_ring, checked."""
    u, r = p.sp_ulysses, p.sp_ring
    _need(u >= 0 and r >= 0, f"parallel.sp_ulysses={u}, parallel.sp_ring={r}: use degrees >= 1 (or 0 to derive)")
    if u == 0 and r == 0:
        u, r = p.sp, 1
    elif u == 0:
        _need(p.sp % r == 0, f"parallel.sp_ring={r} does not divide parallel.sp={p.sp}: use a divisor of {p.sp}")
        u = p.sp // r
    elif r == 0:
        _need(p.sp % u == 0, f"parallel.sp_ulysses={u} does not divide parallel.sp={p.sp}: use a divisor of {p.sp}")
        r = p.sp // u
    _need(u * r == p.sp, f"parallel.sp_ulysses={u} x parallel.sp_ring={r} = {u * r} but parallel.sp={p.sp}: "
                         f"the two degrees must multiply to sp")
    return u, r


def sp_layout(cfg: DictConfig) -> str:
    """The sequence layout: zigzag balances a causal ring; mixers whose state flows rank to
    rank (lightning) need contiguous."""
    p = cfg.parallel
    if p.layout != "auto":
        return p.layout
    from longctx.model.mixers import sp_layouts
    _, ring = sp_degrees(p)
    if ring > 1 and all("zigzag" in sp_layouts(n) for n in cfg.model.mixers):
        return "zigzag"
    return "contiguous"


def validate(cfg: DictConfig, world_size: Optional[int] = None) -> None:
    """Consistency checks that the type system cannot express."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        _need(value in allowed, f"{key}={value!r} is not one of {', '.join(map(repr, allowed))}")
    m, d, p, t, c = cfg.model, cfg.data, cfg.parallel, cfg.train, cfg.checkpoint
    for key in ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.max_seq_len",
                "data.seq_len", "data.micro_batch_size", "parallel.sp", "train.steps", "train.grad_accum",
                "parallel.timeout_s", "train.log_every", "checkpoint.every"):
        v = OmegaConf.select(cfg, key)
        _need(v >= 1, f"{key}={v} must be >= 1")
    _need(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be >= 1 (older complete checkpoints are pruned)")
    kv = m.n_kv_heads if m.n_kv_heads is not None else m.n_heads
    _need(kv >= 1, f"model.n_kv_heads={kv} must be >= 1")
    _need(m.d_model % m.n_heads == 0,
          f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}: pick n_heads among "
          f"{[h for h in range(1, min(m.d_model, 128) + 1) if m.d_model % h == 0 and (m.d_model // h) % 2 == 0][-6:]}")
    _need((m.d_model // m.n_heads) % 2 == 0,
          f"head dim d_model/n_heads={m.d_model // m.n_heads} must be even for RoPE: change model.d_model or model.n_heads")
    _need(m.n_heads % kv == 0,
          f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={kv}: use a divisor of n_heads "
          f"({[h for h in range(1, m.n_heads + 1) if m.n_heads % h == 0]})")
    _need(len(m.mixers) >= 1, "model.mixers is empty: give a pattern such as [softmax]")
    _need(m.swa_window >= 1, f"model.swa_window={m.swa_window} must be >= 1 (tokens each swa query sees, itself included)")
    _need(m.landmark_block >= 1, f"model.landmark_block={m.landmark_block} must be >= 1 (regular tokens per landmark)")
    from longctx.model.mixers import MIXERS  # local: the registry imports model code
    for name in m.mixers:
        _need(name in MIXERS, f"model.mixers: unknown mixer '{name}'; registered: {', '.join(sorted(MIXERS))}")
    validate_memory(m)
    validate_rope_scaling(m)
    validate_lean(m)
    validate_carry(cfg)
    _need(not (cfg.init.from_hf and cfg.init.from_checkpoint),
          f"init.from_hf={cfg.init.from_hf!r} and init.from_checkpoint={cfg.init.from_checkpoint!r}: "
          f"start from one of them")
    _need(m.sliding_window is None or m.max_seq_len <= m.sliding_window,
          f"model.max_seq_len={m.max_seq_len} exceeds model.sliding_window={m.sliding_window}: sliding-window "
          f"attention is not implemented (full causal attention equals it only up to the window); set "
          f"model.max_seq_len <= {m.sliding_window}")
    _need(d.seq_len <= m.max_seq_len,
          f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}: raise model.max_seq_len or lower data.seq_len")
    if d.kind == "tokens":
        _need(d.path is not None, "data.kind=tokens needs data.path (a token file from `longctx data prepare`)")
    _need(0.0 <= d.passkey_fraction <= 1.0 and (d.passkey_fraction == 0 or d.kind in ("tokens", "synthetic")),
          f"data.passkey_fraction={d.passkey_fraction}: use a share in [0, 1] of passkey samples mixed into "
          f"data.kind=tokens or synthetic (data.kind={d.kind})")
    ulysses, ring = sp_degrees(p)
    if p.sp > 1:
        from longctx.model.mixers import sp_capable, sp_layouts
        bad = sorted({n for n in m.mixers if not sp_capable(n)})
        _need(not bad, f"parallel.sp={p.sp}: mixer(s) {', '.join(bad)} in model.mixers cannot run sequence-parallel "
                       f"yet; use parallel.sp=1 or mixers that can: "
                       f"{', '.join(sorted(k for k in MIXERS if sp_capable(k)))}")
        if "swa" in m.mixers:
            from longctx.parallel.sharding import padded_length
            shard = padded_length(d.seq_len, p.sp, "contiguous") // p.sp
            _need(shard >= m.swa_window - 1,
                  f"parallel.sp={p.sp}: each rank's {shard} tokens are fewer than model.swa_window - 1 = "
                  f"{m.swa_window - 1} (the window's keys come from the previous rank only): use fewer ranks, a "
                  f"longer data.seq_len or a smaller model.swa_window")
        if any(n in ("softmax",) for n in m.mixers):
            from longctx.parallel.ulysses import check_heads
            why = check_heads(m.n_heads, kv, ulysses, p.sp)
            _need(why is None, f"parallel.sp_ulysses={ulysses}: {why}")
        if any(n in ("memory", "mag", "mal", "mac") for n in m.mixers):
            from longctx.parallel.sharding import padded_length
            shard = padded_length(d.seq_len, p.sp, "contiguous") // p.sp
            _need(not any(n in ("mag", "mal") for n in m.mixers) or shard >= m.memory.window - 1,
                  f"parallel.sp={p.sp}: each rank's {shard} tokens are fewer than model.memory.window - 1 = "
                  f"{m.memory.window - 1} (the window's keys come from the previous rank only): use fewer ranks, "
                  f"a longer data.seq_len or a smaller window")
            uly = m.memory.sp_mode == "ulysses" and not any(n in ("mag", "mal", "mac") for n in m.mixers)
            if m.memory.sp_mode == "ulysses":
                mh = m.memory.heads or m.n_heads
                _need(mh % p.sp == 0,
                      f"model.memory.sp_mode=ulysses: the {mh} memory heads (model.memory.heads, default "
                      f"model.n_heads) are not divisible by parallel.sp={p.sp}: use sp_mode=handoff or a head "
                      f"count that is a multiple of {p.sp}")
            _need(uly or shard % m.memory.chunk == 0,
                  f"parallel.sp={p.sp}: each rank's {shard} tokens (data.seq_len={d.seq_len}) are not a multiple of "
                  f"model.memory.chunk={m.memory.chunk}, which the memory hand-off between ranks needs: use "
                  f"data.seq_len={-(-d.seq_len // (p.sp * m.memory.chunk)) * p.sp * m.memory.chunk}")
            # mac segments are rank-local (segment is a multiple of chunk: validate_memory)
            _need("mac" not in m.mixers or shard % m.memory.segment == 0,
                  f"parallel.sp={p.sp}: each rank's {shard} tokens (data.seq_len={d.seq_len}) are not a multiple of "
                  f"model.memory.segment={m.memory.segment}: a mac segment would straddle two ranks; use "
                  f"data.seq_len={-(-d.seq_len // (p.sp * m.memory.segment)) * p.sp * m.memory.segment} or a "
                  f"segment (a multiple of model.memory.chunk={m.memory.chunk}) that divides {shard}")
            _need(uly or not m.activation_checkpointing or (m.memory.recompute > 0 and not any(n in ("mag", "mal", "mac")
                                                                                     for n in m.mixers)),
                  f"model.activation_checkpointing=true with sequence-parallel (parallel.sp={p.sp}) memory layers "
                  "would resend the memory state when the forward is recomputed: set it false (or parallel.sp=1), "
                  "or, for `memory` layers (not mag/mal/mac), set model.memory.recompute (the layer then recomputes "
                  "itself piece by piece and is not checkpointed as a block)")
        _need(ring == 1 or not any(n == "landmark" for n in m.mixers),
              f"parallel.sp_ring={ring}: landmark attention runs under Ulysses only; set parallel.sp_ring=1 "
              f"(sp_ulysses={p.sp})")
        if p.layout == "zigzag":
            bad = sorted({n for n in m.mixers if "zigzag" not in sp_layouts(n)})
            _need(not bad, f"parallel.layout=zigzag: mixer(s) {', '.join(bad)} need the contiguous layout "
                           f"(state flows rank to rank); use parallel.layout=auto or contiguous")
    if world_size is not None:
        _need(world_size % p.sp == 0,
              f"world size {world_size} is not divisible by parallel.sp={p.sp}: launch a multiple of {p.sp} "
              f"processes or set parallel.sp to a divisor of {world_size}")
    _need(t.memory_gib is None or t.memory_gib > 0, f"train.memory_gib={t.memory_gib} must be > 0 (GiB) or null")
    _need(t.malloc_mmap_mib is None or t.malloc_mmap_mib > 0,
          f"train.malloc_mmap_mib={t.malloc_mmap_mib} must be > 0 (MiB) or null")
    _need(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _need(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    _need(t.stop_after is None or 1 <= t.stop_after <= t.steps,
          f"train.stop_after={t.stop_after} must be in [1, train.steps={t.steps}] (or null)")
    _need(t.on_nonfinite == "stop" or t.grad_accum == 1,
          f"train.on_nonfinite=skip needs train.grad_accum=1 (got {t.grad_accum}): a bad micro-batch cannot be "
          f"taken back out of gradients already accumulated")
    _need(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _need(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    _need(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, f"train.beta1/beta2=({t.beta1}, {t.beta2}) must be in [0, 1)")
    ds = cfg.deepspeed
    owned = {"train_micro_batch_size_per_gpu": "data.micro_batch_size", "gradient_accumulation_steps":
             "train.grad_accum", "train_batch_size": "data.micro_batch_size and train.grad_accum",
             "gradient_clipping": "train.grad_clip"}
    for key, ours in owned.items():
        _need(key not in ds.raw, f"deepspeed.raw.{key}: set {ours} instead (the trainer's loss scaling and step "
                                 f"boundaries are derived from it)")
    _need(not ds.offload_optimizer or ds.zero_stage >= 1,
          f"deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1 (got {ds.zero_stage})")
    _need(not ds.offload_param or ds.zero_stage == 3,
          f"deepspeed.offload_param=true needs deepspeed.zero_stage=3 (got {ds.zero_stage})")


def validate_carry(cfg: DictConfig) -> None:
    """train.carry_state: what the streams and the carried state do not support is refused."""
    m, d, p, t = cfg.model, cfg.data, cfg.parallel, cfg.train
    if not t.carry_state:
        return
    from longctx.model.mixers import carries_state
    pre = "train.carry_state=true"
    _need(any(carries_state(n) for n in m.mixers),
          f"{pre} but none of model.mixers={list(m.mixers)} carries state: add a layer that does "
          f"(memory, mag, mal, mac, lightning) or set train.carry_state=false")
    _need(p.sp == 1, f"{pre} with parallel.sp={p.sp}: the carried state runs on one rank per sequence (the mixers "
                     f"refuse ctx.carry under sequence parallelism): use parallel.sp=1")
    _need(d.kind in ("tokens", "synthetic") and d.passkey_fraction == 0,
          f"{pre} streams a token stream: data.kind={d.kind!r}, data.passkey_fraction={d.passkey_fraction}; use "
          f"data.kind=tokens or synthetic with passkey_fraction=0")
    _need(not d.mask_documents,
          f"{pre} with data.mask_documents=true: the state is carried across document boundaries (the Titans "
          f"mixers cannot reset it mid-sequence): set data.mask_documents=false")
    _need("landmark" not in m.mixers,
          f"{pre} with the landmark mixer: landmark layers keep no training state and the streams insert no "
          f"landmarks; remove landmark from model.mixers")
    _need(t.on_nonfinite == "stop",
          f"{pre} with train.on_nonfinite={t.on_nonfinite!r}: a skipped step would leave a hole in every stream "
          f"(its state is non-finite): use train.on_nonfinite=stop")
    _need(m.rope_scaling.rope_type != "dynamic",
          f"{pre} with model.rope_scaling.rope_type=dynamic: positions grow along the stream, so dynamic NTK "
          f"would change the scaling step by step; use another rope_type")
    _need("mac" not in m.mixers or d.seq_len % m.memory.segment == 0,
          f"{pre} with mac layers: data.seq_len={d.seq_len} is not a multiple of model.memory.segment="
          f"{m.memory.segment} (mac carries state only across segment boundaries): use data.seq_len="
          f"{max(1, d.seq_len // m.memory.segment) * m.memory.segment}")


def validate_lean(m) -> None:
    """model.loss_chunk / mlp_tile / offload_activations (the memory-lean step)."""
    for key, what in (("loss_chunk", "tokens per chunk of the fused head + cross-entropy, e.g. 4096"),
                      ("mlp_tile", "tokens per tile of the MLP, e.g. 8192")):
        v = m[key]
        _need(v >= 0, f"model.{key}={v} must be >= 0: 0 for the plain path, or {what}")
    _need(m.recompute_mlp or (m.activation_checkpointing and m.mlp_tile > 0 and not m.offload_activations),
          f"model.recompute_mlp=false needs model.activation_checkpointing=true and model.mlp_tile > 0 (the tiled "
          f"MLP keeps only its input), without model.offload_activations; got activation_checkpointing="
          f"{m.activation_checkpointing}, mlp_tile={m.mlp_tile}, offload_activations={m.offload_activations}")
    _need(not m.offload_activations or m.activation_checkpointing,
          "model.offload_activations=true needs model.activation_checkpointing=true (what is offloaded is "
          "each checkpointed block's input): set both, or offload_activations=false")


def validate_rope_scaling(m) -> None:
    """model.rope_scaling: a factor >= 1 for scaling types; llama3 / yarn ranges well ordered."""
    r = m.rope_scaling
    if r.rope_type == "default":
        return
    _need(r.factor >= 1.0, f"model.rope_scaling.factor={r.factor} must be >= 1 for rope_type={r.rope_type} "
                           f"(the ratio of the new context to the trained one)")
    L0 = r.original_max_position_embeddings
    _need(L0 is None or L0 >= 1, f"model.rope_scaling.original_max_position_embeddings={L0} must be >= 1 (or null)")
    if r.rope_type == "llama3":
        _need(0 < r.low_freq_factor < r.high_freq_factor,
              f"model.rope_scaling low_freq_factor={r.low_freq_factor}, high_freq_factor={r.high_freq_factor}: "
              f"need 0 < low_freq_factor < high_freq_factor (Llama 3.1 uses 1 and 4)")
    if r.rope_type == "yarn":
        _need(r.beta_fast > r.beta_slow > 0,
              f"model.rope_scaling beta_fast={r.beta_fast}, beta_slow={r.beta_slow}: need beta_fast > beta_slow > 0 "
              f"(YaRN uses 32 and 1)")


def validate_memory(m) -> None:
    """model.memory: ranges, and heads / segment consistent with d_model / chunk."""
    mm = m.memory
    _need(mm.depth in (1, 2), f"model.memory.depth={mm.depth} is not supported: use 1 (matrix memory) or 2 (MLP)")
    for key in ("chunk", "expansion", "conv", "window", "segment"):
        v = mm[key]
        _need(v >= 1, f"model.memory.{key}={v} must be >= 1")
    _need(mm.recompute >= 0 and mm.recompute % mm.chunk == 0,
          f"model.memory.recompute={mm.recompute} must be 0 (off) or a positive multiple of model.memory.chunk="
          f"{mm.chunk}, e.g. {64 * mm.chunk}")
    _need(mm.sp_mode in ("handoff", "ulysses"),
          f"model.memory.sp_mode={mm.sp_mode!r} is not one of 'handoff' (state passed rank to rank) or 'ulysses' "
          f"(all-to-all over memory heads)")
    _need(mm.n_persistent >= 0, f"model.memory.n_persistent={mm.n_persistent} must be >= 0")
    _need(mm.max_lr > 0, f"model.memory.max_lr={mm.max_lr} must be > 0 (values >= 1 diverge with l2-normalised keys)")
    _need(mm.max_state_norm > 0, f"model.memory.max_state_norm={mm.max_state_norm} must be > 0")
    heads = mm.heads if mm.heads is not None else m.n_heads
    _need(heads >= 1 and m.d_model % heads == 0,
          f"model.memory.heads={mm.heads} does not divide model.d_model={m.d_model}: use a divisor such as "
          f"{[h for h in range(1, min(m.d_model, 64) + 1) if m.d_model % h == 0][-4:]} (or null for model.n_heads)")
    _need(mm.segment % mm.chunk == 0,
          f"model.memory.segment={mm.segment} is not a multiple of model.memory.chunk={mm.chunk}: use a multiple "
          f"such as {max(mm.chunk, mm.segment // mm.chunk * mm.chunk)}")


def deepspeed_config(cfg: DictConfig, dp_size: int) -> Dict[str, Any]:
    """Derive the DeepSpeed JSON from our config; `deepspeed.raw` is merged last (escape hatch)."""
    t, ds = cfg.train, cfg.deepspeed
    zero: Dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # Contiguous, deterministic reduction keeps resumed runs bit-identical.
        zero.update({"contiguous_gradients": True, "overlap_comm": False})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    out: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": cfg.data.micro_batch_size * t.grad_accum * dp_size,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps, "weight_decay": t.weight_decay,
                       # torch's AdamW unless offloaded (then DeepSpeed's CPU Adam, compiled on first use)
                       "torch_adam": not ds.offload_optimizer},
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif t.precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return _deep_merge(out, OmegaConf.to_container(ds.raw, resolve=True) or {})


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def model_signature(cfg: DictConfig) -> Dict[str, Any]:
    """The part of the config a checkpoint's tensors depend on (compared on resume)."""
    return OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_json(cfg: DictConfig) -> str:
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
