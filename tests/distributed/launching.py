"""Launch `longctx train` under a launcher from a test (imported by the distributed tests)."""
import os
import subprocess
import sys

from longctx.parallel.groups import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny-cpu.yaml")
# A model small enough that one launch costs seconds (most of it starting processes).
SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2", "data.seq_len=64",
         "data.micro_batch_size=2", "data.synthetic_tokens=200000", "train.warmup_steps=2", "train.progress=false",
         "train.peak_flops=1e11", "checkpoint.every=3"]



def launch(launcher: str, nproc: int, args, cwd, timeout=300, env=None):
    """Run `longctx train ARGS` under a launcher; returns the CompletedProcess (text)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", LONGCTX_CACHE=os.path.join(str(cwd), "cache"), PYTHONUNBUFFERED="1")
    e.update(env or {})
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "longctx.cli", "train", *args]
    elif launcher == "mpirun":
        cmd = ["mpiexec", "-n", str(nproc), sys.executable, "-m", "longctx.cli", "train", *args]
    elif launcher == "python":
        cmd = [sys.executable, "-m", "longctx.cli", "train", *args]
    else:
        raise ValueError(launcher)
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def error_lines(proc):
    return [l for l in proc.stderr.splitlines() if l.startswith("error:")]
