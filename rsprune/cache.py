"""Atomic writes and content keys: the two rules every cached stage follows.

A stage's output is keyed by a hash of (its config, the keys of its inputs). It is written to
a temporary name in the same folder and renamed, so a killed run never leaves a file that a
later run would take for a finished one.

A cache entry is verified before it is trusted: `<file>.sha256` (the SHA-256 of its bytes) is
written after the file; on read, an entry whose bytes do not match (damaged, truncated) or that
has no checksum (unverifiable: an older cache, or a run killed between the two writes) is
deleted with a one-line warning naming it, and the stage computes it again.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from rsprune.errors import UsageError, warn

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)

CHECKSUM_SUFFIX = ".sha256"


def stable_hash(*parts: Any, n: int = 16) -> str:
    """Hex digest of JSON-serialisable parts (dict keys sorted), `n` characters long."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:n]


def umask() -> int:
    """The process umask, read without changing it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp (always 0600/0700) the mode a plain open/mkdir gives."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def rows_digest(*columns: Any, chunk: int = 1 << 16) -> str:
    """SHA-256 hex of per-row columns (arrays, Series or lists of one length), streamed in
    chunks: what a cache key takes for per-row content, in place of a JSON dump of every row
    (at 10^6 rows 0.2 s and no copy of the table, against seconds and a string of every row).
    Integers hash as int64 bytes, floats as float64, anything else as its text joined by NUL."""
    h = hashlib.sha256()
    for col in columns:
        if hasattr(col, "iloc") and col.dtype.kind not in "biuf":  # text Series: a chunk of strings at a time
            col = _Chunks(col)
        elif not isinstance(col, (list, tuple)):
            col = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col)
        kind = col.dtype.kind if isinstance(col, np.ndarray) else "O"
        h.update(f"{kind}:{len(col)}\0".encode())
        for s in range(0, len(col), chunk):
            part = col[s:s + chunk]
            if kind in "biu":
                h.update(np.ascontiguousarray(part, "<i8").tobytes())
            elif kind == "f":
                h.update(np.ascontiguousarray(part, "<f8").tobytes())
            else:  # text (paths and hashes hold no NUL)
                items = part.tolist() if isinstance(part, np.ndarray) else part
                try:
                    text = "\0".join(items)
                except TypeError:  # not all str
                    text = "\0".join(map(str, items))
                h.update(text.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


class _Chunks:
    """A text Series sliced into lists of str (what its object array would give), so that
    rows_digest never makes a string of every row at once."""

    def __init__(self, series):
        self.series = series

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, s: slice) -> list:
        return self.series.iloc[s].tolist()


# A file name longer than this cannot be made; the temporary name keeps room for its suffix.
_TMP_NAME = 200


class WriteError(UsageError):
    """An output that cannot be written (disk full, permission, a name too long): one line naming it."""


def _write_error(path, e: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.
    The file gets the umask's mode; an OSError writing it (ENOSPC, EACCES, ENAMETOOLONG, ...) is a
    WriteError naming `path`, and no temporary file is left behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:_TMP_NAME]}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):  # shared run and cache folders stay readable by the team
            follow_umask(tmp)
        os.replace(tmp, path)
    except OSError as e:
        # Only errors of this write: one reading another file inside the block is that file's.
        if e.filename in (None, tmp, str(path)) or e.errno in _NO_ROOM:
            raise _write_error(path, e) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """UsageError unless `folder` is, or can be made, a folder this process writes in: every name
    within the filesystem's length limit, and the nearest existing folder on its path accepts a
    new file (probed with a temporary file, gone at once). Nothing is left behind."""
    path = Path(os.path.abspath(folder))
    existing = path
    while not os.path.exists(existing):  # a missing folder is made by its first write (no raise on long names)
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what}={folder}: {existing} is a file, not a folder")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise UsageError(f"{what}={folder}: the name {part[:40]}... is {len(os.fsencode(part))} bytes, "
                             f"more than the {name_max} its filesystem allows")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{what}={folder} is not writable: {e.strerror or e} ({existing})") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_lines(path: str | os.PathLike, lines, chunk: int = 1 << 16) -> None:
    """`lines` (a sequence of str), one a line, written atomically a chunk at a time: the same
    bytes as write_text of them joined, without one string of all of them."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for s in range(0, len(lines), chunk):
            f.write("".join(x + "\n" for x in lines[s:s + chunk]))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksum_path(path) -> Path:
    return Path(str(path) + CHECKSUM_SUFFIX)


def write_checksum(path: str | os.PathLike) -> None:
    """Record the SHA-256 of a finished cache file beside it (written after the file)."""
    write_text(_checksum_path(path), file_sha256(path) + "\n")


def checksum_ok(path: str | os.PathLike) -> bool:
    """True if a file exists and matches the checksum beside it; unlike `verified`, a record (not a
    cache entry) is never removed: the caller reports it."""
    try:
        return _checksum_path(path).read_text().strip() == file_sha256(path)
    except OSError:
        return False


def verified(path: str | os.PathLike) -> bool:
    """True if the cache entry exists and matches its checksum. A damaged or unverifiable entry
    is removed with a warning (the caller recomputes it); False then, and when it is absent."""
    path = Path(path)
    if not path.exists():
        _checksum_path(path).unlink(missing_ok=True)
        return False
    try:
        want = _checksum_path(path).read_text().strip()
    except OSError:
        want = None
    if want == file_sha256(path):
        return True
    why = "has no checksum (unverifiable)" if want is None else "does not match its checksum (damaged)"
    warn(f"cache entry {path} {why}: recomputing it")
    path.unlink(missing_ok=True)
    _checksum_path(path).unlink(missing_ok=True)
    return False


def save_npy(path: str | os.PathLike, a: np.ndarray, checksum: bool = False) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, a)
    if checksum:
        write_checksum(path)


def save_table(path: str | os.PathLike, df, meta: dict | None = None, checksum: bool = False) -> None:
    """Write a pandas table as parquet, with `meta` (config key, schema) in its metadata; a
    cache entry (`checksum`) gets its checksum file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta:
        md = dict(table.schema.metadata or {})
        md[b"rsprune"] = json.dumps(meta, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(md)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    if checksum:
        write_checksum(path)


def table_meta(path: str | os.PathLike) -> dict:
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    raw = md.get(b"rsprune")
    return json.loads(raw) if raw else {}


def load_table(path: str | os.PathLike, key: str | None = None, columns: list[str] | None = None,
               verify: bool = False):
    """Read a table written by save_table; None if absent or written under another key, and
    (`verify`: a cache entry) if it fails its checksum."""
    import pandas as pd

    path = Path(path)
    if not (verified(path) if verify else path.exists()):
        return None
    if key is not None and table_meta(path).get("key") != key:
        return None
    df = pd.read_parquet(path)
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; delete it to recompute")
    return df


def cached_table(path: str | os.PathLike, key: str, compute) -> tuple[Any, bool]:
    """(table, was_cached): the table at `path` if written under `key`, else compute and save."""
    df = load_table(path, key, verify=True)
    if df is not None:
        return df, True
    df = compute()
    save_table(path, df, {"key": key}, checksum=True)
    return df, False
