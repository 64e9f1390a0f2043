"""Hugging Face import and export for LLaMA-family models (Llama, Mistral, Qwen2).

Import reads config.json and safetensors (one file, or shards listed in
model.safetensors.index.json) without `transformers`; export writes a folder that
`transformers` loads with the same logits. Our parameter names already follow Hugging Face
below the block level (q_proj ... down_proj), so the mapping is a handful of prefixes.

RoPE: both the transformers 4 keys (`rope_theta`, `rope_scaling`) and the transformers 5 key
(`rope_parameters`, with rope_theta inside) are read; export writes all three so either major
version loads the folder. `max_position_embeddings` on export is model.max_seq_len (the new
context), except for dynamic NTK: transformers' dynamic formula takes max_position_embeddings
as the trained length, so there it is written as rope_scaling.original_max_position_embeddings.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_TYPE_TO_ARCH = {v: k for k, v in MODEL_TYPES.items()}
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
# Keys of transformers' rope dict that each of our rope types reads (export writes only these).
_ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                       "attention_factor", "mscale", "mscale_all_dim", "truncate"),
              "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}


class HFFormatError(ValueError):
    """A Hugging Face folder we cannot read or write, in one line: which file / key / tensor."""


# -- config ----------------------------------------------------------------------------------
def read_hf_config(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise HFFormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        return json.load(f)


def architecture(hf: Dict[str, Any], folder: str = "") -> str:
    """The supported architecture named by config.json (`architectures`, else `model_type`)."""
    archs = hf.get("architectures") or ([_TYPE_TO_ARCH[hf["model_type"]]] if hf.get("model_type") in _TYPE_TO_ARCH
                                        else [f"model_type={hf.get('model_type')!r}"])
    for a in archs:
        if a in SUPPORTED:
            return a
    raise HFFormatError(f"{folder}/config.json: architecture {', '.join(map(str, archs))} is not supported; "
                        f"supported: {', '.join(SUPPORTED)}")


def _rope_from_hf(hf: Dict[str, Any]) -> Tuple[float, Dict[str, Any]]:
    """(rope_theta, our model.rope_scaling dict) from transformers 4 or 5 keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling")
    if legacy:  # transformers 5 also lets rope_scaling win over rope_parameters
        params = {**params, **legacy}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, {"rope_type": "default"}
    if kind not in _ROPE_KEYS:
        raise HFFormatError(f"config.json: rope_type={kind!r} is not supported; supported: default, "
                            f"{', '.join(_ROPE_KEYS)}")
    out = {"rope_type": kind}
    out.update({k: params[k] for k in _ROPE_KEYS[kind] if params.get(k) is not None})
    if kind == "dynamic":  # transformers' dynamic NTK: max_position_embeddings is the trained length
        out["original_max_position_embeddings"] = hf["max_position_embeddings"]
    elif kind in ("yarn", "llama3"):
        out.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    if kind == "yarn" and "factor" not in out:
        out["factor"] = hf["max_position_embeddings"] / out["original_max_position_embeddings"]
    return theta, out


def _window(hf: Dict[str, Any], arch: str) -> Optional[int]:
    """The sliding-window length that transformers applies, or None."""
    if arch == "MistralForCausalLM":
        return hf.get("sliding_window", 4096)  # transformers' default when the key is absent
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        return hf.get("sliding_window", 4096)
    return None


