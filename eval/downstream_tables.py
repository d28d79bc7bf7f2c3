"""Tables of the downstream runs, rebuilt from their saved metrics.json (sections of eval/tables.py).

    python eval/tables.py sr                   # -> results/sr.md
    python eval/tables.py semantic_synthesis   # -> results/semantic_synthesis.md

They read run folders only (nothing of downstream/ is imported: eval sits below downstream).
Which runs: `report.runs` of the section in configs/eval/tables.yaml (folders or glob
patterns), overridable with `sections.<name>.set.report.runs=[...]`. No matching run with a
metrics.json of the task is an error (exit 2), never an empty table over a committed one.
"""
from __future__ import annotations

import glob
from pathlib import Path

from eval import paired
from rsprune.cache import read_json, write_text
from rsprune.cli import UsageError


def run_metrics(patterns, task: str) -> list[tuple[str, dict]]:
    """(run folder name, metrics) of every run folder matched that holds a metrics.json of `task`."""
    found = []
    for pat in patterns:
        dirs = sorted(glob.glob(str(pat))) or [str(pat)]
        for d in dirs:
            p = Path(d) / "metrics.json"
            if p.is_file():
                m = read_json(p)
                if m.get("task") == task:
                    found.append((Path(d).name, m))
    if not found:
        raise UsageError(f"no {task} runs with metrics.json in {list(patterns)}; run downstream/{task}.py first")
    return found


def _f(x, nd=2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _backbone(m: dict) -> str:
    b = m.get("backbone", "none")
    return "scratch" if b == "none" else f"{Path(b).name} @ {m.get('backbone_step')}"


SR_TEST = "paired t-test over the test images (scipy.stats.ttest_rel, two-sided)"


def paired_delta(a: list | None, b: list | None, alpha: float = paired.ALPHA) -> str:
    """Mean per-image difference a - b with its 95% interval (1.96 standard errors) and the p of
    SR_TEST, bold where p < alpha; a dash without per-image values on the same images."""
    if not a or not b or len(a) != len(b):
        return "—"
    r = paired.ttest(a, b)
    half = 1.96 * r["se"] if r["se"] is not None else float("nan")
    cell = f"{r['mean']:+.2f} ± {half:.2f} (p = {paired.fmt_p(r['p'])})"
    return f"**{cell}**" if r["p"] is not None and r["p"] < alpha else cell


def sr_table(runs) -> str:
    head = ["run", "start", "condition", "fine-tune steps", "PSNR (dB)", "ΔPSNR vs scratch (paired)",
            "ΔPSNR vs full-corpus start (paired)", "SSIM", "FD", "test images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    baselines = {}
    def budget(m):  # runs compare paired only at the same resolution, test images, condition and steps
        return m["resolution"], m["n_test"], m["condition"], m["train_steps"]

    def start(m):  # "none" (scratch) or the backbone run's folder name
        return Path(str(m.get("backbone", "none"))).name

    scratch = {budget(m): m["rows"]["sr"] for _, m in runs if start(m) == "none"}
    full = {budget(m): m["rows"]["sr"] for _, m in runs if start(m).startswith("full")}
    for name, m in runs:
        r, s = m["rows"]["sr"], start(m)
        vs_scratch = "—" if s == "none" else \
            paired_delta(r.get("psnr_per_image"), scratch.get(budget(m), {}).get("psnr_per_image"))
        vs_full = "—" if s == "none" or s.startswith("full") else \
            paired_delta(r.get("psnr_per_image"), full.get(budget(m), {}).get("psnr_per_image"))
        lines.append(f"| {name} | {_backbone(m)} | {m['condition']} | {m['train_steps']} | {_f(r['psnr'])} | "
                     f"{vs_scratch} | {vs_full} | {_f(r['ssim'], 3)} | {_f(r['fd'])} | {m['n_test']} |")
        key = (m["resolution"], m["n_test"], m.get("fd_feature"))
        baselines.setdefault(key, m["rows"])
    for (res, n, _), rows in baselines.items():
        for label, row in (("bicubic x4 (baseline)", "bicubic"), ("autoencoder round trip (ceiling)", "autoencoder")):
            r = rows[row]
            lines.append(f"| {label} | — | — | — | {_f(r['psnr'])} | — | — | {_f(r['ssim'], 3)} | {_f(r['fd'])} | {n} |")
    feat = runs[0][1].get("fd_feature", "?")
    res = runs[0][1]["resolution"]
    n_tests = sum(ln.count("(p = ") for ln in lines)
    return (f"# x4 super-resolution\n\nHR {res} px, LR {res // 4} px (antialiased bicubic). PSNR/SSIM against HR "
            f"(mean over held-out images; ΔPSNR: mean per-image difference from the scratch run, or from the "
            f"run started from the full-corpus backbone, of the same budget on the same images, ± its 95% "
            f"interval (1.96 paired standard errors), and p of the {SR_TEST}; a difference is called (bold) "
            f"only from that test, at alpha = {paired.ALPHA:g} per comparison, {n_tests} comparisons here). "
            f"Each run is one fine-tune from one backbone seed, so the pairs are test images, not seeds: the test "
            f"says whether these two models differ on these images, not whether the arms would across training "
            f"seeds. FD against the HR test images in {feat} features "
            f"(compare FDs only at equal numbers of test images). Rebuilt by `python eval/tables.py sr`.\n\n"
            + "\n".join(lines) + "\n")


def semantic_table(runs) -> str:
    head = ["run", "start", "fine-tune steps", "FD", "mIoU (generated)", "pixel acc (generated)", "test crops"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    reals = {}
    for name, m in runs:
        g = m["generated"]
        lines.append(f"| {name} | {_backbone(m)} | {m['train_steps']} | {_f(m['fd'])} | {_f(g['miou'], 3)} | "
                     f"{_f(g['pixel_acc'], 3)} | {m['n_test']} |")
        reals.setdefault((m["n_test"], m.get("segnet")), m["segnet_real"])
    for (n, _), r in reals.items():
        lines.append(f"| real test crops (segmentation net ceiling) | — | — | — | {_f(r['miou'], 3)} | "
                     f"{_f(r['pixel_acc'], 3)} | {n} |")
    m0 = runs[0][1]
    tiles = ", ".join(m0.get("data", {}).get("test_tiles", []))
    return (f"# Semantic image synthesis (Dubai land cover)\n\nCrops of {m0['crop']} px resized to "
            f"{m0['resolution']} px; test tiles held out whole: {tiles}. FD of generated vs real test crops "
            f"({m0.get('fd_feature', '?')} features); mIoU of the segmentation network (trained on the real "
            f"training crops) on generated images against the input masks, unlabeled pixels ignored. "
            f"Each run is one fine-tune and no per-crop scores are recorded, so no paired test can be made "
            f"and no difference between runs is called here. "
            f"Rebuilt by `python eval/tables.py semantic_synthesis`.\n\n" + "\n".join(lines) + "\n")


def _write(cfg, name: str, text: str) -> Path:
    out = Path(str(cfg.report.results_dir)) / f"{name}.md"
    write_text(out, text)
    print(f"wrote {out}")
    return out


def sr_section(cfg) -> dict:
    runs = run_metrics(list(cfg.report.runs), "sr")
    return {"path": str(_write(cfg, "sr", sr_table(runs))), "runs": [n for n, _ in runs]}


def semantic_synthesis_section(cfg) -> dict:
    runs = run_metrics(list(cfg.report.runs), "semantic_synthesis")
    return {"path": str(_write(cfg, "semantic_synthesis", semantic_table(runs))), "runs": [n for n, _ in runs]}
