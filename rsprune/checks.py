"""Config value checks shared by every command's validation (prune/validate.py, train/validate.py):
a bad value is a UsageError naming the key and what it must be, never a late traceback."""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from rsprune.errors import UsageError


def get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def check_choice(key: str, value, allowed) -> None:
    # `True in ("auto", 1)` is True in Python: compare types too, so 1 is not taken for true.
    if not any(value == a and type(value) is type(a) for a in allowed):
        shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in allowed)
        raise UsageError(f"{key} must be one of {shown}; got {value!r}")


def check_number(key: str, value, kind, lo, hi, lo_ok: bool, hi_ok: bool) -> None:
    ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (kind is float and not math.isfinite(value)):
        raise UsageError(f"{key} must be {'an integer' if kind is int else 'a number'}; got {value!r}")
    if value < lo or value > hi or (value == lo and not lo_ok) or (value == hi and not hi_ok):
        low = f"{'>=' if lo_ok else '>'} {lo}"
        high = "" if hi == math.inf else f" and {'<=' if hi_ok else '<'} {hi}"
        raise UsageError(f"{key} must be {low}{high}; got {value!r}")


def check_table(cfg: DictConfig, choices: dict, numbers: dict) -> None:
    """Every key of the two tables that this config holds (absent or null keys are skipped)."""
    for key, allowed in choices.items():
        if get(cfg, key) is not None:
            check_choice(key, get(cfg, key), allowed)
    for key, spec in numbers.items():
        if get(cfg, key) is not None:
            check_number(key, get(cfg, key), *spec)
