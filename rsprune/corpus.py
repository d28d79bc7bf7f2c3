"""What a corpus entry names: a folder tree of images, or a list file of image paths.

Every stage that lists images (prune index, training data, evaluation sets) goes through
`list_files`, so folders and lists mean the same thing everywhere.

List file: one path a line; lines starting with '#' are comments. A `# base: DIR` header makes
relative lines relative to DIR and names each entry's root by its first folder under DIR (so
`aid/Airport/a.jpg` listed under base `data/` gets root `aid`, relpath `Airport/a.jpg`: the same
id as walking the `aid` folder). Without a header, relative lines are relative to the list's
own folder and the root is the list's name.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from rsprune.errors import UsageError
from rsprune.imageio import list_images

LIST_SUFFIX = ".txt"
BASE_HEADER = "# base: "


def is_list(entry) -> bool:
    return str(entry).endswith(LIST_SUFFIX) and os.path.isfile(entry)


def _text(path) -> str:
    """A list file's text: UTF-8, a byte-order mark (as Windows editors write) dropped."""
    try:
        return Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[:e.start].count(b"\n") + 1
        raise UsageError(f"list file {path} is not UTF-8 text (undecodable byte at line {line}; UTF-16? "
                         "save it as UTF-8)") from None
    except OSError as e:
        raise UsageError(f"list file {path} cannot be read: {e.strerror or e}") from None


def _parse(path) -> tuple[str | None, list[str]]:
    """(base, lines): refuses, naming the line, one with trailing whitespace (unless a file of
    exactly that name exists) and one repeating an earlier line's path."""
    base, lines, first = None, [], {}
    for n, line in enumerate(_text(path).splitlines(), 1):
        if line.startswith(BASE_HEADER) and base is None and not lines:
            base = line[len(BASE_HEADER):].strip()
        elif line.strip() and not line.startswith("#"):
            anchor = base if base is not None else os.path.dirname(os.path.abspath(path))
            full = os.path.normpath(os.path.join(anchor, line))
            if line != line.rstrip() and not os.path.lexists(full):
                raise UsageError(f"{path} line {n}: trailing whitespace after {line.rstrip()!r}; remove it")
            if full in first:
                raise UsageError(f"{path} line {n} repeats line {first[full]} ({line.strip()}); "
                                 "list each image once")
            first[full] = n
            lines.append(line)
    return base, lines


def read_list(path) -> list[str]:
    """Absolute paths of a list file, in its order."""
    base, lines = _parse(path)
    anchor = base if base is not None else os.path.dirname(os.path.abspath(path))
    return [os.path.normpath(os.path.join(anchor, p)) for p in lines]


def write_list(path, paths: list[str], base: str | None = None, comment: str = "") -> None:
    """Write a list file atomically; with `base`, paths under it are stored relative to it."""
    from rsprune.cache import write_text

    head = [f"# {c}" for c in comment.splitlines()] if comment else []
    if base is not None:
        base = os.path.abspath(base)
        head.insert(0, BASE_HEADER + base)
        paths = [os.path.relpath(p, base) for p in paths]
    write_text(path, "\n".join(head + list(paths)) + "\n")


def _list_rows(path: str) -> list[tuple[str, str, str]]:
    base, lines = _parse(path)
    anchor = base if base is not None else os.path.dirname(os.path.abspath(path))
    rows = []
    for line in lines:
        full = os.path.normpath(os.path.join(anchor, line))
        if base is not None and not os.path.isabs(line):
            root, _, rel = os.path.normpath(line).partition(os.sep)
            if rel:
                rows.append((root, full, rel))
                continue
        rows.append((Path(path).stem, full, full.lstrip(os.sep)))
    return rows


def list_files(entries, exclude=()) -> pd.DataFrame:
    """Every image named by `entries` (folders and list files): columns root, path, relpath.

    A folder contributes its images sorted by relative path, under its own name as root
    (folder symlinks followed, each real folder once); a list file contributes its lines in
    order. Nothing under a folder of `exclude` is listed (a run's output or cache folder inside
    the corpus must not become corpus images). A missing entry is a UsageError.
    """
    entries = [entries] if isinstance(entries, (str, os.PathLike)) else list(entries or [])
    rows = []
    for entry in map(str, entries):
        if is_list(entry):
            skip = [os.path.realpath(e) + os.sep for e in exclude]
            rows += [r for r in _list_rows(entry) if not any(os.path.realpath(r[1]).startswith(d) for d in skip)]
        elif os.path.isdir(entry):
            root = os.path.abspath(entry)
            name = os.path.basename(root.rstrip(os.sep))
            rows += [(name, os.path.join(root, rel), rel) for rel in list_images(root, exclude)]
        else:
            raise UsageError(missing(entry))
    return pd.DataFrame(rows, columns=["root", "path", "relpath"])


def missing(entry: str) -> str:
    """Why `entry` names no images: the path itself, and where a relative one was looked for."""
    what = "is neither a folder nor a " + LIST_SUFFIX + " list of images" if os.path.exists(entry) else "does not exist"
    where = "" if os.path.isabs(entry) else f" (a relative path, read from {os.getcwd()})"
    return f"{entry} {what}{where}"