def model_config(hf: Dict[str, Any], folder: str = "") -> Dict[str, Any]:
    """Our model.* keys for a Hugging Face config.json (unsupported features refused by name)."""
    arch = architecture(hf, folder)
    where = f"{folder}/config.json"
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFFormatError(f"{where}: hidden_act={act!r} is not supported (the MLP is SwiGLU): need 'silu'")
    hd = hf.get("head_dim")
    if hd is not None and hd != d // heads:
        raise HFFormatError(f"{where}: head_dim={hd} differs from hidden_size/num_attention_heads={d // heads}; "
                            f"such models are not supported")
    if hf.get("mlp_bias"):
        raise HFFormatError(f"{where}: mlp_bias=true is not supported (the MLP has no biases)")
    if arch == "LlamaForCausalLM" and hf.get("attention_bias"):
        raise HFFormatError(f"{where}: attention_bias=true (biases on q, k, v and o) is not supported; "
                            f"q/k/v-only biases are (Qwen2ForCausalLM)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFFormatError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported (need 1)")
    theta, scaling = _rope_from_hf(hf)
    max_len = int(hf.get("max_position_embeddings", 4096))
    if scaling["rope_type"] != "default" and "original_max_position_embeddings" in scaling:
        max_len = max(max_len, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
    window = _window(hf, arch)
    if window is not None:
        max_len = min(max_len, int(window))  # up to the window, full causal attention is exact
    return {
        "vocab_size": hf["vocab_size"], "d_model": d, "n_layers": hf["num_hidden_layers"], "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads, "ffn_hidden": hf["intermediate_size"],
        "mixers": ["softmax"], "rope_theta": theta, "rope_scaling": scaling, "max_seq_len": max_len,
        "sliding_window": window, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attn_bias": arch == "Qwen2ForCausalLM", "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    }


def _validated_model_cfg(mcfg: Dict[str, Any]):
    from longctx.config import load_config
    return load_config(base={"model": mcfg, "data": {"seq_len": min(256, mcfg["max_seq_len"])}}).model


# -- weights ---------------------------------------------------------------------------------
def hf_name(ours: str) -> str:
    """Our parameter name -> the Hugging Face one."""
    if ours == "embed.weight":
        return "model.embed_tokens.weight"
    if ours == "head.weight":
        return "lm_head.weight"
    if ours == "norm.weight":
        return "model.norm.weight"
    _, i, rest = ours.split(".", 2)  # layers.{i}.rest
    rest = (rest.replace("mixer.", "self_attn.", 1).replace("attn_norm.", "input_layernorm.", 1)
            .replace("mlp_norm.", "post_attention_layernorm.", 1))
    return f"model.layers.{i}.{rest}"


def _weight_files(folder: str) -> Dict[str, str]:
    """Hugging Face tensor name -> safetensors file holding it (every file checked to exist)."""
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, shard)):
                names = [k for k, v in weight_map.items() if v == shard]
                raise HFFormatError(f"{folder}: shard {shard} listed in {INDEX} is missing ({len(names)} tensors, "
                                    f"e.g. {names[0]})")
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    single = os.path.join(folder, SINGLE)
    if not os.path.isfile(single):
        raise HFFormatError(f"{folder}: no {SINGLE} or {INDEX} (only safetensors weights are read; convert "
                            f"pytorch_model.bin with transformers' save_pretrained)")
    from safetensors import safe_open
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _read_tensors(files: Dict[str, str], names) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) for the requested names, opening each file once."""
    from safetensors import safe_open
    by_file: Dict[str, list] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    for path, ns in by_file.items():
        with safe_open(path, framework="pt") as f:
            for n in ns:
                yield n, f.get_tensor(n)


def load_hf_weights(model, folder: str) -> None:
    """Copy a Hugging Face folder's weights into `model` (a DecoderLM of matching config).

    Every parameter must be found with its exact shape; extra tensors other than rotary caches
    and a tied lm_head are refused. Raises HFFormatError naming the tensor, expected vs found."""
    files = _weight_files(folder)
    want = {hf_name(n): (n, p) for n, p in model.state_dict().items()}
    missing = sorted(set(want) - set(files))
    if missing:
        raise HFFormatError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} missing in all)"
                            + (": config.json's tie_word_embeddings=false needs lm_head.weight"
                               if missing[0] == "lm_head.weight" else ""))
    ignorable = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if model.head is None else ())
    extra = sorted(k for k in set(files) - set(want) if not k.endswith(ignorable))
    if extra:
        raise HFFormatError(f"{folder}: unexpected tensor {extra[0]} ({len(extra)} unexpected in all): the "
                            f"weights do not match config.json")
    with torch.no_grad():
        for name, t in _read_tensors(files, want):
            ours, p = want[name]
            if tuple(t.shape) != tuple(p.shape):
                raise HFFormatError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)} "
                                    f"(from the model config, as {ours})")
            p.copy_(t.to(p.dtype))


def from_pretrained(folder: str, dtype: torch.dtype = torch.float32):
    """(DecoderLM in eval mode, validated model config node) from a local Hugging Face folder
    or a folder in our own format (save_native)."""
    from longctx.model.transformer import DecoderLM
    cfg = _validated_model_cfg(folder_model_config(folder))
    model = DecoderLM(cfg)
    load_hf_weights(model, folder)
    return model.to(dtype).eval(), cfg


def check_matches(model_cfg, folder: str) -> None:
    """For init.from_hf: model.* shapes must be those of the folder's config.json (ConfigError)."""
    from longctx.config import ConfigError
    from longctx.model.mixers import layer_mixers
    hf = read_hf_config(folder)
    theirs = native_model_config(hf, folder) if is_native(hf) else model_config(hf, folder)
    keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings", "attn_bias")
    ours = {k: model_cfg[k] if k != "n_kv_heads" else (model_cfg.n_kv_heads or model_cfg.n_heads) for k in keys}
    theirs = {**theirs, "n_kv_heads": theirs.get("n_kv_heads") or theirs["n_heads"]}
    diff = [f"model.{k}={ours[k]!r} but {folder} has {theirs[k]!r}" for k in keys if ours[k] != theirs[k]]
    if diff:
        raise ConfigError(f"init.from_hf: {'; '.join(diff[:3])}: copy model.* from "
                          f"`longctx.model.hf.folder_model_config` (or `longctx extend` configs)")
    if is_native(hf):  # our own format: the same mixer in every layer (and the same landmark block)
        mine = layer_mixers(list(model_cfg.mixers), model_cfg.n_layers)
        saved = layer_mixers(list(theirs["mixers"]), theirs["n_layers"])
        if mine != saved:
            raise ConfigError(f"init.from_hf: model.mixers gives layers {mine} but {folder} holds {saved}: use "
                              f"model.mixers: {saved}")
        if "landmark" in mine and model_cfg.landmark_block != theirs["landmark_block"]:
            raise ConfigError(f"init.from_hf: model.landmark_block={model_cfg.landmark_block} but {folder} was "
                              f"trained with {theirs['landmark_block']}: use {theirs['landmark_block']}")
        return
    if any(m != "softmax" for m in model_cfg.mixers):
        raise ConfigError(f"init.from_hf: model.mixers={list(model_cfg.mixers)}: Hugging Face weights fill "
                          f"softmax attention layers only")


