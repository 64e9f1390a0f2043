"""Memory and FLOPs planner: what one training step of a config needs, per rank, before any of
it is allocated (`longctx plan`, and the start of `longctx train`).

Memory per rank = parameters + gradients + optimizer states (as ZeRO partitions them) +
activations (the peak of forward + backward, below) + workspaces (per-step buffers whose size
does not grow with length: the loss chunk's logits, one MLP tile, one memory piece, attention
tiles; each lives inside its own operation, so the largest counts) + communication buffers + a fixed process overhead (Python, torch, DeepSpeed, gloo).
The resident size a process reaches is that sum times an allocator factor (freed blocks are
kept for reuse, `longctx.kernels.cpu.tune_allocator`).

Activations. With T tokens on a rank (sequence / SP degree x micro-batch), d = model.d_model
and s the activation itemsize, backward runs the blocks top to bottom; while block l is
recomputed and differentiated, each block below it holds what it kept from the forward:
s·d per token when checkpointed (its input), or all its saved tensors (S·d) when not (a
Titans memory layer with model.memory.recompute, or every block without checkpointing):

    activation bytes/token = 32 + max_l ( sum_{j<l} hold_j + A_l(T) · d )

A_l (bytes per token per d_model, block input included) is the peak of a one-layer model with
that block, measured on this machine by benchmarks/planner_calibrate.py (torch's allocator
events, `longctx.train.metrics.peak_tensor_bytes`) for each mixer and precision, with the lean
settings on (loss_chunk, mlp_tile; the plain loss and the plain MLP add their intermediates,
counted analytically). Lightning's A depends on T: its torch kernel works on as many heads at
once as fit 2^24 elements, so its temporaries per token shrink from all heads (short
sequences) to one head (T >= 2^24 / head_dim tokens); two calibrations (all heads, one head)
are interpolated by the number of heads per group. 32 bytes/token: token ids, labels and
positions (int64).

FLOPs per step, by component (forward; training = 3x forward, the PaLM convention; "executed"
adds what recomputation repeats): per layer the mixer's projections (2 FLOPs per parameter
per token) and sequence mixing (each mixer's `mixer_fwd_flops`: softmax / landmark 2·T·d per
token causal, swa 4·window·d, lightning H(4·C·hd + 4·hd²), Titans memory the closed form's
count), the SwiGLU (6·d·ffn), and the head (2·d·V).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

GIB = 1024 ** 3

# From `python benchmarks/planner_calibrate.py` (this project's CI box: 2-core AMD EPYC, torch 2.13
# CPU, 1 thread; d_model 256, 4 heads, ffn_hidden 512, vocab 320, swa window 256), rounded; taken
# before RMSNorm kept only x and 1/rms for backward and before the banded sliding-window path, both
# of which lowered the real figures (rerun the script to refresh; A0/A_sp/A1_sp, which it also
# prints, are used where present). Bytes per token per d_model; A: one layer,
# block checkpointed (memory: not, it recomputes itself); A1: lightning with one head per kernel
# group; S: what one more block holds when not checkpointed.
CALIBRATION: Dict[str, Any] = {
    "fp32": {
        "softmax": {"A": 50.0, "S": 64.0},
        "swa": {"A": 54.0, "S": 64.0},
        "landmark": {"A": 56.0, "S": 72.0},
        "lightning": {"A": 76.0, "A1": 58.0, "S": 72.0},
        "memory": {"A": 44.0, "S": 32.0},
        "memory_plain": {"A": 157.0, "S": 150.0},
        "mag": {"A": 203.0, "S": 190.0},
    },
    "bf16": {
        "softmax": {"A": 43.0, "S": 40.0},
        "swa": {"A": 47.0, "S": 40.0},
        "landmark": {"A": 48.0, "S": 44.0},
        "lightning": {"A": 68.0, "A1": 50.0, "S": 44.0},
        "memory": {"A": 34.0, "S": 18.0},
        "memory_plain": {"A": 90.0, "S": 85.0},
        "mag": {"A": 120.0, "S": 110.0},
    },
    # resident bytes of a trainer process before its first step (Python, torch, DeepSpeed, gloo)
    "process_bytes": 0.55 * GIB,
    # resident size / (tensor peak + process) (allocator slack)
    "rss_factor": 1.05,
}


@dataclass
class Plan:
    seq_len: int
    world_size: int
    sp: int
    dp: int
    micro_batch: int
    tokens_per_rank: int
    precision: str
    zero_stage: int
    params: int
    layers: List[str]
    memory: Dict[str, float]            # bytes per rank by component (tensor bytes, process overhead)
    activation_per_token: float         # bytes per token of the activation peak
    peak_layer: int                     # the block whose backward sets the peak (-1: none)
    peak_bytes: float                   # resident bytes per rank (rss_factor applied)
    tensor_peak_bytes: float            # activations + workspaces of one step (what peak_tensor_bytes measures)
    flops: Dict[str, float]             # model FLOPs per step (whole step, all ranks), by component
    flops_executed_rank: float          # FLOPs one rank executes in a step, recomputation included
    flops_sequential_rank: float        # FLOPs run one rank after another (memory hand-off chain)
    notes: List[str] = field(default_factory=list)

    @property
    def device_bytes(self) -> float:
        """What one rank needs on its GPU: the tensors only (no host-offloaded optimizer states,
        no process overhead, no host allocator factor). The activation constants are measured
        with the CPU torch paths; on a GPU the fused kernels keep less, so this errs high."""
        host = self.memory.get("optimizer (host)", 0.0) + self.memory.get("process", 0.0)
        return sum(self.memory.values()) - host

    def need_bytes(self, device: str) -> float:
        return self.device_bytes if device == "cuda" else self.peak_bytes

    @property
    def total_bytes(self) -> float:
        return self.peak_bytes * self.world_size

    @property
    def model_flops(self) -> float:
        return sum(self.flops.values())

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, model_flops=self.model_flops)
        return d


def _act_dtype(cfg) -> Tuple[str, int]:
    p = cfg.train.precision
    return ("bf16", 2) if p in ("bf16", "fp16") else ("fp32", 4)


def _ffn(m) -> int:
    from longctx.model.layers import llama_ffn_hidden
    return m.ffn_hidden or llama_ffn_hidden(m.d_model)


def count_params(m) -> int:
    """Parameters of the model `m` (model config) without building it (a meta-device model)."""
    import torch

    from longctx.model.transformer import DecoderLM
    with torch.device("meta"):
        model = DecoderLM(m)
    return sum(p.numel() for p in model.parameters())


def _calib(prec: str, name: str, m) -> Dict[str, float]:
    tab = CALIBRATION[prec]
    if name == "memory" and not m.memory.recompute:
        return tab["memory_plain"]
    if name in ("mal", "mac"):
        return tab["mag"]
    return tab.get(name, tab["softmax"])


def _heads_per_group(m, T: int, B: int) -> int:
    """Heads the lightning torch kernel takes at once (kernels/lightning_torch.py, 2^24 elements)."""
    H = m.n_heads
    hd = m.d_model // H
    return max(1, min(H, (1 << 24) // max(1, B * T * hd)))


def _block_terms(m, name: str, prec: str, s: int, T: int, B: int, checkpointed: bool,
                 sp: int = 1) -> Tuple[float, float]:
    """(A, hold) in bytes per token for one block: A its recompute + backward peak (input
    included), hold what it keeps while the blocks above run their backward. Under sequence
    parallelism the SP calibration (A_sp, A1_sp) where the mixer has one."""
    c = dict(_calib(prec, name, m))
    if sp > 1:
        c.update({k[:-3]: v for k, v in c.items() if k.endswith("_sp")})
    d, F = m.d_model, _ffn(m)
    A = c["A"] * d
    if name == "lightning" and "A1" in c and m.n_heads > 1:
        g = _heads_per_group(m, T, B)
        A = (c["A1"] + (c["A"] - c["A1"]) * (g - 1) / (m.n_heads - 1)) * d
    S = c["S"] * d
    if not m.mlp_tile:  # the plain SwiGLU keeps gate, up, silu(gate) and their product
        A += 4 * F * s
        S += 4 * F * s
    if not checkpointed and not (name == "memory" and m.memory.recompute):
        A = c.get("A0", c["A"]) * d + (A - c["A"] * d)  # not checkpointed: A0, same analytic additions
    if name == "memory" and sp > 1 and _memory_ulysses(m):
        # titans_ulysses.py keeps the gathered projections and gate logits and the outputs before
        # the output norm, (3·d + 3·H) + d values per token (the memory's inner width is d_model);
        # while its all-to-alls run, also their send copy and receive buffer (the layer's own peak)
        H = m.memory.heads or m.n_heads
        keep = (4 * d + 3 * H) * s
        A, S = A + keep + 2 * (3 * d + 3 * H) * s, S + keep
    # model.recompute_mlp=false: a checkpointed block also keeps its MLP input and normalised copy
    hold = s * d * (1 if getattr(m, "recompute_mlp", True) else 3)
    return A, (hold if checkpointed else S)


def _memory_ulysses(m) -> bool:
    return getattr(m.memory, "sp_mode", "handoff") == "ulysses"


def activation_per_token(cfg, T: int) -> Tuple[float, int]:
    """(bytes per token of the activation peak, layer whose backward sets it)."""
    from longctx.model.mixers import layer_mixers
    m = cfg.model
    prec, s = _act_dtype(cfg)
    B = cfg.data.micro_batch_size
    names = layer_mixers(list(m.mixers), m.n_layers)
    best, where, below = 0.0, -1, 0.0
    for l, n in enumerate(names):
        ck = bool(m.activation_checkpointing) and not (n == "memory" and m.memory.recompute)
        A, hold = _block_terms(m, n, prec, s, T, B, ck, cfg.parallel.sp)
        if below + A > best:
            best, where = below + A, l
        below += hold
    loss = 0.0
    if not m.loss_chunk:  # plain head: logits, their fp32 copy and the softmax gradient
        loss = m.vocab_size * (s + 4 + 4)
        if below + loss > best:
            best, where = below + loss, -1
    return 32.0 + best, where


def workspaces(cfg, T: int) -> Dict[str, float]:
    """Per-step buffers whose size does not grow with the sequence (bytes)."""
    from longctx.model.mixers import layer_mixers
    m = cfg.model
    _, s = _act_dtype(cfg)
    B = cfg.data.micro_batch_size
    d, F, V = m.d_model, _ffn(m), m.vocab_size
    names = set(layer_mixers(list(m.mixers), m.n_layers))
    out: Dict[str, float] = {}
    if m.loss_chunk:  # one chunk's logits (+ fp32 copy and softmax) and the fp32 head gradient
        out["loss chunk"] = min(m.loss_chunk, B * T) * V * (s + 8) + V * d * 4
    if m.mlp_tile:  # one tile's gate, up, their activations and gradients in backward
        out["mlp tile"] = 6 * min(m.mlp_tile, B * T) * F * s
    if "memory" in names and m.memory.recompute:
        c = CALIBRATION[_act_dtype(cfg)[0]]["memory_plain"]["A"]
        out["memory piece"] = c * d * min(m.memory.recompute, B * T)
    if names & {"swa", "softmax", "landmark", "mag", "mal", "mac"}:
        out["attention tiles"] = 6 * B * m.n_heads * 256 * 512 * 4  # score tiles of the flash torch path
    return out


def communication(cfg, T: int, world: int) -> Dict[str, float]:
    from longctx.model.mixers import layer_mixers
    m, p = cfg.model, cfg.parallel
    _, s = _act_dtype(cfg)
    B = cfg.data.micro_batch_size
    d = m.d_model
    names = set(layer_mixers(list(m.mixers), m.n_layers))
    out: Dict[str, float] = {}
    if p.sp > 1 and names & {"softmax", "landmark"}:
        out["ulysses all-to-all"] = 4 * B * T * d * s  # q, k, v, o: sent and received copies
    if p.sp > 1 and "lightning" in names:
        hd = d // m.n_heads
        out["lightning states"] = 2 * p.sp * B * m.n_heads * hd * hd * 4
    if p.sp > 1 and "swa" in names:
        kvd = (m.n_kv_heads or m.n_heads) * (d // m.n_heads)
        out["swa halo"] = 4 * B * (m.swa_window - 1) * kvd * s
    return out


def param_memory(cfg, n_params: int, world: int) -> Dict[str, float]:
    """Parameters, gradients and AdamW states per rank under the ZeRO stage (DeepSpeed's data
    parallel here is every rank: dp x sp)."""
    z = cfg.deepspeed.zero_stage
    prec, s = _act_dtype(cfg)
    part = lambda x, stage: x / world if z >= stage else x  # noqa: E731
    out = {"parameters": part(n_params * s, 3)}
    out["gradients"] = part(n_params * s, 2)
    opt = n_params * 8  # exp_avg, exp_avg_sq (fp32)
    if prec != "fp32":
        opt += n_params * 4  # fp32 master weights
        out["gradients"] += part(n_params * 4, 2)  # fp32 gradient accumulation
    out["optimizer"] = part(opt, 1)
    if cfg.deepspeed.offload_optimizer:
        out["optimizer (host)"] = out.pop("optimizer")
    return out


def tokens_per_rank(cfg, seq_len: int) -> int:
    from longctx.config import sp_layout
    from longctx.parallel.sharding import padded_length
    sp = cfg.parallel.sp
    return padded_length(seq_len, sp, sp_layout(cfg)) // sp


def flops(cfg, seq_len: int, world: int) -> Dict[str, float]:
    """Model FLOPs of one step (forward + backward = 3 x forward), the whole global batch on
    `world` ranks, by component: '<mixer> projections', '<mixer> mixing', 'mlp', 'head'."""
    from longctx.model.mixers import MIXERS, layer_mixers
    from longctx.model.transformer import softmax_fwd_flops
    m = cfg.model
    d, F, V = m.d_model, _ffn(m), m.vocab_size
    tokens = seq_len * cfg.data.micro_batch_size * cfg.train.grad_accum * (world // cfg.parallel.sp)
    out: Dict[str, float] = {}
    for name in layer_mixers(list(m.mixers), m.n_layers):
        f = getattr(MIXERS[name], "mixer_fwd_flops", None) or softmax_fwd_flops
        params, mix = f(m, seq_len)
        out[f"{name} projections"] = out.get(f"{name} projections", 0.0) + 3 * 2 * params * tokens
        out[f"{name} mixing"] = out.get(f"{name} mixing", 0.0) + 3 * mix * tokens
        out["mlp"] = out.get("mlp", 0.0) + 3 * 2 * 3 * d * F * tokens
    out["head"] = 3 * 2 * d * V * tokens
    return out


def executed_flops_rank(cfg, seq_len: int, world: int) -> Tuple[float, float]:
    """(FLOPs one rank executes per step with recomputation, FLOPs of it that run one rank after
    another: the Titans memory hand-off under SP)."""
    from longctx.model.mixers import MIXERS, layer_mixers
    from longctx.model.transformer import softmax_fwd_flops
    m = cfg.model
    d, F, V = m.d_model, _ffn(m), m.vocab_size
    T = tokens_per_rank(cfg, seq_len) * cfg.data.micro_batch_size * cfg.train.grad_accum
    total, seq = 0.0, 0.0
    for name in layer_mixers(list(m.mixers), m.n_layers):
        f = getattr(MIXERS[name], "mixer_fwd_flops", None) or softmax_fwd_flops
        params, mix = f(m, seq_len)
        mixer_fwd = 2 * params + mix
        mlp_fwd = 6 * d * F
        self_rec = name == "memory" and bool(m.memory.recompute)
        ck = bool(m.activation_checkpointing) and not self_rec
        passes = 3 + (1 if ck else 0)  # forward, backward (2x), recompute
        mixer = mixer_fwd * (passes + (1 if self_rec else 0))
        mlp_passes = passes if getattr(m, "recompute_mlp", True) else 3
        mlp = mlp_fwd * mlp_passes + (4 * d * F if m.mlp_tile else 0)
        total += (mixer + mlp) * T
        if name in ("memory", "mag", "mal", "mac") and cfg.parallel.sp > 1 and not (name == "memory" and _memory_ulysses(m)):
            seq += mixer * T * (cfg.parallel.sp - 1)  # the hand-off chain (Ulysses over heads has none)
    total += 6 * d * V * T
    return total, seq


def plan(cfg: DictConfig, world_size: int, seq_len: Optional[int] = None) -> Plan:
    """The plan of one training step of `cfg` on `world_size` ranks at `seq_len` (default
    data.seq_len). The config is validated with these values."""
    from longctx.config import load_config
    from longctx.model.mixers import layer_mixers
    over = {"data": {"seq_len": int(seq_len)}} if seq_len else {}
    if seq_len and seq_len > cfg.model.max_seq_len:
        over["model"] = {"max_seq_len": int(seq_len)}
    base = OmegaConf.to_container(cfg, resolve=True)
    c = load_config(base=base, overrides=[f"{k}.{kk}={v}" for k, sub in over.items() for kk, v in sub.items()],
                    world_size=world_size)
    L = c.data.seq_len
    T = tokens_per_rank(c, L)
    B = c.data.micro_batch_size
    prec, s = _act_dtype(c)
    n_params = count_params(c.model)
    mem = param_memory(c, n_params, world_size)
    per_tok, where = activation_per_token(c, T)
    mem["activations"] = per_tok * T * B
    ws = workspaces(c, T)
    # each workspace lives only inside its own operation (the loss chunk in the head, a tile in
    # its MLP, score tiles in attention): the step's peak meets one of them, not their sum
    mem["workspaces"] = max(ws.values(), default=0.0)
    comm = communication(c, T, world_size)
    mem["communication"] = sum(comm.values())
    mem["process"] = CALIBRATION["process_bytes"]
    tensor_peak = mem["activations"] + mem["workspaces"] + mem["communication"]
    peak = sum(mem.values()) * CALIBRATION["rss_factor"]  # host-offloaded states are resident too (CPU)
    fl = flops(c, L, world_size)
    ex, sq = executed_flops_rank(c, L, world_size)
    notes = [f"{k}: {v / 2**20:.1f} MiB" for k, v in {**ws, **comm}.items()]
    return Plan(seq_len=L, world_size=world_size, sp=c.parallel.sp, dp=world_size // c.parallel.sp, micro_batch=B,
                tokens_per_rank=T, precision=c.train.precision, zero_stage=c.deepspeed.zero_stage, params=n_params,
                layers=layer_mixers(list(c.model.mixers), c.model.n_layers), memory=mem,
                activation_per_token=per_tok, peak_layer=where, peak_bytes=peak, tensor_peak_bytes=tensor_peak,
                flops=fl, flops_executed_rank=ex, flops_sequential_rank=sq, notes=notes)


def step_seconds(p: Plan, flops_per_s: float) -> float:
    """Predicted seconds per step: the FLOPs one rank executes, plus those that wait for the
    previous rank (the memory hand-off chain), at an achieved rate (FLOP/s of one rank)."""
    return (p.flops_executed_rank + p.flops_sequential_rank) / flops_per_s


# -- fitting ------------------------------------------------------------------------------------

def available_bytes() -> Optional[int]:
    """MemAvailable of this machine (Linux), else None."""
    from longctx.train.metrics import available_bytes as avail
    return avail()


def suggestions(cfg: DictConfig, world_size: int, seq_len: int, budget_rank: float,
                device: str = "cpu") -> List[Tuple[str, Plan]]:
    """Settings that would bring the per-rank peak under `budget_rank` bytes, each with its
    plan: each lean setting alone, all of them together, and the SP degree (on more machines)."""
    m = cfg.model
    base = OmegaConf.to_container(cfg, resolve=True)
    tries: List[List[str]] = []
    lean = []
    if not m.activation_checkpointing:
        lean.append("model.activation_checkpointing=true")
    if not m.loss_chunk:
        lean.append("model.loss_chunk=4096")
    elif m.loss_chunk > 1024:
        lean.append("model.loss_chunk=1024")
    if not m.mlp_tile:
        lean.append("model.mlp_tile=4096")
    elif m.mlp_tile > 1024:
        lean.append("model.mlp_tile=1024")
    if "memory" in m.mixers and not m.memory.recompute:
        lean.append(f"model.memory.recompute={64 * m.memory.chunk}")
    if cfg.train.precision == "fp32":
        lean.append("train.precision=bf16")
    tries += [[x] for x in lean]
    if len(lean) > 1:
        tries.append(lean)
    out: List[Tuple[str, Plan]] = []
    from longctx.config import ConfigError, load_config
    for ov in tries:
        try:
            c = load_config(base=base, overrides=ov)
            p = plan(c, world_size, seq_len)
        except ConfigError:
            continue
        if p.need_bytes(device) <= budget_rank:
            out.append((" ".join(ov), p))
    # more SP ranks (each on its own machine / device with this budget)
    for sp in (2, 4, 8, 16, 32, 64, 128):
        if sp <= cfg.parallel.sp:
            continue
        extra = lean if not out else []
        # Ulysses memory splits heads: beyond the head count, the memory hands off instead
        for alt in ([], ["model.memory.sp_mode=handoff"]):
            try:
                c = load_config(base=base, overrides=[f"parallel.sp={sp}", *extra, *alt])
                p = plan(c, sp * (world_size // cfg.parallel.sp), seq_len)
                extra = extra + alt
                break
            except ConfigError:
                p = None
        if p is None:
            continue
        if p.need_bytes(device) <= budget_rank:
            out.append((" ".join([f"parallel.sp={sp}", *extra]) + f" ({sp * (world_size // cfg.parallel.sp)} ranks, "
                        f"each with this rank's share of memory)", p))
            break
    return out


def check_fits(cfg: DictConfig, world_size: int, ranks_here: int, budget_bytes: float, already_bytes: float = 0.0,
               seq_len: Optional[int] = None, device: str = "cpu") -> Tuple[bool, Plan, str]:
    """Whether `ranks_here` ranks of this plan fit in `budget_bytes` (what this machine has, or
    one GPU with device="cuda": then only the rank's tensors count, Plan.device_bytes;
    `already_bytes` per rank are resident already). Returns (fits, plan, message)."""
    p = plan(cfg, world_size, seq_len)
    rank_need = p.need_bytes(device)
    need = ranks_here * max(0.0, rank_need - already_bytes)
    if need <= budget_bytes:
        return True, p, ""
    per_rank_budget = budget_bytes / max(1, ranks_here) + already_bytes
    sugg = suggestions(cfg, world_size, p.seq_len, per_rank_budget, device)
    lines = [f"data.seq_len={p.seq_len} will not fit: the planner predicts {rank_need / GIB:.2f} GiB per rank "
             f"({ranks_here} rank(s) here: {need / GIB:.2f} GiB more) but {budget_bytes / GIB:.2f} GiB is available "
             f"({describe_memory(p)})"]
    if sugg:
        lines.append("settings that would fit: " + "; ".join(f"{ov} -> {q.need_bytes(device) / GIB:.2f} GiB per rank"
                                                             for ov, q in sugg))
    else:
        lines.append("no single setting fits; lower data.seq_len or use machines with more memory")
    lines.append("check with `longctx plan CONFIG --seq-len N --world-size P` (--memory-gib sets the budget)")
    return False, p, "\n".join(lines)


def describe_memory(p: Plan) -> str:
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in p.memory.items() if v >= 0.005 * GIB)
    return f"GiB per rank: {parts}; activations {p.activation_per_token:,.0f} B/token x {p.tokens_per_rank:,} tokens"


def format_plan(p: Plan, flops_per_s: Optional[float] = None) -> str:
    """The plan as a table for `longctx plan`."""
    out = [f"plan: seq_len {p.seq_len:,} on {p.world_size} rank(s) (sp {p.sp} x dp {p.dp}), micro-batch "
           f"{p.micro_batch}: {p.tokens_per_rank:,} tokens per rank; {p.precision}, ZeRO-{p.zero_stage}, "
           f"{p.params / 1e6:.2f}M parameters; layers: {', '.join(p.layers)}",
           "memory per rank:"]
    for k, v in p.memory.items():
        out.append(f"  {k:<22} {v / GIB:9.3f} GiB")
    out.append(f"  {'peak (resident)':<22} {p.peak_bytes / GIB:9.3f} GiB   (x{CALIBRATION['rss_factor']} allocator)")
    out.append(f"  {'all ranks':<22} {p.total_bytes / GIB:9.3f} GiB")
    where = f"block {p.peak_layer} ({p.layers[p.peak_layer]})" if p.peak_layer >= 0 else "the loss"
    out.append(f"  activations: {p.activation_per_token:,.0f} bytes/token at the peak, in the backward of {where}")
    for n in p.notes:
        out.append(f"  workspace/buffer {n}")
    out.append(f"FLOPs per step (model, forward + backward): {p.model_flops:.4g}")
    for k, v in sorted(p.flops.items(), key=lambda kv: -kv[1]):
        out.append(f"  {k:<24} {v:.4g}  ({100 * v / p.model_flops:.1f}%)")
    out.append(f"  executed per rank (with recomputation): {p.flops_executed_rank:.4g}; sequential across ranks "
               f"(memory hand-off): {p.flops_sequential_rank:.4g}")
    if flops_per_s:
        out.append(f"time per step at {flops_per_s / 1e9:.1f} GFLOP/s per rank: {step_seconds(p, flops_per_s):.1f} s")
    return "\n".join(out)
