"""Durable file writes shared by checkpoints and token files: a reader sees the old file or the
new one, never half of one, and a rename survives a crash (the folder is fsynced too)."""
from __future__ import annotations

import hashlib
import os
import uuid
from typing import Callable


def tmp_name(path: str) -> str:
    # pid + random suffix: two writers never share a temporary file.
    return f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def fsync_dir(path: str) -> None:
    """Make a rename durable: fsync the folder holding `path`."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(path: str, write: Callable) -> str:
    """Call write(fileobj) on a fresh temporary file next to `path`, fsync it, return its name
    (the caller renames it into place, possibly together with other files)."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def atomic_write(path: str, data: bytes) -> None:
    """Write, fsync, rename over, fsync the folder."""
    os.replace(write_tmp(path, lambda f: f.write(data)), path)
    fsync_dir(path)


def sha256_file(path: str, bufsize: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()
