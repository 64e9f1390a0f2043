"""Faults: a dead or hung rank ends the run on every rank, and SIGTERM stops it with a checkpoint.

Dead or hung peer
    A collective with a peer that died fails at once (gloo sees the connection reset; NCCL's
    watchdog aborts the communicator); a collective with a hung peer fails after
    `parallel.timeout_s`. torch gives only the world group that timeout: groups created later
    (the sequence-parallel mesh, DeepSpeed's) get its 30-minute default, so `StopGuard.arm`
    sets the timeout on every group this rank belongs to. `describe_failure` turns the
    collective's error into one line naming the rank that saw it, the peer(s) that are gone
    where it can tell (ranks on the same host, by pid), and what to do (`--resume auto`);
    the command line prints it and exits `EXIT_PEER_LOST`.

Stop signals (job schedulers send SIGTERM before preemption or the time limit)
    The first SIGTERM or SIGINT sets a flag. At the end of every step the flags are
    all-reduced (MAX, one int64), so all ranks stop after the same step even when the signal
    reached only some of them; the trainer saves a checkpoint there and returns (exit 0).
    Later SIGTERMs are ignored (a scheduler repeating itself must not cut the save short); a
    second SIGINT aborts at once (KeyboardInterrupt). A save cut short (by that, or SIGKILL)
    has no MANIFEST.json, the `latest` pointer still names the previous checkpoint, and
    `--resume auto` skips it (train/checkpoint.py).
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

# Exit code of a rank whose collective failed because a peer died or hung.
EXIT_PEER_LOST = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# What describe_failure knows about the run (set by StopGuard.arm; kept after the guard is
# uninstalled, since the command line describes the failure after train() has unwound).
_RUN: Dict[str, Any] = {}


def _rank_env() -> int:
    return int(os.environ.get("RANK", "0"))


def _say(msg: str) -> None:
    """Write one line to stderr from a signal handler (os.write: no buffered-IO re-entry)."""
    try:
        os.write(2, (msg + "\n").encode())
    except OSError:
        pass


class StopGuard:
    """Signal handlers for a clean stop, and the per-step agreement across ranks. A context
    manager: handlers are installed on entry (main thread only: Python delivers signals to the
    main thread, so elsewhere the caller's own handling applies) and restored on exit."""

    def __init__(self) -> None:
        self.signum = 0  # first stop signal received on this rank (0: none)
        self._old: Dict[int, Any] = {}

    def install(self) -> "StopGuard":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def uninstall(self) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old.clear()

    def __enter__(self) -> "StopGuard":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        who = f"[rank {_rank_env()}] "
        if not self.signum:
            self.signum = signum
            _say(f"{who}{name}: stopping after the current step with a checkpoint "
                 f"(continue with --resume auto)")
        elif signum == signal.SIGINT:
            _say(f"{who}second SIGINT: aborting now; a checkpoint being written is left incomplete "
                 f"and --resume auto skips it")
            raise KeyboardInterrupt
        else:
            _say(f"{who}{name} again: ignored, still stopping after the current step "
                 f"(SIGINT twice or SIGKILL aborts)")

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """As if `signum` had arrived (tests, embedding code)."""
        if not self.signum:
            self.signum = int(signum)

    def agree(self, device) -> Optional[Tuple[str, int]]:
        """Collective, once per step: (signal name, lowest rank that got it) if any rank was
        asked to stop, else None. Every rank gets the same answer."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        # one int64: the signal number above, (world - rank) below, so MAX picks the highest
        # signal number and, among the ranks that got it, the lowest rank
        t = torch.tensor([self.signum * (1 << 32) + (world - rank if self.signum else 0)],
                         dtype=torch.int64, device=device)
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        v = int(t.item())
        if v == 0:
            return None
        return signal.Signals(v >> 32).name, world - (v & 0xFFFFFFFF)

    def arm(self, ckpt_root: str, timeout_s: int) -> None:
        """Collective, after every process group exists (mesh and DeepSpeed engine built): give
        every group the collective timeout, and record each rank's host and pid so that a
        failure can name the peer that is gone."""
        set_group_timeouts(timeout_s)
        peers: List[Any] = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
        me = (socket.gethostname(), os.getpid())
        if dist.is_initialized():
            dist.all_gather_object(peers, me)
        else:
            peers = [me]
        _RUN.update(rank=dist.get_rank() if dist.is_initialized() else 0, peers=peers,
                    ckpt_root=ckpt_root, timeout_s=timeout_s)


def set_group_timeouts(timeout_s: int) -> List[dist.ProcessGroup]:
    """Set the collective timeout of every process group this rank is in; returns them."""
    if not dist.is_initialized():
        return []
    from torch.distributed import distributed_c10d as c10d
    groups = list(c10d._world.pg_map)
    for g in groups:
        c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s), g)
    return groups


def group_timeouts() -> List[float]:
    """Seconds of every group's current timeout on this rank (gloo groups; for tests)."""
    from torch.distributed import distributed_c10d as c10d
    return [g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for g in c10d._world.pg_map]


# ---- describing a failed collective -------------------------------------------------------

_TIMED_OUT = re.compile(r"timed out|timeout", re.I)
_PEER_GONE = re.compile(r"connection (reset|closed|refused)|broken pipe|end of file|socket closed|"
                        r"closed by peer|communicator was aborted|remote process exited", re.I)
_COMM = re.compile(r"gloo|nccl|c10d|processgroup|tcpstore|socket|connection|collective", re.I)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child its launcher has not reaped yet is a zombie
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _dead_peers() -> List[Tuple[int, int]]:
    """(rank, pid) of peers on this host that are no longer running."""
    peers, me = _RUN.get("peers"), _RUN.get("rank")
    if not peers:
        return []
    host = socket.gethostname()
    return [(r, pid) for r, (h, pid) in enumerate(peers) if r != me and h == host and not _alive(pid)]


def _reason(exc: BaseException) -> str:
    line = next((l.strip() for l in str(exc).splitlines() if l.strip()), type(exc).__name__)
    line = re.sub(r"^\[[^\]]*\.(cpp|cc|h|hpp):\d+\]\s*", "", line)  # gloo's source location
    line = line.split(". This is typically caused")[0]
    return (line[:160] + "...") if len(line) > 160 else line


def _next_step_hint() -> str:
    root = _RUN.get("ckpt_root")
    if not root:
        return "relaunch all ranks with --resume auto"
    from longctx.train import checkpoint as ckpt
    newest = ckpt.newest_complete(root, verify=False)
    where = f"newest complete checkpoint: {newest}" if newest else f"no complete checkpoint in {root} yet"
    return f"relaunch all ranks with --resume auto ({where})"


def describe_failure(exc: BaseException) -> Optional[str]:
    """One line for a collective that failed because a peer died, closed its connection or
    hung past the timeout; None for any other error (which keeps its traceback)."""
    for e in _chain(exc):
        text = str(e)
        comm = isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _COMM.search(text))
        if not comm:
            continue
        timed_out, gone = bool(_TIMED_OUT.search(text)), bool(_PEER_GONE.search(text))
        if not (timed_out or gone):
            continue
        dead = _dead_peers()
        if dead:
            who = ", ".join(f"rank {r} (pid {pid})" for r, pid in dead)
            who += " is" if len(dead) == 1 else " are"
            who += " no longer running"
        else:
            who = "a peer rank died, exited or hangs (the first error is in its own log)"
        if timed_out and not gone:
            t = _RUN.get("timeout_s")
            head = f"a collective timed out after {'parallel.timeout_s=' + str(t) + ' s' if t else 'its timeout'}"
        else:
            head = "a collective failed: the connection to a peer was lost"
        return f"{head}; {who} [{_reason(e)}]; the run cannot go on: {_next_step_hint()}"
    return None
