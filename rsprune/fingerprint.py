"""Content fingerprints of image files: the one hash every stage keys content by.

A fingerprint is the SHA-1 of a file's bytes, the index's `content_hash` (prune/index.py), so
the prune index, the embedding store's re-check, training latents, the test-overlap check and
the data split all compare the same thing.

Hashing a whole corpus on every start would cost a full read, so `fingerprints` keeps a memo
under the cache folder, keyed by the file itself (device, inode; so a path, a symlink to it and a
hardlink of it are one entry): (size, mtime_ns, ctime_ns) -> sha1. A file whose stat still
matches is not read again; any other (new, rewritten in place, replaced, chmod-ed: ctime moves
on every change to the inode and cannot be set back) is hashed anew. The memo is one file, a
JSON header line holding the SHA-256 of the entries below it, written atomically under a lock:
a damaged memo is dropped with a warning (everything is hashed again), never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from rsprune.errors import warn

MEMO = "memo.json"
VERSION = 1
_READ = 1 << 20


def digest(data: bytes) -> str:
    """The fingerprint of bytes already read (hex SHA-1)."""
    return hashlib.sha1(data).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """The fingerprint of a file, read in blocks."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ), b""):
            h.update(block)
    return h.hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    """The fingerprint of in-memory arrays (dtype, shape and bytes of each): for data decoded
    before it is cached (downstream crops, LR/HR pairs)."""
    h = hashlib.sha1()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> tuple[str, list[int]]:
    """(the file's identity, the stat that changes with its content)."""
    return f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load(path: Path) -> dict:
    """The memo's entries, {} if absent; a damaged or foreign memo is warned about and dropped."""
    try:
        head, _, body = path.read_bytes().partition(b"\n")
        head = json.loads(head)
        if head.get("version") == VERSION and head.get("sha256") == hashlib.sha256(body).hexdigest():
            entries = json.loads(body)
            if isinstance(entries, dict):
                return entries
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError):
        pass
    warn(f"fingerprint memo {path} is damaged or of another version: hashing files again")
    return {}


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _save(path: Path, new: dict) -> None:
    """Merge `new` into the memo on disk (another process may have added entries) and write it."""
    from rsprune.cache import write_text

    try:
        with _locked(path):
            entries = _load(path)
            entries.update(new)
            body = json.dumps(entries, sort_keys=True, separators=(",", ":"))
            head = json.dumps({"version": VERSION, "sha256": hashlib.sha256(body.encode()).hexdigest()})
            write_text(path, head + "\n" + body)
    except OSError as e:  # a read-only cache: the fingerprints are still right, only not remembered
        warn(f"fingerprint memo {path} not written ({type(e).__name__}: {e.strerror or e})")


def _hash(path: str) -> tuple[str, tuple | None]:
    """(sha1, stat key taken before the read) or ('', None) when the file cannot be read."""
    try:
        before = _stat_key(os.stat(path))
        sha = file_digest(path)
        after = _stat_key(os.stat(path))
    except OSError:
        return "", None
    return sha, before if after == before else None  # changed while read: not remembered


def fingerprints(paths, memo_dir: str | os.PathLike | None = None, threads: int = 4) -> list[str]:
    """The fingerprint of each path, in order ('' for a file that cannot be read). With
    `memo_dir`, files whose stat matches the memo are not read again, and new ones are added."""
    paths = [str(p) for p in paths]
    memo_path = Path(memo_dir) / MEMO if memo_dir is not None else None
    memo = _load(memo_path) if memo_path is not None else {}
    out, todo = [""] * len(paths), {}
    for i, p in enumerate(paths):
        try:
            ident, st = _stat_key(os.stat(p))
        except OSError:
            continue
        hit = memo.get(ident)
        if hit is not None and hit[:3] == st:
            out[i] = hit[3]
        else:
            todo.setdefault(ident, (p, []))[1].append(i)
    if not todo:
        return out
    with ThreadPoolExecutor(max(1, threads)) as pool:  # hashlib releases the GIL on large reads
        hashed = list(pool.map(_hash, [p for p, _ in todo.values()]))
    new = {}
    for (p, rows), (sha, key) in zip(todo.values(), hashed):
        for i in rows:
            out[i] = sha
        if sha and key is not None:
            new[key[0]] = key[1] + [sha]
    if memo_path is not None and new:
        _save(memo_path, new)
    return out
