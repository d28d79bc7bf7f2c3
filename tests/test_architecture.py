"""The house: no import circles, no import from a lower floor to a higher one, one optimizer loop.

Floors (issue 12): rsprune (ground) <- prune, train <- eval <- downstream <- benchmarks. prune and
train stand side by side and import neither each other; tests may import anything.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"rsprune": 0, "prune": 1, "train": 1, "eval": 2, "downstream": 3, "benchmarks": 4}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in FLOORS:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """Project modules imported by `mod` anywhere in its body (deferred imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != mod:
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_import_reaches_up_or_sideways_a_floor():
    bad = []
    for mod, deps in _graph().items():
        top = mod.split(".")[0]
        for d in deps:
            dtop = d.split(".")[0]
            if dtop != top and FLOORS[dtop] >= FLOORS[top]:
                bad.append(f"{mod} -> {d}")
    assert not bad, "imports against the floors: " + ", ".join(sorted(bad))


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            # A package importing its own submodule (pkg -> pkg.sub -> pkg) is how packages work.
            if len(comp) > 1 and not all(c.startswith(min(comp, key=len)) for c in comp):
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_one_module_steps_an_optimizer_with_gradient_clipping():
    clipping = [m for m, p in _modules().items() if "clip_grad_norm" in p.read_text()
                and not m.startswith("benchmarks")]
    assert len(clipping) == 1, f"gradient clipping in {clipping}: one training engine should own it"


def _attribute_readers(attr: str) -> set[str]:
    """Project modules (benchmarks aside) that read `<something>.<attr>`."""
    out = set()
    for mod, path in _modules().items():
        if mod.startswith("benchmarks"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(n, ast.Attribute) and n.attr == attr for n in ast.walk(tree)):
            out.add(mod)
    return out


def test_one_sampler():
    """Reverse diffusion (a scheduler's step(...).prev_sample) happens in train.generate only:
    unconditional samples, downstream conditions and evaluation all go through sample_latents.
    (benchmarks/protocol_demo.py replays the old clipped sampler on purpose.)"""
    assert _attribute_readers("prev_sample") == {"train.generate"}
