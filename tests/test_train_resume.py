"""Resume under damage (torn log, incomplete checkpoint, planted pickles), config changes between
reruns, EMA snapshots and probe hooks, the constant LR option: real AID images, tiny UNet."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import aid_paths, tiny_overrides, write_kept

from rsprune.cli import UsageError, compose

FAST = {"train.sample_every": 0, "train.snapshot_steps": "[]"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, write_kept(root / "prune", aid_paths(16, offset=3)), root / "cache"


def _run(overrides, probes=None):
    from train.main import run

    cfg = compose("train", overrides)
    return run(cfg, probes) if probes else run(cfg)


def _steps(run_dir):
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(ck, sub="unet"):
    from safetensors.torch import load_file

    return load_file(str(ck / sub / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def straight(base):
    """An uninterrupted 4-step run: what every damaged-then-resumed run must equal."""
    root, kept, cache = base
    _run(tiny_overrides(kept, root / "straight", cache, **FAST, **{"train.max_steps": 4}))
    return root / "straight/checkpoints/step_0000004"


def _assert_same_weights(ck, ref):
    for sub in ("unet", "unet_ema"):
        a, b = _weights(ck, sub), _weights(ref, sub)
        assert all(torch.equal(a[k], b[k]) for k in b), f"{sub} differs from the uninterrupted run"


def test_torn_last_metrics_line_does_not_break_resume(base, straight):
    root, kept, cache = base
    run_dir = root / "torn"
    _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 3}))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # a kill in the middle of a write
    out = _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 4}))
    assert out["step"] == 4 and _steps(run_dir) == [0, 1, 2, 3, 4]
    _assert_same_weights(run_dir / "checkpoints/step_0000004", straight)


def test_incomplete_latest_checkpoint_falls_back_to_the_newest_complete(base, straight, caplog):
    root, kept, cache = base
    run_dir = root / "incomplete"
    over = {**FAST, "train.checkpoint_every": 1, "train.checkpoints_total_limit": 0}
    _run(tiny_overrides(kept, run_dir, cache, **over, **{"train.max_steps": 3}))
    latest = run_dir / "checkpoints/step_0000003"
    for f in latest.glob("optimizer*"):  # a copy cut short: the optimizer state never arrived
        f.unlink()
    with caplog.at_level("WARNING"):
        out = _run(tiny_overrides(kept, run_dir, cache, **over, **{"train.max_steps": 4}))
    assert "step_0000003 is incomplete (missing optimizer.safetensors)" in caplog.text
    assert out["step"] == 4 and _steps(run_dir) == [0, 1, 2, 3, 4]  # steps 3-4 redone from step 2
    _assert_same_weights(run_dir / "checkpoints/step_0000004", straight)


def _truncate(ck):
    f = ck / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])  # a copy cut short


def _huge_header(ck):
    f = ck / "optimizer.safetensors"
    f.write_bytes((2 ** 62).to_bytes(8, "little") + f.read_bytes()[8:])  # a header length of 2^62


def _state_list(ck):
    (ck / "trainer_state.json").write_text("[]")


@pytest.mark.parametrize("damage", [_truncate, _huge_header, _state_list], ids=lambda f: f.__name__[1:])
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(base, straight, caplog, damage):
    root, kept, cache = base
    run_dir = root / f"damaged{damage.__name__}"
    over = {**FAST, "train.checkpoint_every": 1, "train.checkpoints_total_limit": 0}
    _run(tiny_overrides(kept, run_dir, cache, **over, **{"train.max_steps": 3}))
    damage(run_dir / "checkpoints/step_0000003")
    with caplog.at_level("WARNING"):
        out = _run(tiny_overrides(kept, run_dir, cache, **over, **{"train.max_steps": 4}))
    assert "step_0000003 does not load" in caplog.text
    assert out["step"] == 4 and _steps(run_dir) == [0, 1, 2, 3, 4]  # steps 3-4 redone from step 2
    _assert_same_weights(run_dir / "checkpoints/step_0000004", straight)


class _Planted:
    """Unpickling this creates `marker`: the proof that something ran code from the run folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_a_planted_file(base, straight):
    root, kept, cache = base
    run_dir = root / "planted"
    _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 2}))
    ck = run_dir / "checkpoints/step_0000002"
    assert not [p.name for p in ck.rglob("*") if p.suffix in (".pkl", ".bin", ".pt", ".pth")]
    marker = root / "planted-code-ran"
    # What accelerate's load_state and the old downstream trainer would have unpickled.
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                 "scheduler.bin", "state.pt"):
        torch.save({"state": _Planted(marker)}, ck / name)
    (ck / "evil.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    out = _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 4}))
    assert out["step"] == 4 and not marker.exists()
    _assert_same_weights(run_dir / "checkpoints/step_0000004", straight)


def test_rerun_with_another_config_is_refused_naming_the_keys(base, tmp_path):
    root, kept, cache = base
    run_dir = tmp_path / "run"
    _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 1}))
    with pytest.raises(UsageError, match=r"train\.batch_size: 4 -> 2.*train\.ema\.decay"):
        _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 2, "train.batch_size": 2,
                                                             "train.ema.decay": 0.5}))
    other = write_kept(tmp_path / "other", aid_paths(16, offset=5))  # other data: another kept list
    with pytest.raises(UsageError, match=r"data\.subset"):
        _run(tiny_overrides(other, run_dir, cache, **FAST, **{"train.max_steps": 2}))
    text = (run_dir / "config.yaml").read_text()
    assert "batch_size: 4" in text and "max_steps: 1" in text  # a refused rerun overwrites nothing
    # max_steps may grow and keys that do not change the trajectory may differ: the run extends.
    out = _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 2, "train.log_every": 2,
                                                               "train.checkpoint_every": 2}))
    assert out["step"] == 2 and "max_steps: 2" in (run_dir / "config.yaml").read_text()


