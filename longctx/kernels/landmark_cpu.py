"""Landmark attention's grouped softmax on CPU with the elementwise middle fused in C.

The torch path (landmark_torch.py, the specification) turns a tile's scores into weights with
~8 full passes over a (rows x keys) tensor (max, subtract, exp, sum, scale, scatter, a strided
copy for the value product); on a 2-core CPU those passes cost more than the matrix products
(528 tokens x batch 8 x 4 heads, fp32: forward 25 ms, backward 50 ms, against 26 ms for torch's
causal SDPA forward + backward). Here the matrix products stay in torch (BLAS) and one C pass
per row does the rest: forward, scores -> weights and lse (read s once, write P once);
backward, scores + dP -> dS, P and the landmarks' gradients (one pass over the three).

The C source below is compiled once per machine with the system C compiler (gcc / cc, -O3
-march=native) into a cache folder (LONGCTX_CACHE, default ~/.cache/longctx), keyed by the
source, the flags and the CPU's model and flags; rows are split over torch.get_num_threads()
OpenMP threads of the runtime torch runs on (see _FLAGS). `available()`
says whether it loaded and why not; landmark_attn's backend "auto" uses it for float32 / float64
CPU tensors and warns once when it cannot (then the torch path runs: same numbers, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

_SRC = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for float32 that the compiler vectorises (libm's expf is a call per element: the whole
   cost of the pass). Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for
   e^r, 2^n from the exponent bits; relative error ~1.2e-7 (about 1 ulp, as torch's vectorised
   exp). Below -87.3 it returns 0 (no denormals: under 1.2e-38 off); from ~88.38 up +inf (2^128
   overflows the exponent bits: torch gives finite values up to 88.72); -inf -> 0, NaN -> NaN.
   The callers pass only x <= 0 (scores minus their max or lse). */
static inline float exp_f32(float x) {
    const float lo = -87.33654f, hi = 88.72283f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    float y = p * scale;
    y = x < lo ? 0.0f : y;
    y = x > hi ? INFINITY : y;
    return x != x ? x : y;
}

/* Row r of a tile: query position i = qs + r % bq in group b = i / W (W = blk + 1). s: the row's
   scores against keys 0..ke-1 (ld_s apart; landmark columns included); p: ng * blk weights of
   the regular keys. lse: the logsumexp of the row's own-group keys j <= i and the earlier
   groups' landmarks, computed as torch.logsumexp does (shift by the max unless it is infinite). */
#define LM_DEFINE(T, SUF, EXP, LOG, TINY)                                                          \
static T lse_row_##SUF(const T* sr, int64_t i, int64_t b, int64_t W, int64_t blk, int64_t ke) {    \
    const int64_t lo = b * W;                                                                      \
    int64_t hi = lo + blk; if (hi > i + 1) hi = i + 1; if (hi > ke) hi = ke;                       \
    T m = -INFINITY;                                                                               \
    for (int64_t j = lo; j < hi; ++j) if (sr[j] > m) m = sr[j];                                    \
    for (int64_t c = 0; c < b; ++c) if (sr[c * W + blk] > m) m = sr[c * W + blk];                  \
    const T sh = isinf(m) ? (T)0 : m;                                                              \
    T acc = 0;                                                                                     \
    for (int64_t j = lo; j < hi; ++j) acc += EXP(sr[j] - sh);                                      \
    for (int64_t c = 0; c < b; ++c) acc += EXP(sr[c * W + blk] - sh);                              \
    return LOG(acc) + m;                                                                           \
}                                                                                                  \
/* an earlier group: e_j = exp(s_j - max) into e, returns sum_j e_j; max 0 when not finite */      \
static T group_exp_##SUF(const T* g, T* e, int64_t blk) {                                         \
    T mx = -INFINITY;                                                                              \
    _Pragma("omp simd reduction(max:mx)")                                                          \
    for (int64_t j = 0; j < blk; ++j) mx = g[j] > mx ? g[j] : mx;                                  \
    if (!isfinite(mx)) mx = 0;                                                                     \
    T sum = 0;                                                                                     \
    _Pragma("omp simd reduction(+:sum)")                                                           \
    for (int64_t j = 0; j < blk; ++j) { e[j] = EXP(g[j] - mx); sum += e[j]; }                      \
    return sum;                                                                                    \
}                                                                                                  \
void lm_fwd_##SUF(const T* s, int64_t ld_s, T* p, T* lse, int64_t r0, int64_t r1, int64_t bq,      \
                  int64_t qs, int64_t ke, int64_t ng, int64_t blk, int nthreads) {                 \
    const int64_t W = blk + 1;                                                                     \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
    for (int64_t r = r0; r < r1; ++r) {                                                            \
        const T* sr = s + r * ld_s;                                                                \
        T* pr = p + r * ng * blk;                                                                  \
        const int64_t i = qs + r % bq, b = i / W;                                                  \
        const T L = lse_row_##SUF(sr, i, b, W, blk, ke);                                           \
        lse[r] = L;                                                                                \
        for (int64_t c = 0; c < b; ++c) {                                                          \
            T* pc = pr + c * blk;                                                                  \
            T sum = group_exp_##SUF(sr + c * W, pc, blk);                                          \
            const T coef = EXP(sr[c * W + blk] - L) / (sum > TINY ? sum : TINY);                   \
            for (int64_t j = 0; j < blk; ++j) pc[j] *= coef;                                       \
        }                                                                                          \
        T* pb = pr + b * blk;                                                                      \
        for (int64_t j = 0; j < blk; ++j) {                                                        \
            const int64_t kp = b * W + j;                                                          \
            pb[j] = (kp <= i && kp < ke) ? EXP(sr[kp] - L) : (T)0;                                 \
        }                                                                                          \
        for (int64_t j = (b + 1) * blk; j < ng * blk; ++j) pr[j] = 0;                              \
    }                                                                                              \
}                                                                                                  \
/* dp: in dO.V of the regular keys, out dS (the scores' gradient, regular keys); p: out the     \
   weights; dl: out the landmarks' gradients (ng per row, 0 for the own group and later). */     \
void lm_bwd_##SUF(const T* s, int64_t ld_s, const T* lse, const T* dterm, T* dp, T* p, T* dl,      \
                  int64_t r0, int64_t r1, int64_t bq, int64_t qs, int64_t ke, int64_t ng,          \
                  int64_t blk, int nthreads) {                                                     \
    const int64_t W = blk + 1;                                                                     \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
    for (int64_t r = r0; r < r1; ++r) {                                                            \
        T e[blk];  /* one group's exp: blk values on the stack */                                  \
        const T* sr = s + r * ld_s;                                                                \
        T* pr = p + r * ng * blk;                                                                  \
        T* dr = dp + r * ng * blk;                                                                 \
        T* lr = dl + r * ng;                                                                       \
        const int64_t i = qs + r % bq, b = i / W;                                                  \
        const T L = lse[r], D = dterm[r];                                                          \
        for (int64_t c = 0; c < b; ++c) {                                                          \
            T* pc = pr + c * blk;                                                                  \
            T* dc = dr + c * blk;                                                                  \
            const T sum = group_exp_##SUF(sr + c * W, e, blk);                                     \
            const T ss = sum > TINY ? sum : TINY;                                                  \
            const T coef = EXP(sr[c * W + blk] - L) / ss;                                          \
            T tot = 0;                                                                             \
            _Pragma("omp simd reduction(+:tot)")                                                   \
            for (int64_t j = 0; j < blk; ++j) {                                                    \
                pc[j] = e[j] * coef;                                                               \
                dc[j] = (dc[j] - D) * pc[j];                                                       \
                tot += dc[j];                                                                      \
            }                                                                                      \
            const T f = tot / ss;                                                                  \
            for (int64_t j = 0; j < blk; ++j) dc[j] -= e[j] * f;                                   \
            lr[c] = tot;                                                                           \
        }                                                                                          \
        T* pb = pr + b * blk;                                                                      \
        T* db = dr + b * blk;                                                                      \
        for (int64_t j = 0; j < blk; ++j) {                                                        \
            const int64_t kp = b * W + j;                                                          \
            pb[j] = (kp <= i && kp < ke) ? EXP(sr[kp] - L) : (T)0;                                 \
            db[j] = (db[j] - D) * pb[j];                                                           \
        }                                                                                          \
        for (int64_t c = b; c < ng; ++c) lr[c] = 0;                                                \
        for (int64_t j = (b + 1) * blk; j < ng * blk; ++j) { pr[j] = 0; dr[j] = 0; }               \
    }                                                                                              \
}

/* Retrieval inference (longctx/model/landmark.py, retrieval_forward).
   gather_rope: out (B, Hkv, G, nsel, blk, D) = the blocks idx (B, Hkv, G, nsel) of buf (B, Hkv,
   cap, blk, D), rotated (when cos) at the rows c * blk + j of cos / sin (nsel * blk, D) as
   apply_rope_nograd does: [x1 cos1 - x2 sin1, x2 cos2 + x1 sin2].
   combine: per row of R = (B, Hkv, G, n) queries, the grouped softmax of retrieval: logZ over the
   local scores sl (Lc) and the slots' landmark scores sm (k); pl = exp(sl - logZ); the slots'
   block scores sb (k * blk) become exp(sm_c - logZ) x softmax_c(sb), in place. */
#define RT_DEFINE(T, SUF, EXP, LOG, TINY)                                                          \
void rt_gather_rope_##SUF(const T* buf, int64_t cap, const int64_t* idx, const T* cos, const T* sin, \
                          T* out, int64_t B, int64_t Hkv, int64_t G, int64_t nsel, int64_t blk,    \
                          int64_t D, int nthreads) {                                               \
    const int64_t n_items = B * Hkv * G * nsel, h2 = D / 2, bsz = blk * D;                         \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
    for (int64_t it = 0; it < n_items; ++it) {                                                     \
        const int64_t c = it % nsel, bh = it / (nsel * G);                                         \
        const T* src = buf + (bh * cap + idx[it]) * bsz;                                           \
        T* dst = out + it * bsz;                                                                   \
        if (!cos) { memcpy(dst, src, bsz * sizeof(T)); continue; }                                 \
        for (int64_t j = 0; j < blk; ++j) {                                                        \
            const T* x = src + j * D; T* y = dst + j * D;                                          \
            const T* cs = cos + (c * blk + j) * D; const T* sn = sin + (c * blk + j) * D;          \
            _Pragma("omp simd")                                                                    \
            for (int64_t d = 0; d < h2; ++d) {                                                     \
                y[d] = x[d] * cs[d] - x[d + h2] * sn[d];                                           \
                y[d + h2] = x[d + h2] * cs[d + h2] + x[d] * sn[d + h2];                            \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
}                                                                                                  \
void rt_combine_##SUF(const T* sl, int64_t Lc, T* sb, const T* sm, T* pl, int64_t R, int64_t k,     \
                      int64_t blk, int nthreads) {                                                 \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                             \
    for (int64_t r = 0; r < R; ++r) {                                                              \
        const T* l = sl + r * Lc; const T* m = sm + r * k;                                         \
        T* b = sb + r * k * blk; T* p = pl + r * Lc;                                               \
        T mx = -INFINITY;                                                                          \
        for (int64_t j = 0; j < Lc; ++j) if (l[j] > mx) mx = l[j];                                 \
        for (int64_t c = 0; c < k; ++c) if (m[c] > mx) mx = m[c];                                  \
        const T sh = isinf(mx) ? (T)0 : mx;                                                        \
        T acc = 0;                                                                                 \
        for (int64_t j = 0; j < Lc; ++j) acc += EXP(l[j] - sh);                                    \
        for (int64_t c = 0; c < k; ++c) acc += EXP(m[c] - sh);                                     \
        const T lz = LOG(acc) + mx;                                                                \
        for (int64_t j = 0; j < Lc; ++j) p[j] = EXP(l[j] - lz);                                    \
        for (int64_t c = 0; c < k; ++c) {                                                          \
            T* g = b + c * blk;                                                                    \
            T sum = group_exp_##SUF(g, g, blk);                                                    \
            const T coef = EXP(m[c] - lz) / (sum > TINY ? sum : TINY);                             \
            _Pragma("omp simd")                                                                    \
            for (int64_t j = 0; j < blk; ++j) g[j] *= coef;                                        \
        }                                                                                          \
    }                                                                                              \
}

LM_DEFINE(float, f32, exp_f32, logf, 1.17549435e-38f)
LM_DEFINE(double, f64, exp, log, 2.2250738585072014e-308)
RT_DEFINE(float, f32, exp_f32, logf, 1.17549435e-38f)
RT_DEFINE(double, f64, exp, log, 2.2250738585072014e-308)
"""

