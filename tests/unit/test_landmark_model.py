"""Landmark mixer and retrieval inference: streaming group by group with a block cache equals the
full grouped-softmax forward when k covers every block (original or compressed positions, with
a lightning layer carrying state beside it); bad use of the cache is refused."""
import numpy as np
import pytest
import torch

from longctx.config import load_config
from longctx.model.landmark import RetrievalStream, insert_landmarks, select_groups
from longctx.model.transformer import DecoderLM

BLOCK, LM_ID = 5, 258


def model(mixers, extra=()):
    cfg = load_config("configs/tiny-cpu.yaml", ["model.d_model=64", "model.n_layers=2", "model.n_heads=4",
                                                 "model.n_kv_heads=2", f"model.mixers={mixers}",
                                                 f"model.landmark_block={BLOCK}", *extra])
    torch.manual_seed(0)
    return DecoderLM(cfg.model).eval()


def stream_ids(n_regular, seed=0):
    ids = np.random.default_rng(seed).integers(0, 256, size=n_regular)
    return insert_landmarks(ids, BLOCK, LM_ID)


YARN = ("model.rope_scaling.rope_type=yarn", "model.rope_scaling.factor=4")


@pytest.mark.parametrize("mixers, extra", [("[landmark]", ()), ("[lightning,landmark]", ()), ("[landmark]", YARN)],
                         ids=["landmark", "hybrid", "landmark-yarn"])
@pytest.mark.parametrize("compressed", [False, True])
def test_stream_with_all_blocks_equals_full_forward(mixers, extra, compressed):
    """(With YaRN both paths must rotate with the scaled frequencies and attention factor.)"""
    m = model(mixers, extra)
    ids = stream_ids(37)  # 7 full groups and a partial one
    with torch.no_grad():
        full = m.hidden(torch.as_tensor(ids)[None], None or _ctx(len(ids)))
    s = RetrievalStream(m, BLOCK, LM_ID, top_k=100, compressed_positions=compressed)
    got = torch.cat([s.feed(ids[:3]), s.feed(ids[3:17]), s.feed(ids[17:])], 1)  # uneven pieces
    assert torch.allclose(got, full, atol=1e-5, rtol=1e-5), float((got - full).abs().max())


@pytest.mark.parametrize("compressed", [False, True])
def test_local_window_is_always_attended(compressed):
    """A local window covering every group with top_k=1 is the full forward (each group at its
    true distance); without the window, k=1 is not."""
    m = model("[landmark]")
    ids = stream_ids(37)
    with torch.no_grad():
        full = m.hidden(torch.as_tensor(ids)[None], _ctx(len(ids)))
    local = RetrievalStream(m, BLOCK, LM_ID, top_k=1, compressed_positions=compressed, local_groups=100).feed(ids)
    assert torch.allclose(local, full, atol=1e-5, rtol=1e-5), float((local - full).abs().max())
    alone = RetrievalStream(m, BLOCK, LM_ID, top_k=1, compressed_positions=compressed, local_groups=0).feed(ids)
    assert float((alone - full).abs().max()) > 1e-3


def test_select_groups_keeps_the_local_window_whatever_the_scores():
    s = torch.tensor([[5.0, 1.0, 4.0, -2.0, 3.0, 0.0]])  # 6 older groups; the window's 2 are not scored
    assert select_groups(s, 2, 2).tolist() == [[0, 2, 6, 7]]  # top-2 in order, then groups 6 and 7
    assert select_groups(torch.tensor([[float("nan"), float("inf"), 1.0]]), 1, 1).tolist() == [[0, 3]]
    assert select_groups(s[:, :0], 3, 0).tolist() == [[0, 1, 2]]  # every group local
    # in the stream: 8 groups, window 2, k = 1 attends 3 groups per head, the latest two always
    m = model("[landmark]")
    st = RetrievalStream(m, BLOCK, LM_ID, top_k=1, local_groups=2)
    seen = []
    import longctx.model.landmark as L
    orig = L.select_groups
    L.select_groups = lambda s_, n, k: seen.append((s_.shape[-1], n, k)) or orig(s_, n, k)
    try:
        st.feed(stream_ids(8 * BLOCK + 1))
    finally:
        L.select_groups = orig
    assert seen[-1] == (6, 2, 1)  # the last call: 6 older groups scored, 2 local, k = 1


def _ctx(T):
    from longctx.model.transformer import SeqContext
    return SeqContext(positions=torch.arange(T)[None])


