"""Evaluation sequence-parallel: the LM adapter sharded over 2 and 3 ranks (Ulysses, zigzag
ring) gives the single process's greedy tokens and per-token NLL (a length that pads)."""
import numpy as np
import pytest
import torch

from mp import run_world

from longctx.config import load_config
from longctx.eval.lm import LMEval
from longctx.model.transformer import DecoderLM
from longctx.parallel.groups import build_mesh

OV = ["model.d_model=96", "model.n_layers=2", "model.n_heads=6", "model.n_kv_heads=3"]
IDS = np.random.default_rng(1).integers(0, 259, size=61)


def model():
    cfg = load_config("configs/tiny-cpu.yaml", OV)
    torch.manual_seed(0)
    return DecoderLM(cfg.model), cfg


def worker(rank, world, ulysses, layout):
    m, cfg = model()
    lm = LMEval(m, cfg, build_mesh(world, ulysses).sp_handle(layout), layout, ulysses)
    return lm.generate(IDS[:40], 4), lm.nll_per_token(IDS, chunk=8)


@pytest.mark.parametrize("world, ulysses, layout", [(2, 1, "zigzag"), (3, 3, "contiguous")], ids=["ring2", "ulysses3"])
def test_sp_eval_equals_one_process(world, ulysses, layout):
    m, cfg = model()
    ref = LMEval(m, cfg)
    gen, nll = ref.generate(IDS[:40], 4), ref.nll_per_token(IDS)
    for g, n in run_world(world, worker, ulysses, layout):
        assert g == gen
        assert np.abs(n - nll).max() < 1e-4, np.abs(n - nll).max()
