"""The planner (longctx/train/planner.py, `longctx plan`): its activation + workspace prediction
is within 25% of the measured peak tensor bytes of a training forward + backward
(`peak_tensor_bytes`: torch's allocator events, the same quantity the planner predicts, not
the resident size) for small configs; its FLOPs equal a hand count; a step that will not fit is
refused before anything is allocated, with the numbers and settings that would fit."""
import os
import subprocess
import sys

import pytest
import torch

from longctx.config import load_config
from longctx.model.transformer import DecoderLM, flops_per_token
from longctx.train import planner
from longctx.train.metrics import peak_tensor_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny-cpu.yaml")
LEAN = ["model.loss_chunk=1024", "model.mlp_tile=1024", "model.activation_checkpointing=true"]


@pytest.fixture
def one_thread():
    """One thread, as the calibration ran (torch's CPU kernels size per-thread buffers); the
    previous count restored after (other modules' peaks depend on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def measured(cfg, L):
    torch.manual_seed(0)
    m = DecoderLM(cfg.model)
    if cfg.train.precision == "bf16":
        m = m.bfloat16()
    m.train()
    ids = torch.randint(0, 259, (1, L), generator=torch.Generator().manual_seed(1))
    return peak_tensor_bytes(lambda: m(ids, None, ids.roll(-1, 1))[0].backward())[1]


def predicted(cfg, L):
    p = planner.plan(cfg, 1, L)
    _, s = planner._act_dtype(cfg)
    return p.tensor_peak_bytes + p.params * s  # activations, workspaces, and the gradients autograd makes


@pytest.mark.parametrize("ov, L", [
    (["model.mixers=[softmax]", "model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=2"],
     8192),
    (["model.mixers=[lightning,swa,memory]", "model.n_layers=3", "model.d_model=128", "model.n_heads=2",
      "model.n_kv_heads=null", "model.memory.recompute=1024", "model.memory.max_lr=0.005", "train.precision=bf16"],
     8192),
], ids=["softmax_fp32", "hybrid_bf16"])
def test_activation_prediction_within_25_percent(ov, L, one_thread):
    cfg = load_config(TINY, [*ov, *LEAN, "model.max_seq_len=16384", f"data.seq_len={L}", "data.micro_batch_size=1"])
    got, want = measured(cfg, L), predicted(cfg, L)
    assert 0.75 < want / got < 1.25, (want / 2 ** 20, got / 2 ** 20)


def test_flops_equal_hand_count():
    d, H, F, V, T = 8, 2, 16, 10, 6
    cfg = load_config(TINY, [f"model.d_model={d}", f"model.n_heads={H}", "model.n_kv_heads=null",
                             f"model.ffn_hidden={F}", f"model.vocab_size={V}", "model.n_layers=4",
                             "model.mixers=[softmax,lightning,swa,memory]", "model.swa_window=4",
                             "model.memory.depth=1", "model.memory.chunk=2", f"data.seq_len={T}",
                             "data.micro_batch_size=1", "model.max_seq_len=64", "train.grad_accum=1"])
    p = planner.plan(cfg, 1)
    hd, c = d // H, 2
    per_token = {  # forward FLOPs per token, counted by hand
        "softmax projections": 2 * 4 * d * d,                       # q, k, v, o: 2 FLOPs per weight
        "softmax mixing": 2 * T * d,                                # causal QK^T and AV: 2 * (T/2) * d each
        "lightning projections": 2 * 5 * d * d,                     # q, k, v, gate, out
        "lightning mixing": H * (4 * 64 * hd + 4 * hd * hd),        # chunk-64 tiles and states per head
        "swa projections": 2 * 4 * d * d,
        "swa mixing": 4 * 4 * d,                                    # QK^T and AV over a window of 4 keys
        "memory projections": 2 * (5 * d * d + 3 * H * d),          # qkv, gate (g), out, and 3 gates per head
        "memory mixing": H * (10 * hd * hd + 4 * c * hd + 2 * c * c),
        "mlp": 4 * 2 * 3 * d * F,                                   # gate, up, down in 4 layers
        "head": 2 * d * V,
    }
    want = {k: 3 * v * T for k, v in per_token.items()}             # forward + backward = 3 x forward
    assert p.flops == pytest.approx(want, rel=1e-12)
    assert p.model_flops == pytest.approx(flops_per_token(cfg.model, T) * T, rel=1e-12)
    # executed with block checkpointing: one more forward of every block, and the tiled MLP's
    # gate/up recomputed once more in its backward
    ck = load_config(TINY, [f"model.d_model={d}", f"model.n_heads={H}", "model.n_kv_heads=null",
                            f"model.ffn_hidden={F}", f"model.vocab_size={V}", "model.n_layers=1",
                            "model.mixers=[softmax]", f"data.seq_len={T}", "data.micro_batch_size=1",
                            "model.activation_checkpointing=true", "model.mlp_tile=4"])
    q = planner.plan(ck, 1)
    block_fwd = per_token["softmax projections"] + per_token["softmax mixing"] + 2 * 3 * d * F
    assert q.flops_executed_rank == pytest.approx((4 * block_fwd + 4 * d * F + 6 * d * V) * T, rel=1e-12)


def test_memory_components_and_layer_order():
    cfg = load_config(os.path.join(ROOT, "configs", "million-cpu.yaml"))
    p = planner.plan(cfg, 2)
    assert p.tokens_per_rank == 1 << 19 and p.precision == "bf16"
    assert set(p.memory) >= {"parameters", "gradients", "optimizer", "activations", "workspaces", "communication",
                             "process"}
    assert p.memory["activations"] > 0.8 * sum(p.memory.values())
    # more data-parallel ranks: each rank still holds half a sequence; twice the length (or
    # half the SP degree): activations double, workspaces stay
    q = planner.plan(cfg, 4)
    assert q.tokens_per_rank == p.tokens_per_rank and q.memory["activations"] == p.memory["activations"]
    assert planner.plan(cfg, 2, 1 << 21).memory["activations"] / p.memory["activations"] == pytest.approx(2, rel=0.05)
    # with the memory handed rank to rank (not Ulysses over heads, which holds gathered buffers)
    h = planner.plan(load_config(os.path.join(ROOT, "configs", "million-cpu.yaml"), ["model.memory.sp_mode=handoff"]), 2)
    r = planner.plan(load_config(os.path.join(ROOT, "configs", "million-cpu.yaml"), ["parallel.sp=1"]), 1)
    assert r.memory["activations"] / h.memory["activations"] == pytest.approx(2, rel=0.05)
    assert r.memory["workspaces"] == pytest.approx(p.memory["workspaces"], rel=0.01)
    assert p.memory["activations"] > h.memory["activations"]
    assert p.flops_sequential_rank == 0 < h.flops_sequential_rank  # Ulysses: no hand-off chain


def run_cli(*args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "longctx.cli", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=120)


def test_plan_cli_prints_and_judges_fit():
    ok = run_cli("plan", "configs/million-cpu.yaml", "--world-size", "2", "--memory-gib", "200")
    assert ok.returncode == 0, ok.stderr
    for what in ("memory per rank:", "activations", "FLOPs per step", "lightning mixing", "fits: 2 rank(s)"):
        assert what in ok.stdout, what
    bad = run_cli("plan", "configs/million-cpu.yaml", "--world-size", "2", "--seq-len", "4194304", "--memory-gib", "20")
    assert bad.returncode == 1
    assert "will not fit" in bad.stderr and "GiB per rank" in bad.stderr
    assert "parallel.sp=" in bad.stderr  # more SP ranks (on more machines) is offered


def test_train_refuses_before_allocating(tmp_path):
    """A length the planner says will not fit stops `longctx train` at start-up: the refusal
    names the prediction, the budget and settings that would fit, and comes before the model,
    the data or DeepSpeed exist (the start-up line that follows building them never appears)."""
    proc = run_cli("train", "configs/tiny-cpu.yaml", "data.seq_len=65536", "model.max_seq_len=65536",
                   "data.micro_batch_size=1", f"train.run_dir={tmp_path}/run", "--memory-gib", "2.5",
                   env={"LONGCTX_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "error: data.seq_len=65536 will not fit: the planner predicts" in err
    assert "but 2.50 GiB is available" in err
    assert "settings that would fit: model.activation_checkpointing=true" in err
    assert "params," not in err  # "longctx: ... M params ..." is logged once the model is built
    assert not os.path.exists(tmp_path / "cache")  # no data was prepared