# -ffp-contract=off: no fused multiply-adds beyond what the source writes, so the rounding is the
# plain C semantics on every CPU (the tests compare with the torch path at 1e-12 in float64);
# -fopenmp: rows split over threads and the `omp simd` reductions vectorised. The library links
# libgomp.so.1 by its soname, which the process has loaded already with torch (torch/lib bundles
# it): one OpenMP runtime and one thread pool for torch's ops and these loops. A pool of Python
# threads instead ran slower than one thread (its threads met torch's still-spinning workers on
# the two cores).
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_lib = None
_why: Optional[str] = None
_lock = threading.Lock()


def _cpu_id() -> str:
    """The CPU's model name and flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _build(path: str) -> None:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=d) as tmp:
        src = os.path.join(tmp, "landmark_cpu.c")
        with open(src, "w") as f:
            f.write(_SRC)
        out = os.path.join(tmp, "landmark_cpu.so")
        res = subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
        os.replace(out, path)  # atomic: another process sees the old name or the finished file


def load():
    """The compiled helper (ctypes.CDLL), building it on first use; raises RuntimeError saying why not."""
    global _lib, _why
    with _lock:
        if _lib is not None:
            return _lib
        if _why is not None:
            raise RuntimeError(_why)
        key = hashlib.sha256("\n".join([_SRC, " ".join(_FLAGS), _cpu_id(), platform.machine()]).encode()).hexdigest()[:16]
        root = os.environ.get("LONGCTX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "longctx")
        path = os.path.join(root, "ext", f"landmark_cpu-{key}.so")
        try:
            if not os.path.exists(path):
                _build(path)
            lib = ctypes.CDLL(path)
        except (OSError, RuntimeError) as e:
            _why = f"landmark CPU helper unavailable: {e}"
            raise RuntimeError(_why) from e
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        for suf in ("f32", "f64"):
            getattr(lib, f"lm_fwd_{suf}").argtypes = [ptr, i64, ptr, ptr] + [i64] * 7 + [ctypes.c_int]
            getattr(lib, f"lm_bwd_{suf}").argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr] + [i64] * 7 + [ctypes.c_int]
            getattr(lib, f"rt_gather_rope_{suf}").argtypes = [ptr, i64, ptr, ptr, ptr, ptr] + [i64] * 6 + [ctypes.c_int]
            getattr(lib, f"rt_combine_{suf}").argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        _lib = lib
        return lib


def available() -> Tuple[bool, str]:
    """(whether the helper loads, why not)."""
    try:
        load()
        return True, ""
    except RuntimeError as e:
        return False, str(e)


def _suffix(x: Tensor) -> str:
    if x.dtype == torch.float32:
        return "f32"
    if x.dtype == torch.float64:
        return "f64"
    raise ValueError(f"landmark CPU helper: dtype {x.dtype}; supported float32 and float64")


def tile_weights(s: Tensor, qs: int, bq: int, ke: int, ng: int, block: int) -> Tuple[Tensor, Tensor]:
    """s (R, ke) contiguous scores of R = (batch x heads) x bq query rows qs..qs+bq-1 (row r at
    position qs + r % bq) against keys 0..ke-1, landmarks included. Returns P (R, ng * block),
    the weights of the regular keys (landmark_torch._tile_weights' P, flattened), and lse (R,)."""
    lib = load()
    R = s.shape[0]
    if not s.is_contiguous() or s.dim() != 2 or s.shape[1] != ke:
        raise ValueError(f"tile_weights: s must be contiguous (rows, {ke}), got {tuple(s.shape)}")
    p = torch.empty(R, ng * block, dtype=s.dtype)
    out = torch.empty(R, dtype=s.dtype)
    fn = getattr(lib, f"lm_fwd_{_suffix(s)}")
    fn(s.data_ptr(), ke, p.data_ptr(), out.data_ptr(), 0, R, bq, qs, ke, ng, block, torch.get_num_threads())
    return p, out


def tile_grads(s: Tensor, lse: Tensor, dterm: Tensor, dp: Tensor, qs: int, bq: int, ke: int, ng: int,
               block: int) -> Tuple[Tensor, Tensor, Tensor]:
    """s (R, ke) scores, lse (R,), dterm (R,) = rowsum(dO o), dp (R, ng * block) = dO . V of the
    regular keys (overwritten). Returns dS (R, ng * block) (in dp's storage: the regular keys'
    score gradients), P (R, ng * block) and dL (R, ng), the landmark keys' score gradients."""
    lib = load()
    R = s.shape[0]
    for name, x, shape in (("s", s, (R, ke)), ("lse", lse, (R,)), ("dterm", dterm, (R,)), ("dp", dp, (R, ng * block))):
        if not x.is_contiguous() or tuple(x.shape) != shape or x.dtype != s.dtype:
            raise ValueError(f"tile_grads: {name} must be contiguous {shape} {s.dtype}, got {tuple(x.shape)} {x.dtype}")
    p = torch.empty(R, ng * block, dtype=s.dtype)
    dl = torch.empty(R, ng, dtype=s.dtype)
    fn = getattr(lib, f"lm_bwd_{_suffix(s)}")
    fn(s.data_ptr(), ke, lse.data_ptr(), dterm.data_ptr(), dp.data_ptr(), p.data_ptr(), dl.data_ptr(), 0, R, bq, qs,
       ke, ng, block, torch.get_num_threads())
    return dp, p, dl


def _tiles(B: int, H: int, T: int, block: int, tile: Optional[int]):
    """The query tiles of landmark_torch's paths: (qs, qe, bq, ke, ng) per tile, ke the end of
    the keys they may see (whole groups) and ng their groups."""
    from longctx.kernels.landmark_torch import _group_ends, _rows_per_tile
    rows = _rows_per_tile(B, H, T, tile)
    for qs in range(0, T, rows):
        qe = min(T, qs + rows)
        ke = _group_ends(T, block, qe)
        yield qs, qe, qe - qs, ke, -(-ke // (block + 1))


def _rows(x: Tensor, qs: int, qe: int) -> Tensor:
    """(B, Hkv, G, T, D) -> the tile's rows as (B, Hkv, G * bq, D), contiguous."""
    B, Hkv, G = x.shape[:3]
    return x[:, :, :, qs:qe].reshape(B, Hkv, G * (qe - qs), x.shape[-1])


@torch.no_grad()
def landmark_fwd_cpu(q: Tensor, k: Tensor, v: Tensor, block: int, scale: float,
                     tile: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """landmark_fwd_torch with the weights from the C helper: same arguments and results."""
    from longctx.kernels.landmark_torch import _v_regular
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.view(B, Hkv, G, T, D)
    kc = k.to(cdt)
    o = torch.empty(B, Hkv, G, T, Dv, dtype=cdt)
    lse = torch.empty(B, Hkv, G, T, dtype=cdt)
    for qs, qe, bq, ke, ng in _tiles(B, H, T, block, tile):
        s = torch.matmul(_rows(qg, qs, qe).to(cdt) * scale, kc[:, :, :ke].transpose(-1, -2))  # (B, Hkv, G * bq, ke)
        p, lt = tile_weights(s.view(-1, ke), qs, bq, ke, ng, block)
        o[:, :, :, qs:qe] = torch.matmul(p.view(B, Hkv, G * bq, ng * block),
                                         _v_regular(v, ke, block, cdt)).view(B, Hkv, G, bq, Dv)
        lse[:, :, :, qs:qe] = lt.view(B, Hkv, G, bq)
    return o.view(B, H, T, Dv).to(q.dtype), lse.view(B, H, T)


@torch.no_grad()
def landmark_bwd_cpu(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, block: int,
                     scale: float, tile: Optional[int] = None):
    """landmark_bwd_torch with dS, P and the landmarks' gradients from the C helper."""
    from longctx.kernels.landmark_torch import _v_regular
    B, H, T, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G, W = H // Hkv, block + 1
    cdt = lse.dtype
    qg = q.view(B, Hkv, G, T, D)
    dog = do.view(B, Hkv, G, T, Dv).to(cdt)
    lseg = lse.view(B, Hkv, G, T)
    Dterm = (dog * o.view(B, Hkv, G, T, Dv).to(cdt)).sum(-1)
    kc = k.to(cdt)
    dq = torch.empty(B, Hkv, G, T, D, dtype=cdt)
    dk = torch.zeros(B, Hkv, T, D, dtype=cdt)
    dv = torch.zeros(B, Hkv, T, Dv, dtype=cdt)
    for qs, qe, bq, ke, ng in _tiles(B, H, T, block, tile):
        qt = _rows(qg, qs, qe).to(cdt)  # (B, Hkv, G * bq, D)
        dot = _rows(dog, qs, qe)
        s = torch.matmul(qt * scale, kc[:, :, :ke].transpose(-1, -2))  # (B, Hkv, G * bq, ke)
        kr, vr = _v_regular(k, ke, block, cdt), _v_regular(v, ke, block, cdt)  # (B, Hkv, ng * block, D)
        dp = torch.matmul(dot, vr.transpose(-1, -2))  # (B, Hkv, G * bq, ng * block)
        ds, p, dl = tile_grads(s.view(-1, ke), lseg[:, :, :, qs:qe].contiguous().view(-1),
                               Dterm[:, :, :, qs:qe].contiguous().view(-1),
                               dp.view(-1, ng * block), qs, bq, ke, ng, block)
        ds, p, dl = (x.view(B, Hkv, G * bq, -1) for x in (ds, p, dl))
        kl = kc[:, :, block:ke:W]  # the landmarks' keys (B, Hkv, ng, D); a partial last group has none
        if kl.shape[2] < ng:
            kl = torch.nn.functional.pad(kl, (0, 0, 0, ng - kl.shape[2]))
        dq[:, :, :, qs:qe] = ((torch.matmul(ds, kr) + torch.matmul(dl, kl)) * scale).view(B, Hkv, G, bq, D)
        dkr = torch.matmul(ds.transpose(-1, -2), qt).unflatten(2, (ng, block))
        dkl = torch.matmul(dl.transpose(-1, -2), qt)  # (B, Hkv, ng, D)
        dk[:, :, :ke] += torch.cat([dkr, dkl[:, :, :, None]], dim=3).flatten(2, 3)[:, :, :ke] * scale
        dvr = torch.matmul(p.transpose(-1, -2), dot).unflatten(2, (ng, block))
        dv[:, :, :ke] += torch.nn.functional.pad(dvr, (0, 0, 0, 1)).flatten(2, 3)[:, :, :ke]  # landmarks: 0
    return dq.view(B, H, T, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# -- retrieval inference (longctx/model/landmark.py) ----------------------------------------------

def gather_blocks(buf: Tensor, idx: Tensor, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None) -> Tensor:
    """buf (B, Hkv, cap, blk, D) contiguous, idx (B, Hkv, G, nsel) int64 block numbers < cap.
    Returns buf[b, h, idx] as (B, Hkv, G, nsel, blk, D), rotated at the rows c * blk + j of cos /
    sin ((nsel * blk, D), rope_table rows) when given (apply_rope_nograd's arithmetic): the
    retrieved keys at their compressed positions in one pass, no gathered copy to rotate after."""
    lib = load()
    B, Hkv, cap, blk, D = buf.shape
    if not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError(f"gather_blocks: buf must be a contiguous CPU tensor, got {tuple(buf.shape)} on {buf.device}")
    if idx.dim() != 4 or tuple(idx.shape[:2]) != (B, Hkv) or idx.dtype != torch.int64:
        raise ValueError(f"gather_blocks: idx must be int64 (B, Hkv, G, nsel) = ({B}, {Hkv}, ...), got "
                         f"{tuple(idx.shape)} {idx.dtype}")
    G, nsel = idx.shape[2:]
    idx = idx.contiguous()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= cap):
        raise ValueError(f"gather_blocks: block numbers {int(idx.min())}..{int(idx.max())} outside 0..{cap - 1}")
    out = torch.empty(B, Hkv, G, nsel, blk, D, dtype=buf.dtype)
    if (cos is None) != (sin is None):
        raise ValueError("gather_blocks: pass both cos and sin, or neither")
    if cos is not None:
        if D % 2 or tuple(cos.shape) != (nsel * blk, D) or tuple(sin.shape) != (nsel * blk, D):
            raise ValueError(f"gather_blocks: cos / sin must be ({nsel * blk}, {D}) with an even head dim, got "
                             f"{tuple(cos.shape)} / {tuple(sin.shape)}")
        cos, sin = cos.to(buf.dtype).contiguous(), sin.to(buf.dtype).contiguous()
    fn = getattr(lib, f"rt_gather_rope_{_suffix(buf)}")
    fn(buf.data_ptr(), cap, idx.data_ptr(), None if cos is None else cos.data_ptr(),
       None if sin is None else sin.data_ptr(), out.data_ptr(), B, Hkv, G, nsel, blk, D, torch.get_num_threads())
    return out


def combine_scores(s_loc: Tensor, s_blk: Tensor, s_lm: Tensor) -> Tuple[Tensor, Tensor]:
    """Retrieval's grouped softmax for rows of queries: s_loc (..., Lc) local scores (-inf where
    masked), s_blk (..., k, blk) the retrieved blocks' scores, s_lm (..., k) their landmarks'.
    Returns (p_loc, w_blk): exp(s_loc - logZ) and exp(s_lm - logZ) x softmax(s_blk) over each
    block, logZ = logsumexp over s_loc and s_lm; w_blk is written over s_blk (made contiguous)."""
    lib = load()
    *lead, k, blk = s_blk.shape
    if k < 1 or blk < 1:
        raise ValueError(f"combine_scores: s_blk {tuple(s_blk.shape)} holds no block (k >= 1 blocks of >= 1 keys)")
    Lc = s_loc.shape[-1]
    if tuple(s_loc.shape[:-1]) != tuple(lead) or tuple(s_lm.shape) != (*lead, k):
        raise ValueError(f"combine_scores: s_loc {tuple(s_loc.shape)}, s_blk {tuple(s_blk.shape)}, s_lm "
                         f"{tuple(s_lm.shape)} do not share their leading dims / k")
    R = s_lm.numel() // max(1, k)
    sb = s_blk.contiguous()
    sl, sm = s_loc.to(sb.dtype).contiguous(), s_lm.to(sb.dtype).contiguous()
    pl = torch.empty_like(sl)
    getattr(lib, f"rt_combine_{_suffix(sb)}")(sl.data_ptr(), Lc, sb.data_ptr(), sm.data_ptr(), pl.data_ptr(), R, k,
                                              blk, torch.get_num_threads())
    return pl, sb