# -- export ----------------------------------------------------------------------------------
def hf_config(model_cfg, arch: str = "LlamaForCausalLM") -> Dict[str, Any]:
    """config.json for our model config under a supported architecture."""
    from longctx.model.rope import scaling_key
    m = model_cfg
    if arch not in SUPPORTED:
        raise HFFormatError(f"architecture {arch!r} cannot be written; supported: {', '.join(SUPPORTED)}")
    if m.attn_bias and arch != "Qwen2ForCausalLM":
        raise HFFormatError(f"model.attn_bias=true (q/k/v biases) exports only as Qwen2ForCausalLM, not {arch}")
    if not m.attn_bias and arch == "Qwen2ForCausalLM":
        raise HFFormatError("Qwen2ForCausalLM has q/k/v biases: export a model with model.attn_bias=true, or "
                            "choose LlamaForCausalLM")
    bad = sorted({x for x in m.mixers if x != "softmax"})
    if bad:
        raise HFFormatError(f"model.mixers has {', '.join(bad)}: only softmax-attention models export to "
                            f"{arch}; save_native writes our own format for the others")
    scaling = dict(scaling_key(m))
    kind = scaling.get("rope_type", "default")
    max_pos = m.max_seq_len
    rope = {"rope_type": "default"}
    if kind != "default":
        rope = {"rope_type": kind, **{k: scaling[k] for k in _ROPE_KEYS[kind] if k in scaling}}
        if kind == "dynamic":  # transformers reads the trained length from max_position_embeddings
            max_pos = scaling["original_max_position_embeddings"]
    out = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": m.vocab_size,
        "hidden_size": m.d_model, "intermediate_size": _ffn(m), "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads or m.n_heads,
        "head_dim": m.d_model // m.n_heads, "hidden_act": "silu", "max_position_embeddings": max_pos,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": bool(m.tie_embeddings),
        "rope_theta": float(m.rope_theta), "rope_scaling": None if kind == "default" else rope,
        "rope_parameters": {**rope, "rope_theta": float(m.rope_theta)},
        "torch_dtype": "float32", "dtype": "float32", "bos_token_id": None, "eos_token_id": None,
    }
    if arch == "LlamaForCausalLM":
        out.update({"attention_bias": False, "mlp_bias": False})
    elif arch == "MistralForCausalLM":
        out["sliding_window"] = m.sliding_window
    else:
        out.update({"use_sliding_window": False, "sliding_window": None})
    return out


