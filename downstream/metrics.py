"""Downstream metrics: PSNR/SSIM (torchmetrics), mIoU and FD (rsprune.features/frechet).

PSNR and SSIM are computed per image on RGB in [0, 1] (data_range 1, SSIM with the usual
11x11 Gaussian window, sigma 1.5), then averaged over images. FD goes through the ground floor's
feature extractor and torchmetrics Fréchet path (the same as eval/fid.py), with the real features extracted once and
shared by every row of a table.
"""
from __future__ import annotations

import numpy as np
import torch


def to01(images_uint8: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).to(dtype).div(255)


def psnr_ssim(pred_uint8: np.ndarray, target_uint8: np.ndarray) -> dict:
    """Per-image PSNR (dB) and SSIM of two uint8 NHWC batches: dict of (N,) arrays."""
    from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                               structural_similarity_index_measure)

    p, t = to01(pred_uint8, torch.float64), to01(target_uint8, torch.float64)
    psnr = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none")
    return {"psnr": psnr.numpy(), "ssim": ssim.numpy()}


def summary(values: np.ndarray) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def confusion(pred: np.ndarray, target: np.ndarray, k: int, ignore: int | None = None) -> np.ndarray:
    """(k, k) counts, rows = target class, cols = predicted class; `ignore` target pixels left out."""
    t, p = target.reshape(-1).astype(np.int64), pred.reshape(-1).astype(np.int64)
    keep = t != ignore if ignore is not None else np.ones_like(t, bool)
    return np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k)


def iou_scores(cm: np.ndarray, classes) -> dict:
    """mIoU over the classes present in target or prediction, per-class IoU, pixel accuracy."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    labelled = [i for i, name in enumerate(classes) if name != "unlabeled"]
    per = {classes[i]: (None if np.isnan(iou[i]) else float(iou[i])) for i in labelled}
    valid = iou[labelled][~np.isnan(iou[labelled])]
    return {"miou": float(valid.mean()) if valid.size else float("nan"), "iou": per,
            "pixel_acc": float(tp.sum() / max(cm.sum(), 1))}


class FDScorer:
    """FD of several image sets against one real set; the real features are extracted once."""

    def __init__(self, real_uint8: np.ndarray, feature: str = "efficientnet_lite2", batch_size: int = 64):
        from rsprune.features import build_extractor, extract_features

        self.extractor = build_extractor(feature)
        self.batch_size = batch_size
        self.real, _ = extract_features(real_uint8, self.extractor, batch_size)

    def __call__(self, fake_uint8: np.ndarray) -> float:
        from rsprune.features import extract_features
        from rsprune.frechet import fd_kid

        fake, _ = extract_features(fake_uint8, self.extractor, self.batch_size)
        return float(fd_kid(self.real, fake)["fd"])

    @property
    def name(self) -> str:
        return self.extractor.name
