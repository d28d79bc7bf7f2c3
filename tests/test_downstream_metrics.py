"""PSNR/SSIM of bicubic x4 on real images against a NumPy reference; mIoU against scikit-learn."""
from __future__ import annotations

import numpy as np

from downstream.metrics import confusion, iou_scores, psnr_ssim
from downstream.sr import load_hr_lr
from conftest import DATA


def _gauss(n=11, s=1.5):
    x = np.arange(n) - (n - 1) / 2
    g = np.exp(-x ** 2 / (2 * s * s))
    return g / g.sum()


def _filter_valid(a, g):
    n, (h, w) = len(g), a.shape
    a = sum(g[i] * a[i:h - n + 1 + i] for i in range(n))
    return sum(g[i] * a[:, i:w - n + 1 + i] for i in range(n))


def ssim_numpy(x, y, c1=0.01 ** 2, c2=0.03 ** 2):
    """Gaussian SSIM (11x11, sigma 1.5) of two HxWx3 images in [0, 1], map averaged over channels and
    pixels; borders by reflection padding (the convention torchmetrics follows)."""
    g, maps = _gauss(), []
    for ch in range(3):
        a, b = (np.pad(v[..., ch], 5, mode="reflect") for v in (x, y))
        ma, mb = _filter_valid(a, g), _filter_valid(b, g)
        vaa, vbb = _filter_valid(a * a, g) - ma ** 2, _filter_valid(b * b, g) - mb ** 2
        vab = _filter_valid(a * b, g) - ma * mb
        maps.append((2 * ma * mb + c1) * (2 * vab + c2) / ((ma ** 2 + mb ** 2 + c1) * (vaa + vbb + c2)))
    return float(np.mean(maps))


def test_bicubic_psnr_ssim_match_numpy_reference():
    paths = sorted((DATA / "nwpu12" / "test").glob("*/*.jpg"))[::150][:8]
    hr, lr, bic, bad = load_hr_lr(paths, 64, 4)
    assert bad == 0 and lr.shape == (8, 16, 16, 3) and bic.shape == hr.shape
    got = psnr_ssim(bic, hr)
    x, y = bic.astype(np.float64) / 255, hr.astype(np.float64) / 255
    psnr_ref = 10 * np.log10(1.0 / ((x - y) ** 2).mean(axis=(1, 2, 3)))
    ssim_ref = np.array([ssim_numpy(a, b) for a, b in zip(x, y)])
    np.testing.assert_allclose(got["psnr"], psnr_ref, rtol=1e-6)  # torchmetrics sums in float32
    np.testing.assert_allclose(got["ssim"], ssim_ref, atol=1e-9)
    assert 15 < psnr_ref.mean() < 40 and 0.2 < ssim_ref.mean() < 0.99  # x4 bicubic on real scenes
    same = psnr_ssim(hr[:2], hr[:2])
    assert np.all(same["ssim"] > 0.9999)


def test_miou_matches_sklearn_jaccard():
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, (4, 32, 32))
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, 5, target.shape))
    pred[pred == 2] = 1  # class 2 never predicted: IoU 0 but still counted (it is in the target)
    scores = iou_scores(confusion(pred, target, 6, ignore=5), ("a", "b", "c", "d", "e", "unlabeled"))
    keep = target.reshape(-1) != 5
    ref = jaccard_score(target.reshape(-1)[keep], pred.reshape(-1)[keep], labels=[0, 1, 2, 3, 4], average=None)
    assert np.allclose([scores["iou"][k] for k in "abcde"], ref)
    assert np.isclose(scores["miou"], ref.mean()) and scores["iou"]["c"] == 0
    assert np.isclose(scores["pixel_acc"], (pred.reshape(-1) == target.reshape(-1))[keep].mean())