def _ffn(m) -> int:
    from longctx.model.layers import llama_ffn_hidden
    return m.ffn_hidden or llama_ffn_hidden(m.d_model)


def save_pretrained(model, cfg, out_dir: str, tokenizer_dir: Optional[str] = None,
                    arch: Optional[str] = None) -> str:
    """Write config.json + model.safetensors (+ tokenizer files from tokenizer_dir) to out_dir.

    cfg: the full config, its model node or a dict of model.* keys. arch: the architecture to write; default Qwen2 for
    q/k/v biases, Mistral when a sliding window is set, Llama otherwise. The folder is written
    under a temporary name beside out_dir and renamed at the end, so out_dir appears only
    complete; an existing non-empty out_dir is refused."""
    m = _model_node(cfg)
    arch = arch or ("Qwen2ForCausalLM" if m.attn_bias else "MistralForCausalLM" if m.sliding_window else
                    "LlamaForCausalLM")
    _check_free(out_dir)
    config = hf_config(m, arch)  # validates before anything touches the disk
    return _write_folder(model, config, out_dir, tokenizer_dir)


def _model_node(cfg):
    """The model.* node of a full config, a model node, or a dict of model.* keys."""
    from omegaconf import OmegaConf
    if isinstance(cfg, dict):
        return OmegaConf.create(cfg.get("model", cfg) if "d_model" not in cfg else cfg)
    return cfg.model if hasattr(cfg, "model") and not hasattr(cfg, "d_model") else cfg


def _check_free(out_dir: str) -> None:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise HFFormatError(f"{out_dir} exists and is not empty: choose a new folder (nothing was written)")


def _write_folder(model, config: Dict[str, Any], out_dir: str, tokenizer_dir: Optional[str]) -> str:
    """config.json + model.safetensors (Hugging Face tensor names) + tokenizer files, written
    under a temporary name beside out_dir and renamed into place."""
    from safetensors.torch import save_file
    from longctx.train.files import fsync_dir
    out_dir = os.path.abspath(out_dir)
    _check_free(out_dir)
    tensors = {hf_name(n): t.detach().to("cpu", torch.float32).contiguous().clone()
               for n, t in model.state_dict().items()}
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, SINGLE), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if tokenizer_dir:
            _copy_tokenizer(tokenizer_dir, tmp)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(tmp, out_dir)
        fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _copy_tokenizer(src: str, dst: str) -> None:
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if not found:
        raise HFFormatError(f"tokenizer folder {src} has none of {', '.join(TOKENIZER_FILES[:4])}")
    for n in found:
        shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))


