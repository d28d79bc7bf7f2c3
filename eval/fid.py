"""Fréchet distance (FID with feature=inception) and KID between two folder trees of images.

    python eval/fid.py real=DIR fake=DIR [feature=efficientnet_lite2|efficientnet_lite0|clip|dinov2|inception]
                       [inception_weights=PATH] [kid=true] [match_resolution=true] [out=FILE.json]

Prints `kid=<value>` (where computed) and, as the last line, `fd=<value>`; with out=FILE also
writes them (and the counts) as JSON. Features come from rsprune.features (the reference set's
are cached by content hash) and the distances from rsprune.frechet.fd_kid (torchmetrics,
float64).

Same resolution first (`match_resolution=true`, the default): both sets are brought to the
smallest image side found in either set (antialiased bicubic) before the extractor's own
resize, so 600 px real AID tiles against 64 px samples are compared at 64 px; otherwise FD
measures the resolution gap (510 real AID images at 128 px against themselves at 64 px: FD
246.5 unmatched, 0 matched; two disjoint draws of 510 at 64 px score 284.8: README, Evaluation).
`match_resolution=N` uses side N; `false` skips it.

Unreadable images are counted and skipped; fewer than 2 images is an error (exit 2); fewer
than `warn_below` gives a warning that FD is biased upward at small N (KID is unbiased, which
is why it is reported beside FD). KID subsets hold at most half the smaller set
(rsprune.frechet.kid_subset), so the std over subsets is a real spread.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from rsprune.cache import write_json
from rsprune.cli import UsageError, main
from rsprune.features import build_extractor, common_side, extract_features, metric_label, reference_stats, warn
from rsprune.frechet import check_count, fd_kid
from rsprune.imageio import list_images


def image_paths(root, what: str) -> list[str]:
    if root is None or str(root) in ("", "None"):
        raise UsageError(f"{what}=DIR is required")
    root = Path(str(root))
    if not root.is_dir():
        raise UsageError(f"{what}={root}: not a folder")
    return [str(root / p) for p in list_images(root)]


def encoder_overrides(cfg) -> dict:
    """`encoder_overrides` plus the `resolution` shortcut, as a plain dict."""
    from omegaconf import OmegaConf

    ov = OmegaConf.to_container(cfg.encoder_overrides or OmegaConf.create({}), resolve=True)
    if cfg.resolution:
        ov["resolution"] = int(cfg.resolution)
    return ov


def matched_side(rule, real, fake) -> int | None:
    """The side both sets are resized to first: true -> common_side, an int -> that side, false -> none."""
    if isinstance(rule, bool) or str(rule).lower() in ("true", "false"):
        return common_side(real, fake) if str(rule).lower() == "true" else None
    try:
        side = int(rule)
    except (TypeError, ValueError):
        raise UsageError(f"match_resolution={rule}: expected true, false or a side in pixels") from None
    if side < 8:
        raise UsageError(f"match_resolution={side}: a side of at least 8 pixels")
    return side


def run(cfg: DictConfig) -> dict:
    """Score `cfg.fake` against `cfg.real` (whose statistics are cached)."""
    real, fake = image_paths(cfg.real, "real"), image_paths(cfg.fake, "fake")
    extractor = build_extractor(cfg.feature, inception_weights=cfg.inception_weights,
                                overrides=encoder_overrides(cfg), device=cfg.device)
    side = matched_side(cfg.match_resolution, real, fake)
    ref = reference_stats(real, extractor, cfg.cache_dir, root=cfg.real, batch_size=cfg.batch_size,
                          num_workers=cfg.num_workers, pre_size=side)
    ff, fake_bad = extract_features(fake, extractor, cfg.batch_size, cfg.num_workers, pre_size=side)
    for what, n, bad in (("real", ref["n"], ref["n_unreadable"]), ("fake", len(ff), fake_bad)):
        if bad:
            warn(f"{what}: {bad} unreadable image(s) skipped")
        check_count(n, f"{what}={cfg[what]}", cfg.warn_below)
    res = fd_kid(ref["features"], ff, kid=cfg.kid, kid_subsets=cfg.kid_subsets,
                 kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)
    res |= {"metric": metric_label(extractor.name), "feature": extractor.name, "n_real": ref["n"],
            "n_fake": len(ff), "unreadable_real": ref["n_unreadable"], "unreadable_fake": fake_bad,
            "real": str(cfg.real), "fake": str(cfg.fake), "real_stats_cached": ref["cached"], "side": side}
    at = f" at {side} px" if side else ""
    print(f"{res['metric']}: real {res['n_real']} images, fake {res['n_fake']} images{at}")
    if res["kid"] is not None:
        print(f"kid={res['kid']:.6g}")
    print(f"fd={res['fd']:.6g}")
    if cfg.out:
        write_json(cfg.out, res)
    return res


if __name__ == "__main__":
    main("eval/fid", run, __doc__)