class _Recorder:
    """A probe set that records its calls and reports one number each."""

    def __init__(self):
        self.heldout_steps, self.sample_shapes = [], []

    def heldout(self, step, unet_ema):
        self.heldout_steps.append(step)
        assert not unet_ema.training
        return {"heldout_probe": float(step)}

    def samples(self, step, latents, images):
        self.sample_shapes.append((step, tuple(latents.shape), images.shape, str(images.dtype)))
        return {"sample_std": float(latents.std())}


def test_snapshots_and_probe_hooks(base, tmp_path):
    from train.generate import list_snapshots, load_backbone

    root, kept, cache = base
    run_dir = tmp_path / "snap"
    rec = _Recorder()
    _run(tiny_overrides(kept, run_dir, cache, **{"train.max_steps": 4, "train.checkpoint_every": 4,
                                                 "train.snapshot_steps": "[1,2,10]", "train.sample_every": 3,
                                                 "train.checkpoints_total_limit": 1}), rec)
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["step_0000001", "step_0000002"]
    assert sorted(p.name for p in (run_dir / "snapshots/step_0000001").iterdir()) == [
        "first_stage.json", "scheduler", "unet_ema"]
    assert [s for s, _ in list_snapshots(run_dir)] == [1, 2, 4]
    assert rec.heldout_steps == [1, 2, 4]  # snapshot and checkpoint steps
    grid = ((4, 32, 4, 4), (4, 32, 32, 3), "uint8")  # sample_n latents at 32 px and their decoded images
    assert rec.sample_shapes == [(3, *grid), (4, *grid)]
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert records[2]["heldout_probe"] == 2.0 and "loss" in records[2]  # merged into the step's one record
    assert "sample_std" in records[3] and "heldout_probe" not in records[3]
    one, _, _, info = load_backbone(run_dir, step=1)
    two = load_backbone(run_dir, step=2)[0]
    assert info["path"].endswith("snapshots/step_0000001")
    assert any(not torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters()))


def test_constant_lr_after_warm_up(base, tmp_path):
    root, kept, cache = base
    lrs = {}
    for schedule in ("constant", "cosine"):
        run_dir = tmp_path / schedule
        _run(tiny_overrides(kept, run_dir, cache, **FAST, **{"train.max_steps": 5, "optim.schedule": schedule,
                                                             "optim.warmup_steps": 2, "optim.lr": 1e-3}))
        lrs[schedule] = [r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                         if "lr" in r]
    assert lrs["constant"][1:] == [1e-3] * 4  # flat from the end of warm-up
    assert all(a > b for a, b in zip(lrs["cosine"][1:], lrs["cosine"][2:]))  # the cosine decays


@pytest.mark.parametrize("kind", ["snapshot", "checkpoint"])
def test_a_full_disk_while_saving_a_step_is_one_line_and_leaves_no_temporary(base, tmp_path, kind):
    """A file-size limit stands in for a full disk: the save of a real tiny network fails in
    diffusers' or safetensors' writer; the user gets one line naming the step folder, and no
    `.tmp-step_*` folder is left for a later resume to trip on."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    root, kept, cache = base
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(kept, run_dir, cache)
    save = ("checkpoint.save_snapshot(run_dir, 3, unet, ema, sched, {'kind': 'taef2'})" if kind == "snapshot" else
            "checkpoint.save_checkpoint(run_dir, 3, unet, ema, opt, setup.build_lr_scheduler(opt, cfg.optim), "
            "sched, {'kind': 'taef2'}, {})")
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an over-limit write is then EFBIG, as a full disk is ENOSPC
from rsprune.cli import UsageError, compose
from train import checkpoint, setup
cfg = compose("train", {overrides!r})
run_dir = {str(run_dir)!r}
unet = setup.build_unet(cfg.unet, 32, 4)
ema, sched = setup.build_ema(unet, cfg.train.ema), setup.build_noise_scheduler(cfg.scheduler)
opt = setup.build_optimizer(unet.parameters(), cfg.optim)
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
try:
    {save}
except UsageError as e:
    print("error:", e, file=sys.stderr)
    sys.exit(2)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"error: cannot write {run_dir}/{kind}s/step_0000003"), lines[0]
    assert not list((run_dir / f"{kind}s").iterdir())  # no temporary, no half step
