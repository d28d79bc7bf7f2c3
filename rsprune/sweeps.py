"""Which prune runs a results section reads: the one declaration shared by the launcher
(prune/sweep.py runs or reuses them) and the tables (eval/ reads their folders, never runs them).

A section's plan is its prune runs (a folder and the overrides of `prune.yaml` that make it) and
the corpora they are pruned from (imbalanced corpora are symlink trees built first,
rsprune/zipf_corpus.py). Folder names are decided here only:
- a method grid: `<runs_root>/<method>-r<ratio>-s<seed>`;
- variants (a name -> extra overrides): `<root>/<slug(name)>-r<ratio>-s<seed>` or the section's
  own pattern.
A run counts as done when its summary.json holds exactly the config its overrides compose to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from rsprune import zipf_corpus
from rsprune.errors import UsageError

SUMMARY = "summary.json"  # what prune/outputs.py writes last: a run folder holding it is finished


@dataclass(frozen=True)
class Run:
    run_dir: str
    overrides: tuple[str, ...]
    label: str | None = None  # a variant's name (None: the run's method names it)


@dataclass
class Plan:
    runs: list[Run]
    corpora: list[dict] = field(default_factory=list)  # zipf_corpus.build keyword arguments, built first
    info: dict = field(default_factory=dict)           # what the table says about its corpora


def slug(name) -> str:
    """A variant's name as a run-folder name: letters, digits and ._- kept, the rest as _."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(name))


def grid(methods, ratios, seeds, runs_root, overrides) -> list[Run]:
    return [Run(str(Path(str(runs_root)) / f"{method}-r{ratio}-s{seed}"),
                (f"method={method}", f"ratio={ratio}", f"seed={seed}", *overrides))
            for method in methods for ratio in ratios for seed in seeds]


def variants(root, named, ratios, seeds, overrides, folder: str = "{name}-r{ratio}-s{seed}") -> list[Run]:
    """rsprune with each variant's extra overrides (`named`: name -> list) at every ratio and seed."""
    return [Run(str(Path(str(root)) / folder.format(name=slug(name), ratio=ratio, seed=seed)),
                ("method=rsprune", f"ratio={ratio}", f"seed={seed}", *overrides, *ov), str(name))
            for name, ov in (named or {}).items() for ratio in ratios for seed in seeds]


def section_config(spec):
    """The config of a results section (configs/eval/tables.yaml): its `config` composed, with its
    `set` values merged in. eval/tables.py and prune/sweep.py compose alike."""
    from rsprune.cli import compose

    base = compose(str(spec.config)) if spec.get("config") else OmegaConf.create({})
    return OmegaConf.merge(base, spec.get("set") or {})


def prune_config(run: Run):
    from rsprune.cli import compose

    return compose("prune", [f"run_dir={run.run_dir}", "report.enabled=false", *run.overrides])


def finished(run: Run, cfg=None) -> bool:
    from rsprune.cache import read_json

    path = Path(run.run_dir) / SUMMARY
    cfg = cfg if cfg is not None else prune_config(run)
    return path.is_file() and read_json(path)["config"] == OmegaConf.to_container(cfg)


def require(plan: Plan, section: str) -> list[Run]:
    """The plan's runs, every one finished under its config; else a UsageError naming the launcher."""
    missing = [r for r in plan.runs if not finished(r)]
    if missing:
        raise UsageError(f"{len(missing)} of the {len(plan.runs)} prune runs of section {section} are missing or "
                         f"of another config (first: {missing[0].run_dir}); run `python prune/sweep.py {section}` "
                         "first")
    return plan.runs


# --- the sections' plans (cfg: the config eval/tables.py composes for the section) -------------

def pruning(cfg) -> Plan:
    s = cfg.sweep
    return Plan(grid(s.methods, s.ratios, s.seeds, s.runs_root, list(s.overrides)))


def ablation(cfg) -> Plan:
    a = cfg.ablation
    return Plan(variants(a.runs_root, a.variants, [a.ratio], a.seeds, list(cfg.sweep.overrides), "{name}-s{seed}"))


def raw(cfg) -> Plan:
    s = cfg.sweep
    return Plan(grid(s.methods, s.ratios, s.seeds, s.runs_root, list(s.overrides))
                + variants(s.runs_root, cfg.variants, list(s.ratios), list(cfg.variant_seeds), list(s.overrides),
                           "variant-{name}-r{ratio}-s{seed}"))


def imbalanced_overrides(cfg) -> list[str]:
    """The sweep overrides of the `imbalanced` section: the development corpus as data.corpus."""
    dst = Path(str(cfg.out)) / zipf_corpus.ROOT_NAME
    return [*cfg.sweep.overrides, f"data.corpus=[{dst}]"]


def imbalanced(cfg) -> Plan:
    s = cfg.sweep
    corpus = dict(source=str(Path(str(cfg.data_root)) / "nwpu12" / "train"), out=str(cfg.out), top=int(cfg.top),
                  factor=float(cfg.factor), seed=int(cfg.corpus_seed))
    return Plan(grid(s.methods, s.ratios, s.seeds, s.runs_root, imbalanced_overrides(cfg)), [corpus])


def imbalanced_heldout(cfg) -> Plan:
    """Per held-out corpus: every method, the rsprune variants and the true-strata bounds (run like
    variants, reported apart); `info[name]` holds the corpus folder, source and reference."""
    h = cfg.heldout
    runs, corpora, info = [], [], {}
    for name, spec in h.corpora.items():
        source = str(spec.get("source") or "nwpu12/train")  # under data_root; its class folders
        root_name = zipf_corpus.ROOT_NAME if source == "nwpu12/train" else f"{source.split('/')[0]}_zipf"
        out = Path(str(cfg.out)) / str(name)
        corpora.append(dict(source=str(Path(str(cfg.data_root)) / source), out=str(out),
                            top=int(spec.get("top") or cfg.top), factor=float(spec.factor),
                            seed=int(spec.corpus_seed), classes=list(spec.get("classes") or []) or None,
                            root_name=root_name))
        dst = out / root_name
        on = [*cfg.sweep.overrides, f"data.corpus=[{dst}]"]
        reference = spec.get("reference")  # under data_root; none: the default split's AID reference
        if reference:
            on.append(f"data.reference={Path(str(cfg.data_root)) / str(reference)}")
        root = Path(str(h.runs_root)) / str(name)
        mine = (grid(h.methods, h.ratios, h.seeds, root, on) + variants(root, h.variants, h.ratios, h.seeds, on)
                + variants(root, h.get("bounds"), h.ratios, h.seeds, on))
        runs += mine
        info[str(name)] = {"corpus": str(dst), "source": source, "reference": reference,
                           "corpus_seed": spec.corpus_seed, "runs": [r.run_dir for r in mine]}
    return Plan(runs, corpora, info)


PLANS = {"pruning": pruning, "ablation": ablation, "imbalanced": imbalanced,
         "imbalanced_heldout": imbalanced_heldout, "raw": raw}
