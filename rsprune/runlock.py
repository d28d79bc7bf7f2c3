"""One run per run folder: an exclusive `fcntl.flock` on `RUN_DIR/.lock` (rsprune.layout.LOCK),
held by every command that writes a run folder (training, the downstream fine-tunes, prune).

    with runlock.hold(run_dir):            # UsageError (exit 2) naming the holder's pid if taken
        ...

The kernel releases the lock when its holder exits, however it exits (a kill -9 included), so a
lock file left behind never blocks a rerun; the file itself is never deleted (deleting it would
let a third run lock a fresh file while the second still holds the old one). Holding is
re-entrant within one process (train/main.py holds the folder, and the engine under it asks
again). Under `accelerate launch`, pass the Accelerator: the main process locks and the others
learn its outcome, so every process refuses alike (without one, rank 0 locks and the launcher
stops the others when it exits 2).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from rsprune.errors import UsageError
from rsprune.layout import LOCK

_held: dict[str, list] = {}  # resolved run folder -> [fd, depth]


class Busy(UsageError):
    """Another run holds the folder (`pid`: the holder's, None if it wrote none)."""

    def __init__(self, run_dir, pid, host=None):
        self.pid = pid
        where = f" on {host}" if host and host != socket.gethostname() else ""  # a folder shared over NFS
        who = f" (pid {pid}{where})" if pid else ""
        super().__init__(f"{run_dir} is in use by another run{who}; wait for it to finish, or choose another run_dir")


def holder(run_dir) -> dict:
    """What the lock file says about its holder ({} if unreadable): pid, host, command."""
    try:
        data = json.loads((Path(run_dir) / LOCK).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _open(run_dir: Path) -> int:
    path = run_dir / LOCK
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():  # a planted link: replaced, its target untouched
            path.unlink()
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise UsageError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def _acquire(run_dir: Path) -> int:
    """The locked descriptor; UsageError naming the holder's pid if another run holds it."""
    fd = _open(run_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UsageError(f"cannot lock the run folder {run_dir}: {e.strerror or e}") from None
        info = {}
        for _ in range(20):  # the holder writes its pid just after locking
            info = holder(run_dir)
            if info.get("pid"):
                break
            time.sleep(0.05)
        raise Busy(run_dir, info.get("pid"), info.get("host")) from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def _shared_outcome(acc, run_dir: Path, err: UsageError | None) -> None:
    """Every process raises when the main process could not lock (the holder's pid travels as a
    tensor, no pickles: 0 locked, > 0 held by that pid, -1 held by an unknown pid, -2 not lockable)."""
    import torch
    from accelerate.utils import broadcast

    code = 0 if err is None else (err.pid or -1) if isinstance(err, Busy) else -2
    code = int(broadcast(torch.tensor([code], dtype=torch.int64, device=acc.device))[0])
    if code and err is None:
        raise Busy(run_dir, code if code > 0 else None) if code != -2 else \
            UsageError(f"the main process cannot lock the run folder {run_dir}")


@contextlib.contextmanager
def hold(run_dir, acc=None):
    """Hold the run folder's lock for the block (see the module docstring)."""
    run_dir = Path(run_dir)
    key = os.path.realpath(run_dir)
    # Without an Accelerator (a command that makes one later), torchrun's RANK says who locks.
    main = acc.is_main_process if acc is not None else os.environ.get("RANK", "0") == "0"
    if key in _held:  # this process holds it already
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd, err = None, None
    if main:
        try:
            fd = _acquire(run_dir)
        except UsageError as e:
            err = e
    if acc is not None and acc.num_processes > 1:
        _shared_outcome(acc, run_dir, err)
    if err is not None:
        raise err
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock
