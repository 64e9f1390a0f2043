"""benchmarks/gpu_check.py's landmark launch-shape sweep (time_landmarksweep), run on CPU tensors
under TRITON_INTERPRET=1 at tiny shapes so that the prepared GPU run cannot crash on its own code:
one line and one result row per candidate, a candidate that cannot compile is recorded as a failed
check while the others still run, the fp32 check is shared between candidates with the same fp32
kernels, and LONGCTX_LANDMARK_CFG is restored afterwards."""
import importlib.util
import os
import pathlib

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)
pytest.importorskip("triton")

from longctx.kernels import landmark_triton as lt  # noqa: E402
from longctx.kernels.flash_triton import Tiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _gpu_check():
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_landmark_sweep_records_every_candidate_and_survives_a_broken_one(monkeypatch, capsys):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "cuda_time", lambda fn, reps=5, warmup=2: (fn(), 1e-3)[1])  # one call, no timing
    small = Tiles(16, 0)
    monkeypatch.setattr(lt, "CANDIDATES", {
        "default": lt.LandmarkConfig(small, small, Tiles(32, 0)),
        "broken": lt.LandmarkConfig(Tiles(24, 0), small, small),  # 24 rows: not a power of two
        "lc32": lt.LandmarkConfig(small, Tiles(32, 0), small, lc=32),
    })
    monkeypatch.setenv(lt.CONFIG_ENV, "default")
    shapes = dict(B=1, H=2, D=16, block=16, T=40, T_quick=40,
                  checks=(("fp32 T=40", torch.float32, 1, 2, 1, 40), ("bf16 T=36", torch.bfloat16, 1, 2, 2, 36)))
    gc.time_landmarksweep(True, device=DEV, shapes=shapes, isolate=False)  # in this process: cuda_time patched
    out = capsys.readouterr().out
    assert os.environ[lt.CONFIG_ENV] == "default"  # restored
    lines = {ln.split(":")[0].split()[-1]: ln for ln in out.splitlines() if ln.startswith("sweep landmark ")
             and ln.split(":")[0].split()[-1] in ("default", "broken", "lc32")}
    assert set(lines) == {"default", "broken", "lc32"}, out
    assert "fwd 1.00 ms, fwd+bwd 1.00 ms" in lines["default"] and "FAIL" not in lines["default"], out
    assert "bf16 T=36 ERROR" in lines["broken"] and "timing failed" in lines["broken"], out
    assert "(= default's kernels)" in lines["broken"]  # fp32 takes only lc from a candidate
    assert "ERROR" not in lines["lc32"] and "FAIL" not in lines["lc32"] and "(=" not in lines["lc32"], out
    assert "sweep landmark best: " in out and "sweep flash (reference): fwd 1.00 ms" in out, out
    rows = {r["config"]: r for r in gc.RESULTS["timings"] if r["kernel"] == "landmarksweep"}
    checks = {c["config"]: c["ok"] for c in gc.RESULTS["checks"] if c["kernel"] == "landmarksweep"}
    assert checks == {"default": True, "broken": False, "lc32": True}
    assert rows["default"]["ok"] and rows["default"]["landmark_fwdbwd_s"] == 1e-3
    assert rows["default"]["landmark_over_flash_fwdbwd"] == 1.0
    assert max(rows["lc32"]["fp32_rel_err"].values()) < 1e-5 and max(rows["lc32"]["bf16_rel_err"].values()) < 2e-2
    assert not rows["broken"]["ok"] and "bf16_error" in rows["broken"]


def test_landmark_sweep_stops_starting_candidates_after_its_budget(monkeypatch, capsys):
    gc = _gpu_check()
    monkeypatch.setattr(gc, "cuda_time", lambda fn, reps=5, warmup=2: (fn(), 1e-3)[1])
    small = Tiles(16, 0)
    monkeypatch.setattr(lt, "CANDIDATES", {"a": lt.LandmarkConfig(small, small, small),
                                           "b": lt.LandmarkConfig(small, small, small, lc=32)})
    monkeypatch.delenv(lt.CONFIG_ENV, raising=False)
    shapes = dict(B=1, H=1, D=16, block=16, T=20, T_quick=20, checks=(("fp32 T=20", torch.float32, 1, 1, 1, 20),))
    gc.time_landmarksweep(False, budget_s=0.0, device=DEV, shapes=shapes)
    out = capsys.readouterr().out
    assert "sweep landmark a        : skipped (time budget 0 s spent)" in out, out
    assert "no candidate both correct and timed" in out
    assert lt.CONFIG_ENV not in os.environ


def test_landmark_sweep_runs_each_candidate_in_its_own_process(monkeypatch, capsys):
    """isolate (the default): each candidate in a fresh process, so that one whose process dies
    (on a GPU: an illegal memory access, which poisons the CUDA context) is recorded as a failed
    check and the candidates after it still run. The children import longctx through the
    PYTHONPATH the sweep passes them, with the parent's candidate table."""
    gc = _gpu_check()
    small = Tiles(16, 0)
    monkeypatch.setattr(lt, "CANDIDATES", {
        "default": lt.LandmarkConfig(small, small, Tiles(32, 0)),
        "dies": lt.LandmarkConfig(small, small, small),
        "lc32": lt.LandmarkConfig(small, Tiles(32, 0), small, lc=32),
    })
    monkeypatch.delenv(lt.CONFIG_ENV, raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir("/")  # the children must not find longctx through the working directory
    shapes = dict(B=1, H=2, D=16, block=16, T=40, T_quick=40,
                  checks=(("fp32 T=40", torch.float32, 1, 2, 1, 40), ("bf16 T=36", torch.bfloat16, 1, 2, 2, 36)))
    gc.time_landmarksweep(True, device=DEV, shapes=shapes, budget_s=600.0, crash_for_test="dies")
    out = capsys.readouterr().out
    assert lt.CONFIG_ENV not in os.environ
    assert "one process each" in out
    lines = {ln.split(":")[0].split()[-1]: ln for ln in out.splitlines() if ln.startswith("sweep landmark ")
             and ln.split(":")[0].split()[-1] in ("default", "dies", "lc32")}
    assert set(lines) == {"default", "dies", "lc32"}, out
    assert "CRASHED (process exit" in lines["dies"], out
    for n in ("default", "lc32"):
        assert "fwd+bwd" in lines[n] and "FAIL" not in lines[n] and "ERROR" not in lines[n], out
    assert "(= default's kernels)" not in lines["lc32"]  # its own lc: its own fp32 check
    checks = {c["config"]: c["ok"] for c in gc.RESULTS["checks"] if c["kernel"] == "landmarksweep"}
    assert checks == {"default": True, "dies": False, "lc32": True}
    rows = {r["config"]: r for r in gc.RESULTS["timings"] if r["kernel"] == "landmarksweep"}
    assert isinstance(rows["lc32"]["landmark_fwdbwd_s"], float) and "crash" in rows["dies"]
    assert max(rows["lc32"]["fp32_rel_err"].values()) < 1e-5 and max(rows["lc32"]["bf16_rel_err"].values()) < 2e-2


def test_gpu_check_imports_longctx_without_pythonpath():
    """The GPU machine runs `python3 benchmarks/gpu_check.py` from the repository root without
    longctx installed: the script puts the root on sys.path itself."""
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import runpy, sys; sys.argv = ['gpu_check.py', '--help']; "
            f"g = runpy.run_path({str(root / 'benchmarks' / 'gpu_check.py')!r}, run_name='not_main'); "
            "import longctx.kernels.landmark_triton; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
