"""The one device rule of every command: `auto` (or nothing) is this process's GPU when CUDA is
present, else the CPU; `cpu` and `cuda[:i]` are taken as given, `cuda` without CUDA refused."""
from __future__ import annotations

import os

from rsprune.errors import UsageError


def resolve(name=None, key: str = "device") -> str:
    """A torch device string for `name` (None / "" / "auto" / "cpu" / "cuda" / "cuda:i"); `key` names
    the config value in the error."""
    import torch

    name = "auto" if name in (None, "", "None", "null") else str(name)
    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{key}={name} but CUDA is not available; use cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"unknown {key} {name!r}; choose cpu, cuda, cuda:N or auto")
    return name