def test_offloaded_cache_and_small_k_keep_memory_bounded():
    m = model("[landmark]")
    ids = stream_ids(60)
    s = RetrievalStream(m, BLOCK, LM_ID, top_k=2, offload=True)
    s.feed(ids)
    cache = s.state["landmark_cache_0"]
    assert cache.n_groups == 11 and cache.stacked("blk_k").device.type == "cpu"  # the 12th landmark has not come
    assert cache.stacked("blk_k").shape == (1, 2, 11, BLOCK, 16)  # block K/V kept per group, landmark keys apart
    assert cache.stacked("lm_k").shape == (1, 2, 11, 16)
    out = s.generate(np.arange(10) % 256, 4)
    assert len(out) == 4 and all(0 <= t < 320 for t in out)


def test_generate_inserts_landmarks_and_matches_full_greedy():
    m = model("[landmark]")
    prompt = np.random.default_rng(1).integers(0, 256, size=23)
    s = RetrievalStream(m, BLOCK, LM_ID, top_k=100, compressed_positions=False)
    got = s.generate(prompt, 6)
    regular = list(prompt)
    for _ in range(6):  # greedy with the full forward over the landmark layout
        ids = insert_landmarks(np.asarray(regular), BLOCK, LM_ID)
        if len(ids) % (BLOCK + 1) == BLOCK:
            ids = np.append(ids, LM_ID)
        with torch.no_grad():
            logits = m(torch.as_tensor(ids)[None])[0, -1]
        regular.append(int(logits.argmax()))
    assert got == regular[len(prompt):]


def test_batched_generation_equals_each_row_alone_and_cache_regrows():
    """Rows decoded in step (each row and head picks its own blocks) give what each row gives
    alone; 130 regular tokens = 26 groups also make the cache outgrow its first 16 slots when no
    capacity is known (feed), with the same result as a cache sized up front (generate)."""
    m = model("[landmark]")
    rows = np.random.default_rng(2).integers(0, 256, size=(3, 130))
    s = RetrievalStream(m, BLOCK, LM_ID, top_k=2)
    together = s.generate(rows, 5)
    assert s.state["landmark_cache_0"].capacity >= s.state["landmark_cache_0"].n_groups > 16
    for r, got in zip(rows, together):
        assert RetrievalStream(m, BLOCK, LM_ID, top_k=2).generate(r, 5) == got
    grown = RetrievalStream(m, BLOCK, LM_ID, top_k=2)
    h = grown.feed(insert_landmarks(rows[0], BLOCK, LM_ID))
    assert grown.state["landmark_cache_0"].capacity == 0 and grown.state["landmark_cache_0"].n_groups > 16
    sized = RetrievalStream(m, BLOCK, LM_ID, top_k=2)
    sized.state["landmark_retrieval"]["capacity"] = 40
    assert torch.equal(sized.feed(insert_landmarks(rows[0], BLOCK, LM_ID)), h)


def test_bad_use():
    with pytest.raises(ValueError, match="cannot carry state"):
        RetrievalStream(model("[softmax,landmark]"), BLOCK, LM_ID)
    with pytest.raises(ValueError, match="top_k=0"):
        RetrievalStream(model("[landmark]"), BLOCK, LM_ID, top_k=0).feed(stream_ids(3))
    with pytest.raises(ValueError, match="local_groups=-1"):
        RetrievalStream(model("[landmark]"), BLOCK, LM_ID, local_groups=-1).feed(stream_ids(3))
    s = RetrievalStream(model("[landmark]"), BLOCK, LM_ID)
    s.feed(stream_ids(3))
    s.pos = 0  # out of order
    with pytest.raises(ValueError, match="expects position 3"):
        s.feed(stream_ids(3))


