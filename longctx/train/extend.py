"""Staged context extension of a Hugging Face model: plan, run, evaluate, export.

    longctx extend --from HF_DIR --target-len N --method M --out DIR [--plan-only]

Methods (L0: the model's trained length, L: the stage length, s = L / L0):
  pi      linear position interpolation, factor s
  ntk     dynamic NTK, factor s (the base rises with the current length)
  yarn    YaRN, factor s, original_max_position_embeddings L0
  llama3  llama3 scaling, factor s, low/high frequency factors 1 / 4
  theta   base raising ("ABF"): theta_L = theta_0 * s^(d/(d-2)) (the NTK-aware base), plain RoPE
  landmark  landmark attention in every layer (train/convert.py: same q/k/v/o weights, one
          landmark token whose embedding is the mean embedding), fine-tuned with landmarks in the
          data; by default at the trained length L0 with plain RoPE (the paper's recipe: the
          context comes from retrieving blocks at inference), `--rope`/`--train-len` change that
  hybrid  the chosen attention layers become lightning attention initialised from their
          q/k/v/o, trained to match the softmax layers' outputs (attention transfer,
          train/transfer.py), then fine-tuned with the LM loss in stages (rope: yarn by default
          for the softmax layers that stay)

--plan-only writes, under DIR, plan.json and stage_K/config.yaml (normal training configs,
paths absolute): `longctx train DIR/stage_K/config.yaml` runs a stage by hand.

Otherwise the run (`extend()`, the same from Python) works in DIR.partial and renames it to DIR
only when every step succeeded, so DIR never holds half a run:
  plan.json, stage_K/config.yaml   as above, paths relative to the folder
  eval/before_*.json                the source model: perplexity at a few lengths, passkey at N
  stage_0/hf                        landmark / hybrid: the converted model (hybrid: after transfer)
  stage_K/run, train.log            the trainer's run folder (checkpoints, metrics.jsonl), its output
  stage_K/hf                        the stage's final checkpoint exported (model/hf.py); the next
                                    stage starts from it (init.from_hf), so the SP degree may change
  eval/after_*.json                 the final model, same settings
  results.json, model -> stage_K/hf the summary and the final model
Every stage goes through the normal trainer in a subprocess (`python -m longctx.cli train`, or
torch.distributed.run when the stage has several processes), so sequence parallelism, ZeRO and
resume apply. A rerun of the same command after a crash resumes: finished stages (their export
exists) and finished eval cells are kept, an interrupted stage resumes from its last checkpoint;
a DIR.partial made with other settings is refused (names the setting).

Rope-scaled methods export transformers folders (Llama / Mistral / Qwen2, as the source);
landmark and hybrid models have no transformers equivalent and export in our own format
(model/hf.py save_native; docs/hf.md), which from_pretrained, init.from_hf and `longctx eval
--hf` read.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

from longctx.train.trainer import TrainingError

ROPE_METHODS = ("yarn", "ntk", "pi", "llama3", "theta")
METHODS = ROPE_METHODS + ("landmark", "hybrid")
ROPES = ROPE_METHODS + ("none",)
DEFAULT_ROPE = {"landmark": "none", "hybrid": "yarn"}


class ExtendError(TrainingError):
    """A stage of the extension run failed (the message names it, its log and how to resume)."""


def stage_lengths(current: int, target: int, per_stage: float = 4.0) -> List[int]:
    """[L_1, ..., target]: each stage per_stage x the previous one, the last exactly target."""
    if target <= current:
        raise ValueError(f"--target-len {target} is not above the model's current length {current}: "
                         f"choose a target > {current}")
    if per_stage <= 1:
        raise ValueError(f"--per-stage {per_stage} must be > 1 (the growth factor of each stage)")
    out, L = [], current
    while L < target:
        L = min(target, int(L * per_stage))
        out.append(L)
    return out


def rope_for(method: str, L0: int, L: int, theta0: float, head_dim: int) -> Dict[str, Any]:
    """model.* rope keys for one stage of length L (method 'none': plain RoPE, unchanged)."""
    s = L / L0
    if method == "none":
        return {"rope_theta": theta0, "rope_scaling": {"rope_type": "default"}}
    if method == "theta":
        return {"rope_theta": theta0 * s ** (head_dim / (head_dim - 2)), "rope_scaling": {"rope_type": "default"}}
    scaling = {"pi": {"rope_type": "linear", "factor": s},
               "ntk": {"rope_type": "dynamic", "factor": s, "original_max_position_embeddings": L0},
               "yarn": {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L0},
               "llama3": {"rope_type": "llama3", "factor": s, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": L0}}[method]
    return {"rope_theta": theta0, "rope_scaling": scaling}


def sp_for(L: int, max_tokens_per_rank: Optional[int]) -> int:
    """The smallest power-of-two sequence-parallel degree that keeps L / sp <= max_tokens_per_rank."""
    if not max_tokens_per_rank:
        return 1
    return 1 << max(0, math.ceil(math.log2(L / max_tokens_per_rank)))


def _check_source(from_dir: str):
    """(HF config dict, our model.* dict) of the source folder, refused clearly if unusable."""
    from longctx.model import hf
    if not os.path.isdir(from_dir):
        raise FileNotFoundError(f"--from {from_dir}: no such folder (give a Hugging Face model folder with "
                                f"config.json and safetensors)")
    hf_cfg = hf.read_hf_config(from_dir)
    if hf.is_native(hf_cfg):
        raise ValueError(f"--from {from_dir} is in longctx's own format (a landmark / hybrid model): extension "
                         f"starts from a transformers model ({', '.join(hf.SUPPORTED)})")
    src = hf.model_config(hf_cfg, from_dir)
    if src["rope_scaling"]["rope_type"] != "default":
        raise ValueError(f"{from_dir} already uses rope_type={src['rope_scaling']['rope_type']}: the recipe "
                         f"extends models with plain RoPE only")
    return hf_cfg, src


def _token_prefix(path: Optional[str], what: str) -> Optional[str]:
    if path is None:
        return None
    path = os.path.abspath(path)
    if not os.path.isfile(path + ".json") or not os.path.isfile(path + ".bin"):
        raise FileNotFoundError(f"{what} {path}: no token file {path}.bin / {path}.json (make one with "
                                f"`longctx data prepare TEXT --out {path}`)")
    return path


def plan(from_dir: str, target_len: int, method: str, out: str, per_stage: float = 4.0, steps: int = 200,
         lr: float = 2e-5, tokens_per_step: int = 65536, data: Optional[str] = None,
         max_tokens_per_rank: Optional[int] = None, *, nproc: int = 1, rope: Optional[str] = None,
         train_len: Optional[int] = None, landmark_block: int = 64, hybrid_layers=None,
         hybrid_ratio: Optional[float] = None, transfer_steps: int = 100, transfer_lr: float = 1e-3,
         overrides: Optional[Sequence[str]] = None, relative: bool = False) -> Dict[str, Any]:
    """The stages and their configs (as dicts), every config validated; nothing written.

    relative: paths inside out are written relative to it (the run mode: the folder is renamed
    when done); otherwise absolute under out."""
    from omegaconf import OmegaConf
    from longctx.config import load_config
    from longctx.train import convert
    from longctx.train.data import load_tokenizer
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not known: use one of {', '.join(METHODS)}")
    if rope is not None and method in ROPE_METHODS:
        raise ValueError(f"--rope {rope} applies to --method landmark or hybrid (--method {method} is the rope)")
    rope = method if method in ROPE_METHODS else (rope or DEFAULT_ROPE[method])
    if rope not in ROPES:
        raise ValueError(f"--rope {rope!r} is not known: use one of {', '.join(ROPES)}")
    for key, v, lo in (("--steps", steps, 1), ("--tokens-per-step", tokens_per_step, 1), ("--nproc", nproc, 1),
                       ("--transfer-steps", transfer_steps, 0)):
        if int(v) < lo:
            raise ValueError(f"{key} {v} must be >= {lo}")
    if lr <= 0 or transfer_lr <= 0:
        raise ValueError(f"--lr {lr} / --transfer-lr {transfer_lr} must be > 0")
    from_dir = os.path.abspath(from_dir)
    hf_cfg, src = _check_source(from_dir)
    L0, theta0, hd = src["max_seq_len"], src["rope_theta"], src["d_model"] // src["n_heads"]
    tok_file = os.path.join(from_dir, "tokenizer.json")
    tok_spec = tok_file if os.path.isfile(tok_file) else "byte"
    data = _token_prefix(data, "--data")
    if tok_spec != "byte" and data is None:
        raise ValueError(f"--from {from_dir} has tokenizer.json: give --data PREFIX, a token file prepared with "
                         f"it (`longctx data prepare TEXT --out PREFIX --tokenizer {tok_file}`); the built-in "
                         f"synthetic corpus is byte-level")
    if target_len <= L0:
        stage_lengths(L0, target_len)  # the error message
    if train_len is None:
        train_len = L0 if method == "landmark" and rope == "none" else target_len
    if not L0 <= train_len <= target_len:
        raise ValueError(f"--train-len {train_len} must be in [{L0}, {target_len}] (the trained length .. the target)")
    lengths = stage_lengths(L0, train_len, per_stage) if train_len > L0 else [L0]

    # The model every training stage starts from: the source, or its conversion (stage 0).
    base_model, landmark, hybrid = dict(src), None, None
    root = "" if relative else os.path.abspath(out)
    convert_stage = None
    if method == "landmark":
        landmark_id = load_tokenizer(tok_spec).landmark_id
        base_model = convert.landmark_model_config(src, landmark_id, landmark_block)
        landmark = {"block": int(landmark_block), "landmark_id": int(landmark_id)}
    elif method == "hybrid":
        layers = convert.hybrid_layers(src["n_layers"], hybrid_layers, hybrid_ratio)
        base_model = convert.hybrid_model_config(src, layers)
        hybrid = {"lightning_layers": layers}
    if method in ("landmark", "hybrid"):
        convert_stage = {"stage": 0, "kind": "convert", "export": os.path.join(root, "stage_0", "hf")}
        if method == "hybrid":
            tcfg = {"model": {**base_model, "max_seq_len": L0},
                    "data": {"kind": "tokens" if data else "synthetic", "path": data, "seq_len": L0,
                             "micro_batch_size": max(1, tokens_per_step // L0), "tokenizer": tok_spec}}
            tdata = OmegaConf.to_container(load_config(base=tcfg, overrides=_data_overrides(overrides)).data)
            convert_stage["transfer"] = {"steps": int(transfer_steps), "lr": float(transfer_lr), "data": tdata}

    if landmark and landmark_block + 1 >= lengths[0]:
        raise ValueError(f"--landmark-block {landmark_block}: a {lengths[0]}-token training window holds no complete "
                         f"block and its landmark (block + 1 = {landmark_block + 1} positions): use a block below "
                         f"{lengths[0] - 1}, better {lengths[0] // 4} or less")
    out_abs = os.path.abspath(out)
    stages, prev = [], (convert_stage["export"] if convert_stage else from_dir)
    target_pos = target_len + (target_len // landmark_block if landmark else 0)  # landmarks take positions too
    for k, L in enumerate(lengths, 1):
        d = os.path.join(root, f"stage_{k}")
        last = k == len(lengths)
        rope_len = target_len if last and rope != "none" else L  # the last stage is set for the target
        max_len = rope_len if rope != "none" else max(L, target_pos)
        model = {**base_model, **rope_for(rope, L0, rope_len, theta0, hd), "max_seq_len": max_len}
        sp = sp_for(L, max_tokens_per_rank)
        world = nproc if nproc >= sp else sp
        if world % sp:
            raise ValueError(f"--nproc {nproc} is not a multiple of stage {k}'s sequence-parallel degree {sp} "
                             f"(length {L}, --max-tokens-per-rank {max_tokens_per_rank}): use a multiple of {sp}")
        dp = world // sp
        cfg = {"init": {"from_hf": prev}, "model": model,
               "data": {"kind": "tokens" if data else "synthetic", "path": data, "seq_len": L,
                        "micro_batch_size": max(1, tokens_per_step // (L * dp)), "tokenizer": tok_spec},
               "parallel": {"sp": sp},
               "train": {"run_dir": os.path.join(d, "run"), "steps": steps, "lr": lr, "min_lr_ratio": 1.0,
                         "warmup_steps": min(20, steps // 10), "weight_decay": 0.0},
               "checkpoint": {"every": max(1, steps // 4)}}
        full = load_config(base=cfg, overrides=list(overrides or []), world_size=world)  # every stage valid now
        if full.init.from_hf != prev or full.train.run_dir != cfg["train"]["run_dir"]:
            raise ValueError("overrides may not change init.from_hf or train.run_dir: the runner sets them")
        cfg = OmegaConf.to_container(full, resolve=True)
        stages.append({"stage": k, "kind": "train", "length": L, "factor": rope_len / L0,
                       "rope_theta": model["rope_theta"], "rope_scaling": model["rope_scaling"], "sp": sp,
                       "world": world, "steps": steps, "config": cfg,
                       "config_path": os.path.join(d, "config.yaml"), "export": os.path.join(d, "hf")})
        prev = os.path.join(d, "hf")
    args = {"from": from_dir, "target_len": target_len, "method": method, "rope": rope, "per_stage": per_stage,
            "steps": steps, "lr": lr, "tokens_per_step": tokens_per_step, "data": data,
            "max_tokens_per_rank": max_tokens_per_rank, "nproc": nproc, "train_len": train_len,
            "landmark_block": landmark_block if landmark else None, "hybrid": hybrid,
            "transfer_steps": transfer_steps if hybrid else None, "transfer_lr": transfer_lr if hybrid else None,
            "overrides": list(overrides or [])}
    return {"from": from_dir, "method": method, "rope": rope, "original_length": L0, "target_length": target_len,
            "architecture": _arch(hf_cfg, from_dir), "tokenizer": tok_spec, "out": out_abs,
            "landmark": landmark, "hybrid": hybrid, "convert": convert_stage, "stages": stages, "args": args}


def _arch(hf_cfg: Dict[str, Any], folder: str) -> str:
    from longctx.model import hf
    return hf.architecture(hf_cfg, folder)


def _data_overrides(overrides: Optional[Sequence[str]]) -> List[str]:
    return [o for o in (overrides or []) if o.startswith("data.")]


def _plan_json(p: Dict[str, Any]) -> bytes:
    return json.dumps({**p, "stages": [{k: v for k, v in s.items() if k != "config"} for s in p["stages"]]},
                      indent=2).encode()


def write_plan(p: Dict[str, Any], out: str) -> str:
    """plan.json and stage_K/config.yaml under out, written to a temporary folder and renamed."""
    from omegaconf import OmegaConf
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{out} exists and is not empty: choose a new --out folder (nothing was written)")
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        for s in p["stages"]:
            d = os.path.join(tmp, f"stage_{s['stage']}")
            os.makedirs(d)
            OmegaConf.save(OmegaConf.create(s["config"]), os.path.join(d, "config.yaml"))
        with open(os.path.join(tmp, "plan.json"), "wb") as f:
            f.write(_plan_json(p))
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# -- the run -------------------------------------------------------------------------------------
def _fmt_s(s: float) -> str:
    s = max(0.0, float(s))
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f}m" if s < 5400 else f"{s / 3600:.1f}h"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_json(path: str, obj: Any) -> None:
    from longctx.train.files import atomic_write
    atomic_write(path, json.dumps(obj, indent=2).encode())


def _eval_defaults(p: Dict[str, Any], lengths, windows, passkey_lengths, depths, trials, retrieval_k, data, seed):
    L0, N = p["original_length"], p["target_length"]
    if lengths is None:
        lengths = sorted({L0, *[s["length"] for s in p["stages"]], N})
    default_pk = passkey_lengths is None
    if default_pk:
        passkey_lengths = [N]
    ev = {"ppl_lengths": [int(x) for x in lengths], "windows": int(windows),
          "passkey_lengths": [int(x) for x in passkey_lengths], "passkey_depths": [float(d) for d in depths],
          "passkey_trials": int(trials), "retrieval_k": int(retrieval_k) if p["landmark"] else 0,
          "data": _token_prefix(data, "--eval-data") if data else p["args"]["data"], "seed": int(seed)}
    if ev["windows"] < 1 or ev["passkey_trials"] < 1:
        raise ValueError(f"--eval-windows {windows} / --passkey-trials {trials} must be >= 1")
    if ev["retrieval_k"] < 0:
        raise ValueError(f"--retrieval-k {retrieval_k} must be >= 0 (0: exact grouped softmax)")
    if ev["data"] is None and p["tokenizer"] != "byte":
        raise ValueError("--eval-data: the model's tokenizer is not byte-level: give a token file prepared with it")
    from longctx.eval.tasks import retrieval_sample
    from longctx.train.data import load_tokenizer
    tok = load_tokenizer(p["tokenizer"])
    for L in ev["passkey_lengths"]:  # too short for the prompt: refused now, not after the training
        try:
            retrieval_sample("passkey", tok, ev["seed"], L, ev["passkey_depths"][0] if depths else 0.0, 0)
        except ValueError as exc:
            raise ValueError(f"--passkey-lengths {L}{' (default: the target)' if default_pk else ''}: {exc}") from None
    return ev


def extend(from_dir: str, target_len: int, method: str, out: str, *, evaluate: bool = True,
           eval_lengths: Optional[Sequence[int]] = None, eval_windows: int = 4,
           passkey_lengths: Optional[Sequence[int]] = None, passkey_depths: Sequence[float] = (0.0, 0.5, 1.0),
           passkey_trials: int = 5, retrieval_k: int = 4, eval_data: Optional[str] = None, eval_seed: int = 0,
           progress: bool = True, progress_every: float = 15.0, **plan_kwargs) -> Dict[str, Any]:
    """Plan, train every stage, export, evaluate before/after; returns the results dict (also
    DIR/results.json). plan_kwargs: those of plan() (per_stage, steps, lr, tokens_per_step, data,
    max_tokens_per_rank, nproc, rope, train_len, landmark_block, hybrid_layers, hybrid_ratio,
    transfer_steps, transfer_lr, overrides). Evaluation: perplexity at eval_lengths (default
    L0, each stage length, the target) on eval_data (default the training data, else the
    synthetic corpus with another seed), passkey at passkey_lengths (default the target);
    landmark models retrieve the top retrieval_k blocks per head (0: exact grouped softmax)."""
    p = plan(from_dir, target_len, method, out, relative=True, **plan_kwargs)
    p["args"]["eval"] = _eval_defaults(p, eval_lengths, eval_windows, passkey_lengths, passkey_depths,
                                       passkey_trials, retrieval_k, eval_data, eval_seed) if evaluate else None
    out = os.path.abspath(out)
    partial = out + ".partial"
    if os.path.lexists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} exists and is not empty: choose a new folder (nothing was written)")
    say = (lambda msg: print(f"[extend] {msg}", file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if os.path.exists(partial):
        try:
            with open(os.path.join(partial, "plan.json")) as f:
                old = json.load(f).get("args")
        except (OSError, ValueError):
            old = None
        if old != json.loads(json.dumps(p["args"])):
            diff = sorted(k for k in set(old or {}) | set(p["args"]) if (old or {}).get(k) != p["args"].get(k))
            raise FileExistsError(f"{partial} holds an unfinished run with other settings "
                                  f"({', '.join(diff[:4]) or 'unreadable plan.json'}): rerun with its settings to "
                                  f"resume it, or delete {partial}")
        say(f"resuming the unfinished run in {partial}")
    else:
        write_plan(p, partial)
    return _Run(p, partial, out, say, progress_every).run()


class _Run:
    def __init__(self, p: Dict[str, Any], partial: str, out: str, say: Callable[[str], None], every: float):
        self.p, self.dir, self.out, self.say, self.every = p, partial, out, say, every
        self.K = len(p["stages"])
        self.step_s: Dict[int, float] = {}  # seconds per step measured per stage (for the ETA)

    def path(self, rel: str) -> str:
        return os.path.join(self.dir, rel)

    def run(self) -> Dict[str, Any]:
        p, t0 = self.p, time.perf_counter()
        ev = p["args"]["eval"]
        what = {"landmark": f"landmark attention (block {p['landmark']['block']}) + rope {p['rope']}" if p["landmark"]
                else None,
                "hybrid": f"lightning in layers {p['hybrid']['lightning_layers']} + rope {p['rope']}" if p["hybrid"]
                else None}.get(p["method"]) or p["method"]
        self.say(f"{p['from']} -> {self.out}: {what}, {p['original_length']} -> {p['target_length']} tokens, "
                 f"{self.K} training stage(s) of lengths {[s['length'] for s in p['stages']]}")
        res = {"method": p["method"], "rope": p["rope"], "from": p["from"], "original_length": p["original_length"],
               "target_length": p["target_length"], "landmark": p["landmark"], "hybrid": p["hybrid"], "eval": ev}
        if ev:
            res["before"] = self.evaluate(p["from"], "before", 0)
        if p["convert"]:
            res["convert"] = self.convert()
        res["stages"] = [self.train_stage(s) for s in p["stages"]]
        final = p["stages"][-1]["export"]
        if ev:
            res["after"] = self.evaluate(self.path(final), "after", ev["retrieval_k"])
        res["final_model"] = final
        res["seconds_this_run"] = time.perf_counter() - t0
        _write_json(self.path("results.json"), res)
        if not os.path.lexists(self.path("model")):
            os.symlink(final, self.path("model"))
        if os.path.isdir(self.out) and not os.path.islink(self.out) and not os.listdir(self.out):
            os.rmdir(self.out)  # an empty folder made for the run
        if os.path.lexists(self.out):
            raise FileExistsError(f"{self.out} appeared while the run was going: the finished run stays in "
                                  f"{self.dir}")
        os.rename(self.dir, self.out)
        from longctx.train.files import fsync_dir
        fsync_dir(self.out)
        self.say(f"done in {_fmt_s(res['seconds_this_run'])}: final model {self.out}/model "
                 f"({final}), results {self.out}/results.json")
        return {**res, "out": self.out}

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self, folder: str, tag: str, retrieval_k: int) -> Dict[str, Any]:
        from longctx.eval.harness import run_ppl, run_retrieval
        from longctx.eval.lm import load_hf_eval_model
        from longctx.train.data import TokenFile, _check_tokenizer_matches, default_cache_dir, \
            ensure_synthetic_token_file
        ev = self.p["args"]["eval"]
        os.makedirs(self.path("eval"), exist_ok=True)
        t0 = time.perf_counter()
        model, tok, cfg, _ = load_hf_eval_model(folder, retrieval_k=retrieval_k)
        out: Dict[str, Any] = {}
        if ev["ppl_lengths"]:
            if ev["data"]:
                tf = TokenFile(ev["data"])
                _check_tokenizer_matches(tf, tok)
            else:
                n = max(ev["ppl_lengths"]) * ev["windows"] * 2 + 1024
                tf = TokenFile(ensure_synthetic_token_file(cfg.data.cache_dir or default_cache_dir(), 7, n))
            self.say(f"eval {tag}: perplexity at {ev['ppl_lengths']} ({ev['windows']} windows each)")
            r = run_ppl(model, tf.read, tf.n_tokens, ev["ppl_lengths"], ev["windows"],
                        self.path(f"eval/{tag}_ppl.json"), ev["seed"], progress=False, model_name=tag)
            cells = sorted(r["cells"].values(), key=lambda c: c["length"])
            out["ppl"] = {str(c["length"]): c["ppl"] for c in cells}
            out["tail_ppl"] = {str(c["length"]): c["tail_ppl"] for c in cells}
        if ev["passkey_lengths"]:
            self.say(f"eval {tag}: passkey at {ev['passkey_lengths']}, depths {ev['passkey_depths']}, "
                     f"{ev['passkey_trials']} trials each" + (f", retrieval top-{retrieval_k}" if retrieval_k else ""))
            r = run_retrieval("passkey", model, tok, ev["passkey_lengths"], ev["passkey_depths"],
                              ev["passkey_trials"], self.path(f"eval/{tag}_passkey.json"), ev["seed"],
                              progress=False, model_name=tag)
            out["passkey"] = r["accuracy_by_length"]
        out["seconds"] = time.perf_counter() - t0
        cells = ([f"ppl@{L} {v:.3f}" for L, v in out.get("ppl", {}).items()] +
                 [f"passkey@{L} {100 * v:.0f}%" for L, v in out.get("passkey", {}).items()])
        self.say(f"eval {tag}: {', '.join(cells)} ({_fmt_s(out['seconds'])})")
        return out

    # -- stage 0: conversion (and attention transfer) ---------------------------------------------
    def convert(self) -> Dict[str, Any]:
        from longctx.model import hf
        from longctx.train import convert
        p, c = self.p, self.p["convert"]
        summary_path = self.path("stage_0/stage.json")
        if os.path.isfile(self.path(os.path.join(c["export"], "config.json"))):  # the export is the done mark
            self.say(f"stage 0/{self.K} (convert): done earlier, kept")
            with open(summary_path) as f:
                return json.load(f)
        t0 = time.perf_counter()
        os.makedirs(self.path("stage_0"), exist_ok=True)
        src, _ = hf.from_pretrained(p["from"])
        mcfg = hf.folder_model_config(p["from"])
        summary: Dict[str, Any] = {"stage": 0, "kind": "convert"}
        if p["landmark"]:
            model, new_cfg = convert.to_landmark(src, mcfg, p["landmark"]["landmark_id"], p["landmark"]["block"])
            summary["vocab_size"] = [mcfg["vocab_size"], new_cfg["vocab_size"]]
            self.say(f"stage 0/{self.K} (convert): landmark attention in all {new_cfg['n_layers']} layers, landmark "
                     f"id {p['landmark']['landmark_id']} (mean embedding), vocabulary {mcfg['vocab_size']} -> "
                     f"{new_cfg['vocab_size']}")
        else:
            layers = p["hybrid"]["lightning_layers"]
            model, new_cfg = convert.to_hybrid(src, mcfg, layers)
            t = c["transfer"]
            self.say(f"stage 0/{self.K} (convert): lightning attention in layers {layers} (from their q/k/v/o); "
                     f"attention transfer, {t['steps']} steps at length {t['data']['seq_len']}")
            summary["transfer"] = self.transfer(src, model, layers, t)
        summary["seconds"] = time.perf_counter() - t0
        _write_json(summary_path, summary)  # before the export (atomic), which marks the stage done
        self.save(model, new_cfg, self.path(c["export"]))
        return summary

    def transfer(self, teacher, student, layers, t) -> Dict[str, Any]:
        from omegaconf import OmegaConf
        from longctx.train.data import make_sampler
        from longctx.train.transfer import attention_transfer
        import torch
        sampler, _ = make_sampler(OmegaConf.create(t["data"]), None, 0, 1, 0, 1)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        teacher.to(device), student.to(device)
        t0, last = time.perf_counter(), [0.0]

        def log(step, loss, per_layer):
            now = time.perf_counter()
            if now - last[0] >= self.every or step in (1, t["steps"]):
                last[0] = now
                rate = (now - t0) / step
                self.say(f"stage 0/{self.K} (transfer): step {step}/{t['steps']}, loss {loss:.4f} (relative MSE; "
                         f"per layer " + ", ".join(f"{i}: {v:.3f}" for i, v in per_layer.items()) +
                         f"), ETA {_fmt_s(rate * (t['steps'] - step))}")
        batch = lambda step: {k: v.to(device) for k, v in sampler.batch(step).items()}  # noqa: E731
        res = attention_transfer(teacher, student, layers, batch, t["steps"], t["lr"], log=log)
        student.to("cpu")
        return res

    def save(self, model, model_cfg, folder: str) -> None:
        from longctx.model import hf
        tok_dir = self.p["from"] if any(os.path.isfile(os.path.join(self.p["from"], n))
                                        for n in hf.TOKENIZER_FILES) else None
        mixers = set(model_cfg["mixers"] if isinstance(model_cfg, dict) else model_cfg.mixers)
        if mixers == {"softmax"}:
            hf.save_pretrained(model, model_cfg, folder, tokenizer_dir=tok_dir, arch=self.p["architecture"])
        else:
            hf.save_native(model, model_cfg, folder, tokenizer_dir=tok_dir,
                           landmark_id=self.p["landmark"]["landmark_id"] if self.p["landmark"] else None)

    # -- training stages ---------------------------------------------------------------------------
    def train_stage(self, s: Dict[str, Any]) -> Dict[str, Any]:
        k, K = s["stage"], self.K
        d = self.path(f"stage_{k}")
        summary_path = os.path.join(d, "stage.json")
        if os.path.isfile(os.path.join(self.path(s["export"]), "config.json")):  # the export is the done mark
            self.say(f"stage {k}/{K}: done earlier, kept")
            with open(summary_path) as f:
                return json.load(f)
        rope = s["rope_scaling"]["rope_type"] if self.p["rope"] != "theta" else f"theta {s['rope_theta']:.4g}"
        self.say(f"stage {k}/{K}: train length {s['length']} ({rope}, x{s['factor']:g}), {s['steps']} steps, "
                 f"{s['world']} process(es), sp {s['sp']}")
        t0 = time.perf_counter()
        self._train(s, d)
        train_s = time.perf_counter() - t0
        model, cfg, step = self._final_weights(s, d)
        from longctx.train.metrics import read_jsonl
        recs = read_jsonl(os.path.join(d, "run", "metrics.jsonl"))
        summary = {"stage": k, "kind": "train", "length": s["length"], "sp": s["sp"], "world": s["world"],
                   "steps": step, "seconds": time.perf_counter() - t0, "train_seconds": train_s,
                   "loss_first": recs[0]["loss"] if recs else None, "loss_last": recs[-1]["loss"] if recs else None,
                   "export": s["export"]}
        _write_json(summary_path, summary)  # before the export (atomic), which marks the stage done
        self.save(model, cfg.model, self.path(s["export"]))
        self.say(f"stage {k}/{K}: done in {_fmt_s(summary['seconds'])}, loss "
                 f"{summary['loss_first'] if recs else float('nan'):.4f} -> "
                 f"{summary['loss_last'] if recs else float('nan'):.4f}; exported {s['export']}")
        return summary

    def _train(self, s: Dict[str, Any], d: str) -> None:
        rel_cfg = os.path.relpath(self.path(s["config_path"]), self.dir)
        train_args = ["-m", "longctx.cli", "train", rel_cfg, "--resume", "auto", "train.progress=false"]
        if s["world"] > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={s['world']}", "--nnodes=1",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}"] + train_args
        else:
            cmd = [sys.executable] + train_args
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join([pkg_root] + [x for x in [env.get("PYTHONPATH")] if x])
        log_path = os.path.join(d, "train.log")
        metrics = os.path.join(d, "run", "metrics.jsonl")
        k, K, steps = s["stage"], self.K, s["steps"]
        with open(log_path, "ab") as log:
            log.write(f"\n$ (cd {self.dir} && {' '.join(cmd)})\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=log, stderr=subprocess.STDOUT)
            t0, last_print, seen = time.perf_counter(), 0.0, 0
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    now = time.perf_counter()
                    if now - last_print < self.every:
                        continue
                    rec = _last_record(metrics)
                    if rec and rec.get("step", 0) > seen:
                        seen = rec["step"]
                        last_print = now
                        self.step_s[k] = rec.get("step_s") or (now - t0) / seen
                        self.say(f"stage {k}/{K}: step {seen}/{steps}, loss {rec['loss']:.4f}, "
                                 f"{self.step_s[k]:.2f} s/step, ETA stage {_fmt_s(self.step_s[k] * (steps - seen))}, "
                                 f"all stages ~{_fmt_s(self._eta(k, seen))}")
            except BaseException:  # Ctrl-C / kill: let the trainer checkpoint and stop (SIGTERM), then go
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=300)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                raise
        if proc.returncode != 0:
            raise ExtendError(f"stage {k}/{K} (length {s['length']}): training failed (exit {proc.returncode}): "
                              f"{_error_line(log_path)}; log: {log_path}; the unfinished run stays in {self.dir}: "
                              f"rerun the same command to resume from the stage's last checkpoint")

    def _eta(self, k: int, done: int) -> float:
        """Seconds left for this and the later stages: this stage's s/step, scaled by length for
        the later ones (tokens per step are the same; attention costs grow with the length)."""
        cur = self.p["stages"][k - 1]
        rate = self.step_s[k]
        left = rate * (cur["steps"] - done)
        for s in self.p["stages"][k:]:
            left += rate * s["steps"] * s["length"] / cur["length"]
        return left

    def _final_weights(self, s: Dict[str, Any], d: str):
        from longctx.config import load_config
        from longctx.model.transformer import DecoderLM
        from longctx.train import checkpoint as ckpt
        folder = ckpt.newest_complete(os.path.join(d, "run", "checkpoints"), verify=True)
        meta = ckpt.read_meta(folder) if folder else {}
        if meta.get("step") != s["steps"]:
            raise ExtendError(f"stage {s['stage']}/{self.K}: the trainer exited without a final checkpoint (newest "
                              f"complete: {folder}, step {meta.get('step')} of {s['steps']}); log: "
                              f"{os.path.join(d, 'train.log')}; rerun the same command to resume")
        cfg = load_config(self.path(s["config_path"]))
        model = DecoderLM(cfg.model)
        model.load_state_dict(ckpt.consolidated_state_dict(folder), strict=True)
        return model.eval(), cfg, meta["step"]


def _last_record(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _error_line(log_path: str) -> str:
    """The trainer's one-line `error: ...` if it printed one, else the log's last line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [x.strip() for x in f.read().splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    errs = [x for x in lines if x.startswith("error:")]
    return (errs[-1] if errs else lines[-1] if lines else "(empty log)")[:500]
