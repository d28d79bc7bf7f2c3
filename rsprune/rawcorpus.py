"""A raw RS corpus from curated scenes: redundant, imbalanced and noisy, with hidden labels.

RS-Prune targets "large amounts of globally representative data, which often contain
redundancy, noise, and class imbalance"; AID and NWPU are curated (balanced, no near-duplicates,
no clouds). This builds that regime reproducibly from the default split's corpus only (so the
test split, the scene reference and the downstream test sets stay disjoint at the source level):

- imbalance: a few homogeneous scene types (desert, farmland, forest, bare land, meadow, island
  sea) keep up to `dominant_sources` source images each; every other class keeps a Zipf-like
  few (`minor_top` down to `minor_min`);
- redundancy: each source image becomes `min_crops`..`max_crops` overlapping tiles (a shifted,
  rescaled window, a flip / quarter turn, slight colour and blur jitter), as tiles cut from one
  large scene; `duplicate_share` of the clean tiles are also stored twice, byte for byte;
- noise (`noise` shares of the whole corpus), each a tile of a drawn source image corrupted as
  satellite data is: opaque and thin cloud (fractal fields), blank sea, no-data tiles, a no-data
  wedge at a swath edge, defocus/haze blur.

Tiles are JPEG files named by a seeded hash (`tiles/<ab>/<12 hex>.jpg`), so no path carries a
label. `labels.parquet` beside `tiles/` holds (tile, sha256, source, class, kind, crop): the
evaluation reads it, no selection does. Every draw comes from one seed, so the same seed gives
the same file list and contents (checked against the recorded sha256 on reuse).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

VERSION = 1  # bump when the tiles a given config produces change
NOISE_KINDS = ("cloud_opaque", "cloud_thin", "blank_sea", "nodata", "nodata_wedge", "blur")


def class_of(path: str) -> str:
    """`source/class` of a corpus path (its two parent folders, e.g. `aid/Desert`, `train/desert`)."""
    parts = Path(path).parts
    src = "nwpu12" if "nwpu12" in parts else parts[-3]
    return f"{src}/{parts[-2]}"


# ----------------------------------------------------------------------------- corruptions
def fractal(rng: np.random.Generator, size: int, octaves: int = 5, persistence: float = 0.55) -> np.ndarray:
    """A [0, 1] fractal noise field (sum of bilinearly upsampled random grids): cloud-like texture."""
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = 2 ** (o + 2)
        grid = rng.random((cells, cells)).astype(np.float32)
        up = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32)
        out += amp * up
        total += amp
        amp *= persistence
    out /= total
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def cloud(rgb: np.ndarray, rng: np.random.Generator, cover: float, opacity: float) -> np.ndarray:
    """Blend a bright cloud over `cover` of the tile (soft edges) at peak `opacity`."""
    h = rgb.shape[0]
    field = fractal(rng, h)
    thr = np.quantile(field, 1 - cover)
    mask = np.clip((field - thr) / 0.12 + 0.5, 0, 1) * opacity
    tone = rng.uniform(215, 245) + (fractal(rng, h, 4) - 0.5) * 18  # grey-white, slightly textured
    out = rgb.astype(np.float32) * (1 - mask[..., None]) + tone[..., None] * mask[..., None]
    return out.clip(0, 255).astype(np.uint8)


def haze(rgb: np.ndarray, rng: np.random.Generator, opacity: float) -> np.ndarray:
    """Thin cloud: a semi-transparent veil over the whole tile, denser in patches."""
    field = 0.6 + 0.4 * fractal(rng, rgb.shape[0], 3)
    a = (opacity * field)[..., None]
    tone = rng.uniform(200, 235)
    return (rgb.astype(np.float32) * (1 - a) + tone * a).clip(0, 255).astype(np.uint8)


def blank_sea(rng: np.random.Generator, size: int) -> np.ndarray:
    """Open water: a deep-water colour with faint low-frequency swell and sensor noise."""
    base = np.array([rng.uniform(8, 40), rng.uniform(35, 80), rng.uniform(60, 110)], np.float32)
    swell = (fractal(rng, size, 3) - 0.5) * rng.uniform(4, 10)
    noise = rng.normal(0, 1.2, (size, size, 3))
    return (base + swell[..., None] + noise).clip(0, 255).astype(np.uint8)


def wedge(rgb: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """Zero (no-data) the part of the tile beyond a straight swath edge, about `share` of it."""
    h = rgb.shape[0]
    yy, xx = np.mgrid[0:h, 0:h].astype(np.float32) / h - 0.5
    theta = rng.uniform(0, 2 * np.pi)
    d = xx * np.cos(theta) + yy * np.sin(theta)
    cut = np.quantile(d, 1 - share)
    out = rgb.copy()
    out[d >= cut] = 0
    return out


def crop(img: Image.Image, rng: np.random.Generator, side: int, window: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """A shifted window of `window` x the image side (shorter side), resized to `side`, flipped and turned."""
    w, h = img.size
    s = int(round(min(w, h) * rng.uniform(*window)))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    a = np.asarray(img.crop((x, y, x + s, y + s)).resize((side, side), Image.LANCZOS))
    k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
    a = np.rot90(a, k)
    if flip:
        a = a[:, ::-1]
    return np.ascontiguousarray(a), {"x": x, "y": y, "s": s, "rot": k, "flip": flip}


def jitter(a: np.ndarray, rng: np.random.Generator, colour: float, blur: float) -> np.ndarray:
    """Slight per-channel gain and defocus: two acquisitions of one place never match exactly."""
    gain = 1 + rng.normal(0, colour, 3)
    a = (a.astype(np.float32) * gain).clip(0, 255).astype(np.uint8)
    r = rng.uniform(0, blur)
    return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(r))) if r > 0.05 else a


def corrupt(kind: str, a: np.ndarray, rng: np.random.Generator, p) -> np.ndarray:
    """Apply one noise kind to a clean tile (blank_sea and nodata replace it)."""
    if kind == "cloud_opaque":
        return cloud(a, rng, rng.uniform(*p.cloud_cover), rng.uniform(0.9, 1.0))
    if kind == "cloud_thin":
        return haze(a, rng, rng.uniform(*p.haze_opacity))
    if kind == "blank_sea":
        return blank_sea(rng, a.shape[0])
    if kind == "nodata":
        return np.zeros_like(a)
    if kind == "nodata_wedge":
        return wedge(a, rng, rng.uniform(*p.wedge_share))
    if kind == "blur":
        return np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(rng.uniform(*p.blur_radius))))
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")


def encode(a: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


# ----------------------------------------------------------------------------- the plan
def zipf(n: int, top: int, low: int) -> list[int]:
    """n sizes falling geometrically from `top` to `low`."""
    if n <= 1:
        return [top] * n
    return [int(round(top * (low / top) ** (i / (n - 1)))) for i in range(n)]


def plan_sources(paths: list[str], p, rng: np.random.Generator) -> dict[str, list[str]]:
    """Class -> the source images it keeps: dominant classes many, the others a Zipf-like few."""
    by_class: dict[str, list[str]] = {}
    for q in sorted(paths):
        by_class.setdefault(class_of(q), []).append(q)
    dominant = [c for c in p.dominant if c in by_class]
    missing = sorted(set(p.dominant) - set(by_class))
    if missing:
        raise ValueError(f"dominant classes not in the source corpus: {', '.join(missing)}")
    minor = [c for c in sorted(by_class) if c not in dominant]
    minor = [minor[i] for i in rng.permutation(len(minor))]  # which minor class is larger: drawn
    sizes = {c: int(p.dominant_sources) for c in dominant} | dict(zip(minor, zipf(len(minor), p.minor_top, p.minor_min)))
    out = {}
    for c in sorted(sizes):
        items = by_class[c]
        take = rng.permutation(len(items))[:min(sizes[c], len(items))]
        out[c] = [items[i] for i in sorted(take)]
    return out


def tile_name(seed: int, i: int) -> str:
    h = hashlib.sha1(f"rsprune-raw:{seed}:{i}".encode()).hexdigest()[:12]
    return f"{h[:2]}/{h}.jpg"


def build(paths: list[str], p, out: str | os.PathLike, show_progress: bool = True) -> pd.DataFrame:
    """Write the tiles under `out/tiles/` and return the labels table (pure apart from the writes)."""
    from tqdm import tqdm

    rng = np.random.default_rng([int(p.seed), 1])
    sources = plan_sources(paths, p, rng)
    flat = [(c, s) for c in sorted(sources) for s in sources[c]]
    n_crops = rng.integers(int(p.min_crops), int(p.max_crops) + 1, len(flat))
    n_clean = int(n_crops.sum())
    n_dup = int(round(p.duplicate_share * n_clean))
    shares = {k: float(p.noise[k]) for k in NOISE_KINDS}
    clean_share = 1 - sum(shares.values())
    n_total = int(round((n_clean + n_dup) / clean_share))
    n_noise = {k: int(round(v * n_total)) for k, v in shares.items()}
    # what each tile is: (source index, kind), clean crops first, then noise on drawn sources
    jobs = [(i, "clean") for i, n in enumerate(n_crops) for _ in range(int(n))]
    for k in NOISE_KINDS:
        jobs += [(int(i), k) for i in rng.integers(0, len(flat), n_noise[k])]
    order = rng.permutation(len(jobs))  # names are drawn, so neither name nor order says the kind
    dups = set(rng.choice(n_clean, n_dup, replace=False).tolist())
    tiles = Path(out) / "tiles"
    rows, cache = [], {}
    bar = tqdm(total=len(jobs) + n_dup, desc="raw corpus tiles", unit="tile", disable=not show_progress)
    next_name = 0
    for j in order:
        si, kind = jobs[j]
        cls, src = flat[si]
        trng = np.random.default_rng([int(p.seed), 2, int(j)])  # per tile: independent of the others
        if src not in cache:
            cache.clear()
            cache[src] = Image.open(src).convert("RGB")
        a, box = crop(cache[src], trng, int(p.tile_side), tuple(p.window))
        a = jitter(a, trng, float(p.colour_jitter), float(p.blur_jitter))
        if kind != "clean":
            a = corrupt(kind, a, trng, p)
        data = encode(a, p.jpeg_quality)
        copies = 2 if (kind == "clean" and j in dups) else 1
        for c in range(copies):
            name = tile_name(int(p.seed), next_name)
            next_name += 1
            dst = tiles / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            rows.append({"tile": name, "sha256": hashlib.sha256(data).hexdigest(), "source": src, "class": cls,
                         "kind": kind if c == 0 else "duplicate", "job": int(j), **box})
            bar.update(1)
    bar.close()
    return pd.DataFrame(rows).sort_values("tile").reset_index(drop=True)


def params_of(p) -> dict:
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(p, resolve=True) if not isinstance(p, dict) else dict(p)
    d.pop("dir", None)
    return d


def materialise(p, source_list: str, show_progress: bool = True) -> Path:
    """Build (once) the raw corpus of params `p` from the image list `source_list`; return its folder.

    The folder is `p.dir/<key>`, key = hash of (params, the sources' paths and sizes, VERSION).
    It is built under a temporary name and renamed, so a folder that exists is complete; its
    `raw.json` records the params and the sha256 of the tile table, checked on reuse.
    """
    from rsprune.cache import save_table, stable_hash, write_json
    from rsprune.split import paths as entry_paths

    paths = entry_paths(source_list)
    params = params_of(p)
    fp = hashlib.sha256("\n".join(f"{q}\t{os.path.getsize(q)}" for q in paths).encode()).hexdigest()
    key = stable_hash(params, fp, VERSION)
    out = Path(os.path.abspath(str(p.dir))) / key
    if (out / "raw.json").is_file():
        return out
    tmp = out.with_name(f".tmp-{key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("building the raw corpus %s from %d source images (once; about a minute)", key, len(paths))
    labels = build(paths, params_obj(params), tmp, show_progress)
    (tmp / "tiles" / ".rsprune-data").write_text("raw corpus tiles\n")
    save_table(tmp / "labels.parquet", labels, checksum=True)
    summary = {"key": key, "version": VERSION, "params": params, "sources": source_list, "sources_sha256": fp,
               "n_tiles": int(len(labels)), "kinds": labels["kind"].value_counts().sort_index().to_dict(),
               "classes": labels["class"].value_counts().sort_index().to_dict(),
               "n_sources": int(labels["source"].nunique()),
               "tiles_sha256": hashlib.sha256("\n".join(labels["tile"] + "\t" + labels["sha256"]).encode()).hexdigest()}
    write_json(tmp / "raw.json", summary)
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same build first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class params_obj(dict):
    """Attribute access over the params dict (the build reads p.seed, p.noise[k], ...)."""

    __getattr__ = dict.__getitem__


def labels(folder) -> pd.DataFrame:
    """The labels table of a built raw corpus (evaluation only: no selection reads it)."""
    from rsprune.cache import load_table

    df = load_table(Path(folder) / "labels.parquet")
    df["path"] = [os.path.join(str(folder), "tiles", t) for t in df["tile"]]
    return df


def describe(folder) -> str:
    s = json.loads((Path(folder) / "raw.json").read_text())
    kinds = ", ".join(f"{k} {v}" for k, v in s["kinds"].items())
    return f"{folder}: {s['n_tiles']} tiles from {s['n_sources']} source images ({kinds})"


def _resolve(name: str, *, _root_) -> str:
    from rsprune.errors import UsageError

    if name not in ("tiles", "labels", "folder"):
        raise UsageError(f"${{raw:{name}}}: expected tiles, labels or folder")
    raw = _root_.data.raw
    src = str(raw.source)
    if src.startswith("<split unavailable"):
        return src
    if src.startswith("<split "):  # the command line's precheck, before the split is drawn: build nothing
        return f"<raw {name}: not built yet>"
    try:
        folder = materialise(raw, src)
    except (OSError, ValueError) as e:
        return f"<raw corpus unavailable: {e}>"
    return str(folder / {"tiles": "tiles", "labels": "labels.parquet", "folder": "."}[name])


def register_resolver() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("raw"):
        OmegaConf.register_new_resolver("raw", _resolve)