@pytest.mark.parametrize("extra", [(), YARN], ids=["rope", "yarn"])
def test_compressed_selection_scores_equal_roped_landmarks(extra):
    """Selection with compressed positions scores every landmark as if it sat at base - 1: the
    rotated-query form equals roping the landmarks there and the queries at their positions."""
    from longctx.model.landmark import _rope_at, compressed_selection_scores
    mixer = model("[landmark]", extra).layers[0].mixer
    torch.manual_seed(1)
    B, n, C, base = 2, 4, 7, 30
    q = torch.randn(B, mixer.n_heads, n, mixer.head_dim, dtype=torch.float64)
    lm = torch.randn(B, mixer.n_kv_heads, C, mixer.head_dim, dtype=torch.float64)
    q_pos = base + torch.arange(n)
    got = compressed_selection_scores(mixer, q, q_pos - (base - 1), lm)
    G = mixer.n_heads // mixer.n_kv_heads
    qr = _rope_at(mixer, q, q_pos).view(B, mixer.n_kv_heads, G, n, -1)
    kr = _rope_at(mixer, lm, torch.full((C,), base - 1))
    want = torch.einsum("bhgqd,bhcd->bhgqc", qr, kr)
    assert got.shape == want.shape == (B, mixer.n_kv_heads, G, n, C)
    # equal up to the rounding of RoPE's cos / sin tables, which are computed in float32 (angles
    # of up to ~33 rad: ~2e-6 rad of error each)
    assert torch.allclose(got, want, atol=2e-5 * float(want.abs().max()), rtol=0)
    # and not by accident: scoring at another distance gives other scores
    off = compressed_selection_scores(mixer, q, q_pos - (base - 3), lm)
    assert not torch.allclose(off, want, atol=1e-2 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize("extra", [(), YARN, ("model.rope_scaling.rope_type=linear", "model.rope_scaling.factor=2"),
                                   ("model.rope_scaling.rope_type=dynamic", "model.rope_scaling.factor=2")],
                         ids=["rope", "yarn", "linear", "dynamic"])
def test_stream_rope_table_equals_direct_rope(extra):
    """The stream's table of cos / sin (LandmarkCache.rope_table, grown past its first size) ropes
    as computing the angles per call does, with and without autograd (apply_rope_nograd's three
    passes equal apply_rope); dynamic NTK, whose frequencies depend on each call's largest
    position, has no table."""
    from longctx.model.landmark import LandmarkCache, _rope_at, compressed_selection_scores
    mixer = model("[landmark]", extra).layers[0].mixer
    cache = LandmarkCache(BLOCK, top_k=2)
    torch.manual_seed(2)
    x = torch.randn(2, mixer.n_heads, 6, mixer.head_dim, dtype=torch.float64)
    lm = torch.randn(2, mixer.n_kv_heads, 5, mixer.head_dim, dtype=torch.float64)
    dynamic = "dynamic" in " ".join(extra)
    for pos in (torch.arange(3, 9), torch.tensor([0, 1500, 7, 2047, 40, 4000])):  # the second grows it
        want = _rope_at(mixer, x, pos)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                got = _rope_at(mixer, x, pos, cache)
            assert torch.allclose(got, want, rtol=0, atol=1e-12), (grad, pos)
        assert (cache.rope_table(mixer, x.dtype, x.device, 1) is None) == dynamic
        if not dynamic:
            assert cache.rope_table(mixer, x.dtype, x.device, 1)[0].shape[0] >= int(pos.max()) + 1
        want_s = compressed_selection_scores(mixer, x, pos, lm)
        assert torch.allclose(compressed_selection_scores(mixer, x, pos, lm, cache), want_s, rtol=0, atol=1e-12)
    if not dynamic:  # one table per dtype, sized by need only: switching dtypes neither grows nor drops one
        size = cache.rope_table(mixer, torch.float64, x.device, 1)[0].shape[0]
        for dt in (torch.float32, torch.float64, torch.float32, torch.float64):
            assert cache.rope_table(mixer, dt, x.device, 10)[0].dtype == dt
        assert cache.rope_table(mixer, torch.float64, x.device, 1)[0].shape[0] == size
        assert cache.rope_table(mixer, torch.float32, x.device, 1)[0].shape[0] == 512
    # original positions run to the stream's length: no table
    assert LandmarkCache(BLOCK, top_k=2, compressed_positions=False).rope_table(mixer, x.dtype, x.device, 1) is None


@pytest.mark.parametrize("mixers", ["[landmark]", "[lightning,landmark]"], ids=["landmark", "hybrid"])
def test_ragged_and_shared_prefix_generation_equal_each_row_alone(mixers):
    """Prompts of different lengths decode in step (a short row feeds its own greedy tokens while
    the long ones feed theirs), and generate_shared's trunk + fork (prefixes computed once, for
    landmark caches and a lightning layer's carried state) give every row what it gets alone."""
    m = model(mixers)
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=70)
    prompts = [np.concatenate([base[:d], rng.integers(0, 256, size=n)]) for d, n in
               [(40, 12), (7, 30), (40, 3), (66, 4), (23, 23), (0, 15), (40, 12)]]
    prompts.append(base[:52].copy())  # a prompt that is a prefix of others
    prompts[6] = prompts[0].copy()  # two equal prompts
    alone = [RetrievalStream(m, BLOCK, LM_ID, top_k=2).generate(p, 4) for p in prompts]
    assert RetrievalStream(m, BLOCK, LM_ID, top_k=2).generate(prompts[:4], 4) == alone[:4]
    for batch in (1, 3, 8):
        seen = []
        got = RetrievalStream.generate_shared(m, BLOCK, LM_ID, prompts, 4, batch, progress=seen.append, top_k=2)
        assert got == alone, batch
        assert sum(seen) == len(prompts) and max(seen) <= batch
    # eos stops a row early; the others go on
    eos = alone[1][1]
    got = RetrievalStream(m, BLOCK, LM_ID, top_k=2).generate(prompts[:3], 4, eos_id=eos)
    cut = lambda o: o[:o.index(eos)] if eos in o else o  # noqa: E731
    assert got == [cut(o) for o in alone[:3]] and len(got[1]) < 4


