"""The house: no import circles, no import from a lower floor to a higher one, one diffusion loop, one sampler.

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


# Every module that runs a training loop (calls backward and steps an optimizer), and why it is not
# train/engine.py, the one diffusion loop. Benchmarks time bare steps on purpose and are left out.
TRAINERS = {
    "train.engine": "the diffusion loop: accumulation, clipping, EMA, checkpoints, resume",
    "train.first_stage": "fit_kl: an autoencoder's reconstruction loss, cached by content, never resumed",
    "downstream.segnet": "the semantic-synthesis judge: a classifier fitted once per data and cached",
}
DIFFUSION_COMMANDS = ("train.main", "downstream.finetune")  # train a UNet: through engine.fit


def _calls(path: Path) -> set[str]:
    """Dotted names of what a module calls: `loss.backward()` -> "loss.backward", `fit()` -> "fit"."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f, parts = node.func, []
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                parts.append(f.id)
            out.add(".".join(reversed(parts)))
    return out


def _steps_an_optimizer(calls: set[str]) -> bool:
    backward = any(c == "backward" or c.endswith(".backward") for c in calls)
    step = any(c.endswith(".step") and "opt" in c.rsplit(".", 2)[-2].lower() for c in calls if "." in c)
    return backward and step


def test_training_loops_are_the_engine_or_a_named_trainer():
    loops = {m for m, p in _modules().items() if not m.startswith("benchmarks") and _steps_an_optimizer(_calls(p))}
    assert loops == set(TRAINERS), f"training loops in {sorted(loops)}; expected {sorted(TRAINERS)} (TRAINERS says why)"


def test_diffusion_training_goes_through_the_engine():
    """The commands that train a UNet import train.engine and call engine.fit; only the engine
    calls the diffusion loss (benchmarks time it bare)."""
    graph, mods = _graph(), _modules()
    for mod in DIFFUSION_COMMANDS:
        assert "train.engine" in graph[mod] and "engine.fit" in _calls(mods[mod]), f"{mod} trains outside engine.fit"
    loss_users = {m for m, p in mods.items() if not m.startswith("benchmarks")
                  and any(c.endswith("diffusion_loss") for c in _calls(p))}
    assert loss_users == {"train.engine"}, f"the diffusion loss is called from {sorted(loss_users)}"


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


def test_tables_never_import_the_commands_that_wrote_them():
    """eval/ reads run folders: no eval module imports prune (prune/sweep.py runs the sweeps, and
    rsprune/sweeps.py names their folders for both)."""
    bad = sorted(f"{m} -> {d}" for m, deps in _graph().items() if m.startswith("eval")
                 for d in deps if d.startswith("prune"))
    assert not bad, f"eval runs prune: {bad}"


def test_top_level_names_import_from_this_checkout():
    """prune, train, eval and downstream are generic names (docs/architecture.md): another
    distribution claiming one in this environment would shadow or overwrite ours."""
    import importlib

    for name in ("rsprune", "prune", "train", "eval", "downstream"):
        origin = Path(importlib.import_module(name).__file__).resolve()
        assert origin.is_relative_to(ROOT), f"`import {name}` finds {origin}, not this checkout"
