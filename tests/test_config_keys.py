"""The YAML is the one source of a config value: code reads declared keys directly (no `.get(key,
default)` that shadows them), every key the code reads is declared, dead keys are gone, and run
folders written before a key was declared or dropped still resume."""
from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import small_cfg, tiny_overrides
from rsprune import layout
from rsprune.cache import stable_hash
from rsprune.cli import compose

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("train", "downstream", "eval", "prune")


def _yaml_keys(node) -> set[str]:
    if isinstance(node, dict):
        return {str(k) for k in node if k != "defaults"} | {k for v in node.values() for k in _yaml_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _yaml_keys(v)}
    return set()


DECLARED = {k for p in (ROOT / "configs").rglob("*.yaml") for k in _yaml_keys(yaml.safe_load(p.read_text()))}


def _rooted_at_cfg(node, cfg_names: set[str]) -> bool:
    """`cfg`, `ae_cfg`, `self.cfg.eval`, or a local name assigned from one of them."""
    while isinstance(node, ast.Attribute):
        if node.attr == "cfg" or node.attr.endswith("_cfg"):
            return True
        node = node.value
    return isinstance(node, ast.Name) and (node.id in cfg_names or node.id == "cfg" or node.id.endswith("_cfg"))


def _shadowing_gets(path: Path) -> list[str]:
    found = []
    for fn in [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.Module))]:
        names: set[str] = set()
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign) and _rooted_at_cfg(node.value, names):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in DECLARED
                    and _rooted_at_cfg(node.func.value, names)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .get({node.args[0].value!r})")
    return sorted(set(found))


def test_code_reads_declared_config_keys_directly():
    """A `.get("grad_accum", 1)` beside `grad_accum: 1` in YAML is two sources that can drift."""
    found = [hit for floor in FLOORS for p in sorted((ROOT / floor).rglob("*.py")) for hit in _shadowing_gets(p)]
    assert found == []


def test_dead_keys_are_gone_and_read_keys_are_declared():
    for ae in ("taef2", "sd_vae"):  # pretrained: nothing to fit, so no fitting steps to set
        assert "max_steps" not in compose("train", [f"autoencoder={ae}"]).autoencoder
    assert compose("train", ["autoencoder=kl_small"]).autoencoder.max_steps == 0
    with pytest.raises(Exception, match="max_steps"):  # a typo'd or dead key is refused, not ignored
        compose("train", ["autoencoder.max_steps=3"])
    assert compose("train").data.subset_hash is None  # filled in by train/main.py, recorded in config.yaml
    for task in ("downstream/sr", "downstream/semantic_synthesis"):
        cfg = compose(task)
        assert cfg.wandb is None and cfg.scratch_resolution == 64


def _flat_keys(cfg) -> set[str]:
    return set(layout._flat(OmegaConf.to_container(cfg, resolve=False)))


def test_every_may_differ_entry_names_a_declared_key():
    keys = set().union(*(_flat_keys(compose(n)) for n in ("train", "downstream/sr", "downstream/semantic_synthesis")))
    keys |= {"data.subset_hash.summary_sha256"}  # a sub-key of data.subset_hash (declared null) set by train/main.py
    for m in layout.MAY_DIFFER:
        assert any(k.startswith(m) if m.endswith(".") else k == m for k in keys), m


def test_a_key_declared_later_or_dropped_compares_as_its_old_value():
    old = {"autoencoder": {"kind": "taef2", "max_steps": 0}, "seed": 0}  # what the code before wrote
    new = {"autoencoder": {"kind": "taef2"}, "seed": 0, "scratch_resolution": 64, "wandb": None}
    assert layout.config_changes(old, new) == []
    assert layout.earlier_form(new) == old
    # another value is still another config
    assert layout.config_changes({**old, "autoencoder": {"kind": "taef2", "max_steps": 5}}, new) == ["autoencoder.max_steps"]
    assert layout.config_changes(old, {**new, "scratch_resolution": 32}) == ["scratch_resolution"]


def test_a_train_run_folder_written_before_the_dead_key_was_dropped_still_resumes(tiny_run, tmp_path):
    from train.main import run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    stored = OmegaConf.load(run_dir / layout.CONFIG)
    assert "max_steps" not in stored.autoencoder
    stored.autoencoder.max_steps = 0  # as the code before wrote it (taef2.yaml declared it)
    OmegaConf.save(stored, run_dir / layout.CONFIG)
    kept = Path(str(stored.data.subset))
    summary = run(compose("train", tiny_overrides(kept, run_dir, Path(str(stored.cache_dir)), **{"train.max_steps": 7})))
    assert summary["step"] == 7


def test_a_downstream_run_evaluated_before_the_new_keys_is_found_finished(tmp_path):
    """A scratch SR run whose config.yaml and metrics.json were written before `scratch_resolution`
    and `wandb` were declared and `autoencoder.max_steps` dropped: the rerun returns its metrics
    without training or evaluating again, and a longer run resumes in the same folder."""
    from downstream import sr

    over = ["backbone=none", "resolution=null", "sr.max_train=8", "sr.max_test=4", "train.cpu_threads=1"]
    m = sr.run(small_cfg("downstream/sr", tmp_path, *over))
    assert m["resolution"] == 64  # scratch_resolution
    run_dir = tmp_path / "run"  # small_cfg's run_dir
    # Rewrite the folder as the code before wrote it (its config form and its evaluation key).
    before = OmegaConf.to_container(small_cfg("downstream/sr", tmp_path, *over), resolve=True)
    del before["scratch_resolution"], before["wandb"]
    before["autoencoder"]["max_steps"] = 0
    metrics = json.loads((run_dir / "metrics.json").read_text()) | {"config_key": stable_hash(before)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    stored = OmegaConf.load(run_dir / layout.CONFIG)
    del stored["scratch_resolution"], stored["wandb"]
    stored.autoencoder.max_steps = 0
    OmegaConf.save(stored, run_dir / layout.CONFIG)
    log = (run_dir / "metrics.jsonl").read_text()
    assert sr.run(small_cfg("downstream/sr", tmp_path, *over)) == metrics
    assert (run_dir / "metrics.jsonl").read_text() == log  # nothing trained
    longer = sr.run(small_cfg("downstream/sr", tmp_path, *over, "train.max_steps=3"))
    assert longer["train_steps"] == 3
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # resumed from step 2, not refused or restarted


def test_scratch_resolution_sets_the_side_of_a_scratch_start(tmp_path):
    from downstream import finetune

    cfg = small_cfg("downstream/sr", tmp_path, "backbone=none", "scratch_resolution=32")
    *_, info = finetune.load_start(cfg, None)
    assert info["image_size"] == 32