def test_fork_copies_every_row_and_refuses_what_it_cannot_copy():
    m = model("[landmark]")
    ids = stream_ids(23)
    trunk = RetrievalStream(m, BLOCK, LM_ID, top_k=2)
    trunk.feed(ids)
    two = trunk.fork(2, capacity=10)
    more = insert_landmarks(np.arange(11) % 256, BLOCK, LM_ID, trunk.pos)
    h2 = two.feed(np.stack([more, more]))
    h1 = trunk.feed(more)
    assert torch.allclose(h2, h1.expand(2, -1, -1), atol=1e-6) and two.state["landmark_cache_0"].capacity == 10
    with pytest.raises(ValueError, match="fork a one-row stream"):
        two.fork(3)
    trunk.state["other"] = object()
    with pytest.raises(ValueError, match="'other'"):
        trunk.fork(2)
    assert RetrievalStream(m, BLOCK, LM_ID).generate(np.arange(5), 0) == []
    with pytest.raises(ValueError, match="batch=0"):
        RetrievalStream.generate_shared(m, BLOCK, LM_ID, [np.arange(5)], 2, 0)


@pytest.mark.parametrize("dtype, extra", [(torch.float64, ()), (torch.float32, ()), (torch.float64, YARN),
                                          (torch.float32, ("model.rope_scaling.rope_type=dynamic",
                                                           "model.rope_scaling.factor=2"))],
                         ids=["f64", "f32", "f64-yarn", "f32-dynamic-ntk"])
@pytest.mark.parametrize("offload", [False, True])
def test_fused_retrieval_equals_torch_path(dtype, extra, offload):
    """The C helper's gather + RoPE and grouped softmax (fused, the default on CPU) against the
    torch path, streaming past the local window so that top-k picks (GQA: 2 query heads per KV
    head); float64 to 1e-12, float32 within its rounding (the C exp is ~1 ulp)."""
    from longctx.kernels.landmark_cpu import available
    assert available()[0], available()[1]  # else both runs would take the torch path
    m = model("[landmark]", extra).to(dtype)
    ids = np.stack([stream_ids(23 * BLOCK + 3, seed=4), stream_ids(23 * BLOCK + 3, seed=5)])  # 2 rows
    outs = [RetrievalStream(m, BLOCK, LM_ID, top_k=2, offload=offload, fused=f).feed(ids) for f in (True, False)]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(outs[0], outs[1], atol=tol, rtol=tol), float((outs[0] - outs[1]).abs().max())


def test_fused_retrieval_helpers_refuse_bad_input():
    from longctx.kernels.landmark_cpu import combine_scores, gather_blocks
    buf = torch.randn(1, 2, 6, 3, 4)
    with pytest.raises(ValueError, match="outside 0..5"):
        gather_blocks(buf, torch.tensor([[[[0, 6]], [[1, 2]]]]))
    with pytest.raises(ValueError, match="int64"):
        gather_blocks(buf, torch.zeros(1, 2, 1, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\(6, 4\)"):
        gather_blocks(buf, torch.zeros(1, 2, 1, 2, dtype=torch.int64), torch.ones(5, 4), torch.ones(5, 4))
    got = gather_blocks(buf, torch.tensor([[[[5, 0]], [[1, 1]]]]))
    assert torch.equal(got[0, 0, 0, 0], buf[0, 0, 5]) and torch.equal(got[0, 1, 0, 1], buf[0, 1, 1])
    with pytest.raises(ValueError, match="leading dims"):
        combine_scores(torch.zeros(2, 3), torch.zeros(2, 2, 4), torch.zeros(2, 3))
