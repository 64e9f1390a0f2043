"""Faults (longctx/train/faults.py), through real launches (gloo, DeepSpeed on CPU):

- a rank killed mid-run makes every other rank exit well within 2 minutes: with no launcher
  tearing the group down (3 ranks started by hand, the store's host killed) each survivor exits 3
  with one `error:` line naming the dead rank and `--resume auto`; under torchrun the job ends
  and `--resume auto` then reproduces the uninterrupted run's losses bit for bit;
- a hung rank (SIGSTOP) makes the others fail after parallel.timeout_s, sequence-parallel
  groups included (torch gives groups other than the world 30 minutes by default);
- SIGTERM to one rank stops every rank after the same step with a checkpoint, exit 0, and
  `--resume auto` continues exactly.

LONGCTX_INJECT_STEP_SLEEP slows every step down so that a kill or a signal lands mid-run.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from launching import SMALL, TINY, launch
from longctx.parallel.groups import free_port
from longctx.train import checkpoint as ckpt
from longctx.train import faults

WORLD = 2  # torchrun runs; the hand-started kill uses 3 ranks
STEPS = 6
ARGS = [TINY, *SMALL, "deepspeed.zero_stage=2", f"train.steps={STEPS}"]
DEADLINE = 60  # seconds from the fault to every rank gone (the requirement is 2 minutes)


def losses(run_dir):
    return [json.loads(l)["loss"] for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def steps_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    lines = [l for l in open(path).read().splitlines() if l.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _env(cwd, extra):
    return dict(os.environ, OMP_NUM_THREADS="1", LONGCTX_CACHE=os.path.join(str(cwd), "cache"),
                PYTHONUNBUFFERED="1", **extra)


class Ranks:
    """`longctx train` on `nproc` ranks started by hand (no launcher watching them: what a
    dead peer does to the others is up to our code alone), or under torchrun. stderr of each
    process goes to a file."""

    def __init__(self, launcher, nproc, args, cwd, env):
        self.cwd, self.procs, self.logs = str(cwd), [], []
        e = _env(cwd, env)
        if launcher == "env":
            port = str(free_port())
            for r in range(nproc):
                er = dict(e, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE=str(nproc),
                          LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(nproc))
                self._popen([sys.executable, "-m", "longctx.cli", "train", *args], er, f"rank{r}")
        else:
            self._popen([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                         f"--master_port={free_port()}", "-m", "longctx.cli", "train", *args], e, "torchrun")

    def _popen(self, cmd, env, name):
        log = os.path.join(self.cwd, f"{name}-{len(os.listdir(self.cwd))}.err")
        self.logs.append(log)
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen(cmd, cwd=self.cwd, env=env, stdout=subprocess.DEVNULL, stderr=f))

    def stderr(self, i):
        return open(self.logs[i]).read()

    def rank_pids(self):
        """rank -> pid of the worker processes (torchrun: its children, by their RANK)."""
        if len(self.procs) > 1:
            return {r: p.pid for r, p in enumerate(self.procs)}
        out, parent = {}, self.procs[0].pid
        for d in os.listdir("/proc"):
            try:
                stat = open(f"/proc/{d}/stat").read()
                if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
                    continue
                env = dict(kv.split("=", 1) for kv in open(f"/proc/{d}/environ").read().split("\0") if "=" in kv)
            except (OSError, ValueError, IndexError):
                continue
            if "RANK" in env:
                out[int(env["RANK"])] = int(d)
        return out

    def wait(self, procs, deadline):
        """Exit codes of `procs`, all gone within `deadline` seconds (else they are killed)."""
        end = time.monotonic() + deadline
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(0.1, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()


def wait_until(pred, what, timeout=120, procs=()):
    end = time.monotonic() + timeout
    while not pred():
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead, f"a process exited ({dead}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def complete_steps(run):
    root = os.path.join(run, "checkpoints")
    return [ckpt.step_of(os.path.basename(f)) for f in ckpt.list_checkpoints(root)
            if ckpt.check_complete(f, verify=True) is None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def full(workdir):
    """The uninterrupted run the interrupted ones are compared with."""
    run = str(workdir / "full")
    ok(launch("torchrun", WORLD, [*ARGS, f"train.run_dir={run}"], workdir))
    assert len(losses(run)) == STEPS
    return run


def test_killed_rank_ends_every_other_rank(workdir):
    """No launcher watches the ranks: rank 0 (which also hosts the rendezvous store) is killed
    and both survivors must end on their own, each with one line."""
    run, victim = str(workdir / "killed-env"), 0
    job = Ranks("env", 3, [*ARGS, "checkpoint.every=2", f"train.run_dir={run}"], workdir,
                {"LONGCTX_INJECT_STEP_SLEEP": "0.5"})
    try:
        wait_until(lambda: 2 in complete_steps(run) and steps_logged(run) >= 3, "step 3", procs=job.procs)
        os.kill(job.procs[victim].pid, signal.SIGKILL)
        t0 = time.monotonic()
        codes = job.wait(job.procs[1:], DEADLINE)
        elapsed = time.monotonic() - t0
    finally:
        job.kill_all()
    assert None not in codes, f"ranks still running {DEADLINE} s after rank {victim} was killed"
    assert elapsed < DEADLINE
    assert codes == [faults.EXIT_PEER_LOST] * 2, codes
    newest = ckpt.newest_complete(os.path.join(run, "checkpoints"), verify=True)
    assert newest is not None
    for r in (1, 2):
        err = job.stderr(r)
        lines = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
        for w in (f"[rank {r}]", "connection to a peer was lost", "no longer running", "--resume auto",
                  f"newest complete checkpoint: {newest}"):
            assert w in lines[0], (w, lines[0])
        # The peers named dead: the victim, and maybe the other survivor, which may have
        # exited (as it should) before this rank looked.
        named = set(re.findall(r"rank (\d+) \(pid (\d+)\)", lines[0]))
        may_name = {(str(k), str(job.procs[k].pid)) for k in (victim, 3 - r)}
        assert (str(victim), str(job.procs[victim].pid)) in named and named <= may_name, lines[0]
    print(f"hand-started: both survivors exited 3 {elapsed:.1f} s after rank {victim} was killed")


def test_killed_rank_under_torchrun_then_resume(workdir, full):
    run, victim = str(workdir / "killed-torchrun"), 1
    common = [*ARGS, "checkpoint.every=2", f"train.run_dir={run}"]
    job = Ranks("torchrun", WORLD, common, workdir, {"LONGCTX_INJECT_STEP_SLEEP": "0.5"})
    try:
        wait_until(lambda: 2 in complete_steps(run) and steps_logged(run) >= 3, "step 3", procs=job.procs)
        os.kill(job.rank_pids()[victim], signal.SIGKILL)
        t0 = time.monotonic()
        code = job.wait(job.procs, DEADLINE)[0]
        elapsed = time.monotonic() - t0
    finally:
        job.kill_all()
    assert code not in (None, 0), code  # torchrun reports the failed worker
    assert elapsed < DEADLINE
    newest = ckpt.newest_complete(os.path.join(run, "checkpoints"), verify=True)
    assert newest is not None and ckpt.step_of(os.path.basename(newest)) < STEPS
    # torchrun also sends the survivor SIGTERM: it still ends on the lost connection, with its line
    lines = [l for l in job.stderr(0).splitlines() if l.startswith("error: [rank 0]")]
    assert len(lines) == 1 and "connection to a peer was lost" in lines[0] and "--resume auto" in lines[0], \
        job.stderr(0)[-3000:]
    print(f"torchrun: job ended (code {code}) {elapsed:.1f} s after rank {victim} was killed")

    proc = ok(launch("torchrun", WORLD, [*common, "--resume", "auto"], workdir))
    assert f"resumed from {newest}" in proc.stderr
    assert losses(run) == losses(full)  # bit-identical


def test_hung_rank_times_out(workdir):
    """A stopped (hung) rank: the other one fails after parallel.timeout_s, in the
    sequence-parallel all-to-all of the forward (a group torch would give 30 minutes)."""
    run = str(workdir / "hung")
    timeout_s = 10
    job = Ranks("env", 2, [*ARGS, "parallel.sp=2", f"parallel.timeout_s={timeout_s}", "checkpoint.every=2",
                           f"train.run_dir={run}"], workdir, {"LONGCTX_INJECT_STEP_SLEEP": "0.5"})
    try:
        wait_until(lambda: 2 in complete_steps(run), "step 2", procs=job.procs)
        os.kill(job.procs[1].pid, signal.SIGSTOP)
        t0 = time.monotonic()
        codes = job.wait(job.procs[:1], timeout_s + DEADLINE)
        elapsed = time.monotonic() - t0
    finally:
        job.kill_all()
    assert codes == [faults.EXIT_PEER_LOST], (codes, job.stderr(0)[-3000:])
    assert timeout_s - 1 <= elapsed < timeout_s + DEADLINE, elapsed
    lines = [l for l in job.stderr(0).splitlines() if l.startswith("error:")]
    assert len(lines) == 1, job.stderr(0)[-3000:]
    assert f"timed out after parallel.timeout_s={timeout_s} s" in lines[0] and "--resume auto" in lines[0], lines[0]
    print(f"hung rank: rank 0 gone {elapsed:.1f} s after rank 1 stopped (timeout {timeout_s} s)")


def test_sigterm_to_one_rank_checkpoints_and_resumes(workdir, full):
    run = str(workdir / "sigterm")
    common = [*ARGS, "checkpoint.every=100", f"train.run_dir={run}"]  # no periodic checkpoint before the stop
    job = Ranks("torchrun", WORLD, common, workdir, {"LONGCTX_INJECT_STEP_SLEEP": "1.0"})
    try:
        # step 2 logged: every rank is now in step 3's sleep, before that step's agreement
        wait_until(lambda: steps_logged(run) >= 2, "step 2", procs=job.procs)
        pid = job.rank_pids()[1]
        os.kill(pid, signal.SIGTERM)  # only rank 1 hears it; all must stop together
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)  # a second one must not cut the stop short
        t0 = time.monotonic()
        code = job.wait(job.procs, DEADLINE)[0]
        elapsed = time.monotonic() - t0
    finally:
        job.kill_all()
    err = job.stderr(0)
    assert code == 0, err[-3000:]
    assert "[rank 1] SIGTERM: stopping after the current step" in err
    assert "[rank 1] SIGTERM again: ignored" in err
    folder = os.path.join(run, "checkpoints", ckpt.tag_for(3))
    assert f"stopped after step 3 on SIGTERM (rank 1): checkpoint {folder}; continue with --resume auto" in err, \
        err[-3000:]
    assert complete_steps(run) == [3]
    assert open(os.path.join(run, "checkpoints", ckpt.LATEST)).read().strip() == ckpt.tag_for(3)
    assert [json.loads(l)["step"] for l in open(os.path.join(run, "metrics.jsonl"))] == [1, 2, 3]
    assert sorted(f for f in os.listdir(folder) if f.startswith("rng_rank")) == \
        [f"rng_rank{r:05d}.pt" for r in range(WORLD)]
    print(f"SIGTERM: every rank exited 0 {elapsed:.1f} s after the signal, checkpoint at step 3")

    proc = ok(launch("torchrun", WORLD, [*common, "--resume", "auto"], workdir))
    assert f"resumed from {folder}" in proc.stderr
    assert losses(run) == losses(full)  # bit-identical


# ---- in-process: the signal handlers and the failure lines -----------------------------

def test_stop_guard_signals():
    before = {s: signal.getsignal(s) for s in faults.STOP_SIGNALS}
    with faults.StopGuard() as g:
        assert g.agree("cpu") is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert g.signum == signal.SIGTERM and g.agree("cpu") == ("SIGTERM", 0)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second SIGINT aborts
        assert g.signum == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in faults.STOP_SIGNALS} == before
    with faults.StopGuard() as g:
        os.kill(os.getpid(), signal.SIGINT)  # the first SIGINT is a stop request too
        assert g.agree("cpu") == ("SIGINT", 0)


def test_describe_failure():
    gloo = RuntimeError("[/x/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:4235: Connection reset by peer. "
                        "This is typically caused by a remote worker hanging")
    line = faults.describe_failure(gloo)
    assert line.startswith("a collective failed: the connection to a peer was lost")
    assert "[Read error [127.0.0.1]:4235: Connection reset by peer]" in line and "--resume auto" in line
    assert "\n" not in line
    try:  # found through the chain of a wrapping exception
        try:
            raise RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv "
                               "operation to complete")
        except RuntimeError as inner:
            raise ValueError("step failed") from inner
    except ValueError as outer:
        assert faults.describe_failure(outer).startswith("a collective timed out")
    assert faults.describe_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert faults.describe_failure(KeyError("timeout")) is None