# -- our own format: models that transformers cannot express -----------------------------------
# Landmark attention, lightning (hybrid) and memory layers have no transformers equivalent. Such
# a model is saved like a Hugging Face folder (config.json, model.safetensors with the same
# tensor names, tokenizer files), but config.json names architecture LongctxForCausalLM /
# model_type "longctx" — so transformers refuses it instead of loading something else — and
# carries our whole model config under "longctx_model" (see docs/hf.md, "Our own format").
NATIVE_ARCH, NATIVE_TYPE, NATIVE_VERSION = "LongctxForCausalLM", "longctx", 1


def is_native(hf: Dict[str, Any]) -> bool:
    """Whether a config.json dict is in our own format (written by save_native)."""
    return "longctx_model" in hf or hf.get("model_type") == NATIVE_TYPE


def native_model_config(hf: Dict[str, Any], folder: str = "") -> Dict[str, Any]:
    """Our model.* keys from a config.json in our own format."""
    where = f"{folder}/config.json"
    version = hf.get("longctx_format")
    if version != NATIVE_VERSION or not isinstance(hf.get("longctx_model"), dict):
        raise HFFormatError(f"{where}: longctx_format={version!r} with longctx_model "
                            f"{'present' if 'longctx_model' in hf else 'missing'}: this version reads format "
                            f"{NATIVE_VERSION} (written by longctx.model.hf.save_native)")
    return dict(hf["longctx_model"])


def folder_model_config(folder: str) -> Dict[str, Any]:
    """Our model.* keys for a folder: a Hugging Face one (Llama, Mistral, Qwen2) or our own format."""
    hf = read_hf_config(folder)
    return native_model_config(hf, folder) if is_native(hf) else model_config(hf, folder)


def folder_landmark_id(folder: str) -> Optional[int]:
    """The landmark token id a folder's model was trained with (None: no landmark layers)."""
    hf = read_hf_config(folder)
    return int(hf["longctx_landmark"]["landmark_id"]) if is_native(hf) and hf.get("longctx_landmark") else None


def native_config(model_cfg, landmark_id: Optional[int] = None) -> Dict[str, Any]:
    """config.json in our own format for a model config (node or dict)."""
    from omegaconf import OmegaConf
    from longctx.model.mixers import layer_mixers
    m = model_cfg if isinstance(model_cfg, dict) else OmegaConf.to_container(model_cfg, resolve=True)
    mixers = layer_mixers(list(m["mixers"]), m["n_layers"])
    out = {"architectures": [NATIVE_ARCH], "model_type": NATIVE_TYPE, "longctx_format": NATIVE_VERSION,
           "longctx_model": m, "longctx_mixers": mixers,
           # informational (Hugging Face names); longctx_model is what is read back
           "vocab_size": m["vocab_size"], "hidden_size": m["d_model"], "num_hidden_layers": m["n_layers"],
           "num_attention_heads": m["n_heads"], "num_key_value_heads": m["n_kv_heads"] or m["n_heads"],
           "max_position_embeddings": m["max_seq_len"], "torch_dtype": "float32"}
    if "landmark" in mixers:
        if landmark_id is None or not 0 <= int(landmark_id) < m["vocab_size"]:
            raise HFFormatError(f"a landmark model needs landmark_id in [0, vocab_size={m['vocab_size']}) (the "
                                f"tokenizer's landmark_id), got {landmark_id!r}")
        out["longctx_landmark"] = {"block": m["landmark_block"], "landmark_id": int(landmark_id)}
    elif landmark_id is not None:
        raise HFFormatError(f"landmark_id={landmark_id} given but no layer of {mixers} is landmark")
    return out


def save_native(model, cfg, out_dir: str, tokenizer_dir: Optional[str] = None,
                landmark_id: Optional[int] = None) -> str:
    """Write a model of any mixers in our own format: config.json (architecture
    LongctxForCausalLM, our model config under longctx_model, landmark settings under
    longctx_landmark) + model.safetensors (Hugging Face tensor names) + tokenizer files.
    from_pretrained, init.from_hf and `longctx eval --hf` read it back; transformers does not.
    Written under a temporary name and renamed, as save_pretrained."""
    _check_free(out_dir)
    return _write_folder(model, native_config(_model_node(cfg), landmark_id), out_dir, tokenizer_dir)
