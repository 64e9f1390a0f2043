"""Staged context extension of a Hugging Face model: the plan and one config per stage.

`longctx extend --from HF_DIR --target-len N --method M --out DIR` writes, under DIR:
  plan.json                     the stages (length, rope settings, sequence-parallel degree, paths)
  stage_K/config.yaml           a normal training config: `longctx train stage_K/config.yaml`
Stage 1 starts from HF_DIR (`init.from_hf`); stage K > 1 starts from stage K-1's export
(stage_{K-1}/hf, written by `longctx.model.hf.save_pretrained`), so each stage may use another
sequence-parallel degree. Lengths grow by `per_stage` (4x) per stage up to the target.

Methods (L0: the model's trained length, L: the stage length, s = L / L0):
  pi      linear position interpolation, factor s
  ntk     dynamic NTK, factor s (the base rises with the current length)
  yarn    YaRN, factor s, original_max_position_embeddings L0
  llama3  llama3 scaling, factor s, low/high frequency factors 1 / 4
  theta   base raising ("ABF"): theta_L = theta_0 * s^(d/(d-2)) (the NTK-aware base), plain RoPE
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from typing import Any, Dict, List, Optional

METHODS = ("yarn", "ntk", "pi", "llama3", "theta")
LATER = ("landmark", "hybrid")


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
    """model.* rope keys for one stage of length L."""
    s = L / L0
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


def plan(from_dir: str, target_len: int, method: str, out: str, per_stage: float = 4.0, steps: int = 200,
         lr: float = 2e-5, tokens_per_step: int = 65536, data: Optional[str] = None,
         max_tokens_per_rank: Optional[int] = None) -> Dict[str, Any]:
    """The stages and their configs (as dicts), every config validated; nothing written."""
    from longctx.config import load_config
    from longctx.model import hf
    if method in LATER:
        raise ValueError(f"--method {method}: landmark and hybrid conversion are not available yet; "
                         f"use one of {', '.join(METHODS)}")
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not known: use one of {', '.join(METHODS)}")
    src = hf.model_config(hf.read_hf_config(from_dir), from_dir)
    if src["rope_scaling"]["rope_type"] != "default":
        raise ValueError(f"{from_dir} already uses rope_type={src['rope_scaling']['rope_type']}: the recipe "
                         f"extends models with plain RoPE only")
    L0, theta0, hd = src["max_seq_len"], src["rope_theta"], src["d_model"] // src["n_heads"]
    tok = os.path.join(from_dir, "tokenizer.json")
    out = os.path.abspath(out)
    stages, prev = [], os.path.abspath(from_dir)
    for k, L in enumerate(stage_lengths(L0, target_len, per_stage), 1):
        d = os.path.join(out, f"stage_{k}")
        model = {**src, **rope_for(method, L0, L, theta0, hd), "max_seq_len": L}
        cfg = {"init": {"from_hf": prev}, "model": model,
               "data": {"kind": "tokens" if data else "synthetic", "path": data, "seq_len": L,
                        "micro_batch_size": max(1, tokens_per_step // L),
                        "tokenizer": tok if os.path.isfile(tok) else "byte"},
               "parallel": {"sp": sp_for(L, max_tokens_per_rank)},
               "train": {"run_dir": os.path.join(d, "run"), "steps": steps, "lr": lr, "min_lr_ratio": 1.0,
                         "warmup_steps": min(20, steps // 10), "weight_decay": 0.0},
               "checkpoint": {"every": max(1, steps // 4)}}
        load_config(base=cfg)  # every stage valid now, not when its turn comes
        stages.append({"stage": k, "length": L, "factor": L / L0, "rope_theta": model["rope_theta"],
                       "rope_scaling": model["rope_scaling"], "sp": cfg["parallel"]["sp"], "config": cfg,
                       "config_path": os.path.join(d, "config.yaml"), "export": os.path.join(d, "hf")})
        prev = os.path.join(d, "hf")
    return {"from": os.path.abspath(from_dir), "method": method, "original_length": L0, "target_length": target_len,
            "stages": stages}


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
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump({**p, "stages": [{k: v for k, v in s.items() if k != "config"} for s in p["stages"]]}, f,
                      indent=2)
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
