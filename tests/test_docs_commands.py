"""The docs run as written: every fenced bash command in README.md and docs/ is exercised.

A command of ours (`python SCRIPT ...`, `accelerate launch ... SCRIPT ...`) is composed with its
own arguments and `--cfg` (the resolved config, nothing run), so a renamed key, group or script
fails here; a script without the Hydra layer runs `--help`; a shell script is parsed (`bash -n`).
Loop variables take their first value; `pip`, `conda` and `export` lines are set-up, not checked.
Also: every relative link resolves, and no user document, config or results table names an issue.
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"```bash\n(.*?)```", re.S)
SETUP = {"pip", "conda", "export", "cd", "wandb"}


def logical_lines(block: str) -> list[str]:
    out, cur = [], ""
    for line in block.splitlines():
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        out.append(cur.strip())
        cur = ""
    return [x for x in out if x and not x.startswith("#")]


def simple_commands(line: str, env: dict[str, str]) -> list[list[str]]:
    """Shell words of each command on a line (split at && ; |), loop headers recorded in `env`."""
    words = shlex.split(line, comments=True, posix=True)
    cmds, cur = [], []
    for w in words + [";"]:
        if w in ("&&", ";", "||", "|") or w.endswith(";") and w != ";":
            if w.endswith(";") and w != ";":
                cur.append(w[:-1])
            if cur:
                cmds.append(cur)
            cur = []
        else:
            cur.append(w)
    out = []
    for c in cmds:
        c = c[1:] if c[0] == "do" else c
        if not c or c[0] in ("done", "fi", "then") or c[0].startswith("["):
            continue
        if c[0] == "for" and len(c) >= 4 and c[2] == "in":  # `for VAR in A B C` -> VAR=A
            env[c[1]] = c[3]
            continue
        while c and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", c[0]):  # leading VAR=value
            name, _, value = c[0].partition("=")
            if len(c) == 1:
                env.setdefault(name, value)
            c = c[1:]
        if c:
            out.append(c)
    return out


def expand(word: str, env: dict[str, str]) -> str:
    def sub(m):
        name = m.group(1) or m.group(2)
        assert name in env, f"${name} is not set by the commands before it"
        return env[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, word)


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text()):
            env: dict[str, str] = {}
            for line in logical_lines(block):
                for cmd in simple_commands(line, env):
                    if cmd[0] in SETUP:
                        continue
                    found.append((f"{doc.relative_to(ROOT)}: {line[:80]}", [expand(w, env) for w in cmd]))
    return found


def entry(cmd: list[str]) -> tuple[str, list[str]]:
    """('script', args) | ('module', args) | ('shell', [script]) for one documented command."""
    if cmd[:2] == ["accelerate", "launch"]:
        rest = cmd[2:]
        while rest and rest[0].startswith("--"):  # launcher options, with a value unless a flag
            flag = rest.pop(0)
            if flag not in ("--multi_gpu", "--cpu") and rest and not rest[0].endswith(".py"):
                rest.pop(0)
        return "script", rest
    if cmd[0] == "python" and cmd[1] == "-m":
        return "module", cmd[2:]
    if cmd[0] == "python":
        return "script", cmd[1:]
    if cmd[0] == "bash":
        return "shell", cmd[1:]
    raise AssertionError(f"no rule to check the command {' '.join(cmd)!r}: teach tests/test_docs_commands.py")


COMMANDS = doc_commands()


@functools.lru_cache(maxsize=None)
def registered_markers() -> str:
    return subprocess.run([sys.executable, "-m", "pytest", "--markers", "-p", "no:cacheprovider"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120).stdout


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs-cache")


def test_the_docs_have_commands_of_every_kind():
    kinds = {entry(c)[0] for _, c in COMMANDS}
    assert kinds >= {"script", "module", "shell"}, kinds
    scripts = {entry(c)[1][0] for _, c in COMMANDS if entry(c)[0] == "script"}
    for s in ("prune/run.py", "train/main.py", "train/sample.py", "eval/convergence.py", "eval/fid.py",
              "eval/tables.py", "downstream/sr.py", "downstream/semantic_synthesis.py"):
        assert s in scripts, f"{s} is named in no fenced command of the docs"


@pytest.mark.parametrize("where,cmd", COMMANDS, ids=[f"{i}" for i in range(len(COMMANDS))])
def test_documented_command_composes(where, cmd, docs_cache, monkeypatch):
    kind, args = entry(cmd)
    if kind == "shell":
        script = ROOT / args[0]
        assert script.is_file(), f"{where}: {script} not found"
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        return
    if kind == "module":
        assert args[0] == "pytest", f"{where}: unknown module {args[0]}"
        markers = registered_markers()
        marks = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-m"]
        for name in re.findall(r"[a-z_]+", " ".join(marks)):
            assert name in ("not", "and", "or") or f"@pytest.mark.{name}:" in markers, f"{where}: marker {name}"
        return
    script = ROOT / args[0]
    assert script.is_file(), f"{where}: {args[0]} not found"
    monkeypatch.setenv("RSPRUNE_CACHE", str(docs_cache))  # the split's list files go here, not the checkout
    if 'main("' not in script.read_text():  # no Hydra layer (benchmarks): its own --help
        p = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, f"{where}: {p.stderr[-500:]}"
        return
    argv = [str(script), *args[1:]] + ([] if "--cfg" in args or "--help" in args else ["--cfg"])
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            code = e.code or 0
    assert code == 0, f"{where}: exit {code}: {err.getvalue()[-500:]}"
    assert out.getvalue().strip(), f"{where}: printed nothing"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]+)(#[^)]*)?\)")


def test_every_relative_link_resolves():
    bad = []
    for doc in DOCS + [ROOT / "CHANGELOG.md", ROOT / "results" / "README.md"]:
        for target, _ in LINK.findall(doc.read_text()):
            if not re.match(r"[a-z]+:", target) and not (doc.parent / target).exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad


ISSUE = re.compile(r"\bissues?[ -]?#?\d+|#\d+\b", re.I)


def test_no_user_document_config_or_table_names_an_issue():
    files = DOCS + [ROOT / "CHANGELOG.md", *sorted((ROOT / "configs").rglob("*.yaml")),
                    *sorted((ROOT / "results").glob("*.md"))]
    bad = [f"{f.relative_to(ROOT)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
           if ISSUE.search(line)]
    assert not bad, bad
