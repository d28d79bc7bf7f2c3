"""Shared by the benchmark scripts: machine facts, timing, tables, and BENCHMARKS.md sections.

Each script owns one section of BENCHMARKS.md between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->`; rerunning a script replaces only its own section.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
DATA = Path(os.environ.get("RSPRUNE_DATA", ROOT / ".." / "shared" / "data")).resolve()


def _busy_cores(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over `seconds` (this one sleeps meanwhile), from
    /proc/stat; the load average would still count a job that ended a minute ago."""
    def sample():
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f) - f[3] - f[4], sum(f)  # busy (all but idle and iowait), total
    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
        return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        return float("nan")


# Other work when the script started: a run on a busy machine says so in its section.
START_BUSY = _busy_cores()
START_LOAD = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
HEADER = "# Benchmarks\n\nEach section is written by the script named in it; rerun the command to refresh it.\n"


def machine() -> str:
    """One line: cores, CPU model, RAM, load when the run started (the machine may be shared)."""
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        ram = f"{mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        ram = "RAM ?"
    return (f"{os.cpu_count()} cores (nproc), {model}, {ram}; at start {START_BUSY:.2f} cores busy with other "
            f"work (load average {START_LOAD:.2f})")


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table; floats shown with 3 significant digits unless already strings."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, shared_note: bool | None = None) -> None:
    """Replace (or append) this benchmark's section of BENCHMARKS.md, atomically. The shared-
    machine note appears when asked, or by default when other work kept >= 0.5 core busy at start."""
    from rsprune.cache import write_text

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    note = ("\n\nThe machine was shared with other jobs during the run: absolute figures are noisy; "
            "ratios come from the same run." if (START_BUSY >= 0.5 if shared_note is None else shared_note) else "")
    text = (f"<!-- bench:{name} -->\n## {title}\n\n`{command()}`  \n{machine()}; {now}.{note}\n\n"
            f"{body.strip()}\n<!-- /bench:{name} -->")
    old = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip() + "\n\n" + text + "\n"
    write_text(BENCHMARKS_MD, new)
    print(f"wrote section {name!r} of {BENCHMARKS_MD}")
