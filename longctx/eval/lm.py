"""Our checkpoints as evaluation models: greedy generation and per-token NLL, in one process or
sequence-parallel (launched like training: every rank of one SP group runs the same calls;
inputs are sharded with the training layouts and padded; the logits of the last real token
come from the rank that holds it).

No KV cache yet: each generated token re-runs the prompt (answers are a few tokens long).
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from longctx.model.transformer import DecoderLM, SeqContext
from longctx.parallel.sharding import local_index, shard_batch


def _available_bytes() -> int:
    from longctx.train.metrics import available_bytes
    n = available_bytes()
    return (1 << 62) if n is None else n  # unknown: do not refuse


class LMEval:
    """model: a DecoderLM (eval mode); sp: an SPHandle or None; layout/ulysses as in training."""

    def __init__(self, model: DecoderLM, cfg, sp=None, layout: str = "contiguous", ulysses: int = 1,
                 device: Optional[torch.device] = None, eos_id: Optional[int] = None,
                 landmark_id: Optional[int] = None, retrieval_k: int = 0, retrieval_local: Optional[int] = None):
        self.model, self.cfg, self.sp, self.layout, self.ulysses = model.eval(), cfg, sp, layout, ulysses
        self.device = device or torch.device("cpu")
        self.eos_id = eos_id
        self.P = sp.size if sp is not None else 1
        self.rank = sp.rank if sp is not None else 0
        # Landmark models read prompts in the landmark layout; retrieval_k > 0 streams them
        # through the block cache (the local window of retrieval_local latest groups, default
        # landmark.LOCAL_GROUPS, and the top-k older blocks per head), 0 runs the exact grouped softmax.
        self.landmark_block = cfg.model.landmark_block if "landmark" in cfg.model.mixers else 0
        if self.landmark_block and landmark_id is None:
            raise ValueError("a landmark model needs the tokenizer's landmark_id")
        self.landmark_id, self.retrieval_k = landmark_id, retrieval_k
        if retrieval_k and not self.landmark_block:
            raise ValueError(f"retrieval_k={retrieval_k}: only landmark models retrieve blocks")
        from longctx.model.landmark import LOCAL_GROUPS
        self.retrieval_local = LOCAL_GROUPS if retrieval_local is None else int(retrieval_local)
        if self.retrieval_local < 0:
            raise ValueError(f"retrieval_local={retrieval_local}: use >= 0 latest groups always attended "
                             f"(default {LOCAL_GROUPS})")

    # -- what fits ---------------------------------------------------------------------------
    def bytes_needed(self, n: int) -> int:
        """Estimated peak bytes of one forward over n tokens on one rank (no gradients): the
        residual stream and a block's largest intermediates (attention projections, MLP
        hidden), a margin of 2x for the allocator; plus the weights."""
        m = self.cfg.model
        ffn = m.ffn_hidden or 0
        if not ffn:
            from longctx.model.layers import llama_ffn_hidden
            ffn = llama_ffn_hidden(m.d_model)
        per_token = 4 * (6 * m.d_model + 3 * ffn)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return int(2 * per_token * (-(-n // self.P)) + weights)

    def check_length(self, n: int) -> None:
        need, have = self.bytes_needed(n), _available_bytes()
        if need > 0.8 * have:
            gib = 1 << 30
            raise ValueError(f"length {n} needs about {need / gib:.1f} GiB per rank (estimate) but "
                             f"{have / gib:.1f} GiB is available: use shorter lengths or more sequence-parallel "
                             f"ranks (launch P processes with parallel.sp=P)")

    # -- forward pieces ----------------------------------------------------------------------
    def _hidden(self, ids: np.ndarray):
        """(hidden (1, L_local, D), positions (L_local,)) of this rank's shard of ids."""
        T = len(ids)
        x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
        batch = {"input_ids": x, "positions": torch.arange(T)[None]}
        if self.sp is not None:
            batch = shard_batch(batch, self.P, self.rank, self.layout, self.ulysses)
        ctx = SeqContext(positions=batch["positions"].to(self.device), sp=self.sp)
        with torch.no_grad():
            h = self.model.hidden(batch["input_ids"].to(self.device), ctx)
        return h, batch["positions"][0]

    def _owner(self, T: int, pos: int) -> int:
        for r in range(self.P):
            if pos in set(local_index(T, self.P, r, self.layout, self.ulysses).tolist()):
                return r
        raise AssertionError(pos)

    def next_token(self, ids: np.ndarray) -> int:
        h, pos = self._hidden(ids)
        T = len(ids)
        tok = torch.zeros(1, dtype=torch.long)
        hit = (pos == T - 1).nonzero()
        if len(hit):
            logits = torch.nn.functional.linear(h[0, int(hit[0])], self.model.head_weight)
            tok[0] = int(logits.argmax())
        if self.sp is not None:
            src = dist.get_global_rank(self.sp.group, self._owner(T, T - 1))
            dist.broadcast(tok, src=src, group=self.sp.group)
        return int(tok[0])

    def generate(self, prompt_ids: np.ndarray, max_new_tokens: int) -> List[int]:
        if self.landmark_block:
            return self._generate_landmark(prompt_ids, max_new_tokens)
        ids = list(np.asarray(prompt_ids, dtype=np.int64))
        out: List[int] = []
        for _ in range(max_new_tokens):
            t = self.next_token(np.asarray(ids))
            if self.eos_id is not None and t == self.eos_id:
                break
            out.append(t)
            ids.append(t)
        return out

    def _generate_landmark(self, prompt_ids: np.ndarray, max_new_tokens: int) -> List[int]:
        from longctx.model.landmark import RetrievalStream, insert_landmarks
        B, W = self.landmark_block, self.landmark_block + 1
        if self.retrieval_k:
            if self.sp is not None:
                raise ValueError("retrieval inference runs on one rank: launch one process for --retrieval-k")
            return RetrievalStream(self.model, B, self.landmark_id, self.retrieval_k,
                                   local_groups=self.retrieval_local).generate(
                prompt_ids, max_new_tokens, self.eos_id)
        regular, out = list(np.asarray(prompt_ids, dtype=np.int64)), []
        for _ in range(max_new_tokens):
            ids = insert_landmarks(np.asarray(regular), B, self.landmark_id)
            if len(ids) % W == B:  # the group is full: its landmark precedes the next token
                ids = np.append(ids, self.landmark_id)
            t = self.next_token(ids)
            if self.eos_id is not None and t == self.eos_id:
                break
            out.append(t)
            regular.append(t)
        return out

    def nll_per_token(self, ids: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """-log p(ids[t+1] | ids[:t+1]) for t < len(ids) - 1, float64 (len(ids) - 1,). Logits are
        formed chunk by chunk (never the whole (L, vocab) matrix).

        Landmark models read ids in the landmark layout (a landmark after every block regular
        tokens, as in training): each regular token is predicted from the position just before
        it, which is the landmark when one precedes it; landmarks themselves are not scored, so
        the count (and the perplexity's meaning) is that of a plain model. With retrieval_k the
        layout streams through the block cache (top-k blocks per head)."""
        if self.landmark_block:
            return self._nll_landmark(np.asarray(ids, dtype=np.int64), chunk)
        T = len(ids) - 1
        h, pos = self._hidden(ids[:-1])
        return self._nll(h, pos, ids, T, chunk)

    def _nll_landmark(self, ids: np.ndarray, chunk: int) -> np.ndarray:
        from longctx.model.landmark import RetrievalStream, insert_landmarks
        B, W = self.landmark_block, self.landmark_block + 1
        lay = insert_landmarks(ids, B, self.landmark_id)  # never ends with a landmark
        n = len(lay) - 1  # input positions 0..n-1; position p predicts lay[p + 1]
        scored = (np.arange(1, n + 1) % W) != B  # the next position holds a regular token
        if self.retrieval_k:
            if self.sp is not None:
                raise ValueError("retrieval inference runs on one rank: launch one process for --retrieval-k")
            h = RetrievalStream(self.model, B, self.landmark_id, self.retrieval_k,
                                local_groups=self.retrieval_local).feed(lay[:-1])
            pos = torch.arange(n)
        else:
            h, pos = self._hidden(lay[:-1])
        nll = self._nll(h, pos, lay, n, chunk)
        out = nll[scored]
        assert out.size == len(ids) - 1
        return out

    @torch.no_grad()
    def _nll(self, h, pos, ids, T: int, chunk: int) -> np.ndarray:
        """Per-position -log p(ids[p + 1]) for positions 0..T-1 (h, pos: this rank's shard)."""
        target = torch.as_tensor(np.asarray(ids, dtype=np.int64))[1:]
        real = pos < T
        nll = torch.zeros(len(pos), dtype=torch.float64)
        for a in range(0, len(pos), chunk):
            lg = torch.nn.functional.linear(h[0, a:a + chunk], self.model.head_weight).double()
            tg = target[pos[a:a + chunk].clamp_max(T - 1)].to(lg.device)
            nll[a:a + chunk] = (torch.logsumexp(lg, -1) - lg.gather(1, tg[:, None])[:, 0]).cpu()
        if self.sp is None:
            return nll.numpy()
        from longctx.parallel.sharding import gather
        full = gather(torch.where(real, nll, torch.zeros_like(nll))[None], T, self.sp.group, self.P,
                      self.layout, self.ulysses, dim=1)
        return full[0].numpy()

    def nll(self, ids: np.ndarray):
        v = self.nll_per_token(ids)
        return float(v.sum()), int(v.size)


def load_eval_model(path: str, overrides: Optional[List[str]] = None, retrieval_k: int = 0):
    """(LMEval, tokenizer, cfg, name) for a run folder / checkpoint folder. Under a launcher
    with several processes, the processes form one sequence-parallel group (parallel.sp =
    world size) with the config's sp_ulysses / sp_ring / layout."""
    from longctx.config import load_config
    from longctx.train import checkpoint as ckpt
    folder = ckpt.resolve_folder(path)
    meta = ckpt.read_meta(folder)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    over = list(overrides or [])
    if world > 1 and not any(o.startswith("parallel.sp=") for o in over):
        over.append(f"parallel.sp={world}")
    cfg = load_config(base=meta["config"], overrides=over)

    def weights(model):
        missing, unexpected = model.load_state_dict(ckpt.consolidated_state_dict(folder), strict=False)
        if missing or unexpected:
            raise ckpt.CheckpointError(f"{folder}: weights do not match the saved config (missing {missing[:3]}, "
                                       f"unexpected {unexpected[:3]})")

    name = f"{os.path.basename(os.path.dirname(os.path.dirname(folder))) or folder}@{os.path.basename(folder)}"
    return _eval_model(cfg, weights, name, retrieval_k)


def load_hf_eval_model(folder: str, overrides: Optional[List[str]] = None, retrieval_k: int = 0,
                       retrieval_local: Optional[int] = None):
    """(LMEval, tokenizer, cfg, name) for a Hugging Face model folder or one in our own format
    (landmark / hybrid models: model/hf.py save_native); its tokenizer.json when present, else
    the byte tokenizer. retrieval_k: landmark models retrieve the top-k blocks (0: exact), beside
    a local window of retrieval_local groups (None: LOCAL_GROUPS)."""
    from longctx.config import load_config
    from longctx.model import hf
    mcfg = hf.folder_model_config(folder)
    tok = os.path.join(folder, "tokenizer.json")
    base = {"model": mcfg, "data": {"seq_len": min(256, mcfg["max_seq_len"]),
                                    "tokenizer": tok if os.path.isfile(tok) else "byte"}}
    over = list(overrides or [])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not any(o.startswith("parallel.sp=") for o in over):
        over.append(f"parallel.sp={world}")
    cfg = load_config(base=base, overrides=over)
    saved_id = hf.folder_landmark_id(folder)
    if saved_id is not None:
        from longctx.train.data import load_tokenizer
        tok_id = load_tokenizer(cfg.data.tokenizer).landmark_id
        if tok_id != saved_id:
            raise ValueError(f"{folder}: the model was trained with landmark_id={saved_id} but its tokenizer "
                             f"({cfg.data.tokenizer}) reserves {tok_id}: the folder's tokenizer files do not "
                             f"belong to this model")
    return _eval_model(cfg, lambda model: hf.load_hf_weights(model, folder),
                       f"hf:{os.path.basename(os.path.abspath(folder))}", retrieval_k, retrieval_local)


def _eval_model(cfg, load_weights, name: str, retrieval_k: int = 0, retrieval_local: Optional[int] = None):
    """Build the model of `cfg`, fill it with load_weights(model), set up sequence parallelism."""
    from longctx.config import sp_degrees, sp_layout
    from longctx.parallel.groups import build_mesh, init_distributed
    from longctx.train.data import load_tokenizer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sp = None
    ulysses, _ = sp_degrees(cfg.parallel)
    layout = sp_layout(cfg)
    if world > 1 or cfg.parallel.sp > 1:
        init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        if dist.get_world_size() != cfg.parallel.sp:
            raise ValueError(f"evaluation runs one sequence-parallel group: launch parallel.sp={cfg.parallel.sp} "
                             f"processes (got {dist.get_world_size()})")
        sp = build_mesh(cfg.parallel.sp, ulysses).sp_handle(layout)
    model = DecoderLM(cfg.model)
    load_weights(model)
    tok = load_tokenizer(cfg.data.tokenizer)
    return (LMEval(model, cfg, sp, layout, ulysses, eos_id=None, landmark_id=tok.landmark_id, retrieval_k=retrieval_k,
                   retrieval_local=retrieval_local),
            tok, cfg, name)
