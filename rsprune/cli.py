"""The thin command-line layer shared by every entry point.

Each command is a plain `run(cfg) -> dict` (tests call it directly); `main()` composes the
Hydra config from `configs/` and the command-line overrides, and turns configuration and usage
errors into one line on stderr with exit code 2, before anything is written.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from rsprune.errors import UsageError  # noqa: F401  (re-exported: commands import it from here)

CONFIG_DIR = Path(os.environ.get("RSPRUNE_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def compose(config_name: str, overrides: list[str] | None = None, precheck=None) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with overrides, resolved; UsageError if invalid.
    `precheck(cfg)` runs on the config resolved without its data split (`${split:NAME}` a
    placeholder) and raises UsageError on a bad value before the split is drawn and written."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rsprune import rawcorpus, split

    _register_project_resolver()  # ${project:cache}, ${project:eval_feature} (configs/project.yaml)
    split.register_resolver()  # ${split:NAME} in configs/data/default.yaml
    rawcorpus.register_resolver()  # ${raw:NAME} in configs/data/raw.yaml
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        if precheck is not None:
            dry = cfg.copy()
            with split.undrawn():
                OmegaConf.resolve(dry)
            precheck(dry)
        OmegaConf.resolve(cfg)
    except UsageError:
        raise
    except Exception as e:  # Hydra/OmegaConf raise many types; all mean "fix your config"
        raise UsageError(one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def project_value(key: str):
    """A value of configs/project.yaml (written once, read by every config); `cache` yields to the
    RSPRUNE_CACHE environment variable."""
    if key == "cache" and os.environ.get("RSPRUNE_CACHE"):
        return os.environ["RSPRUNE_CACHE"]
    values = OmegaConf.load(CONFIG_DIR / "project.yaml")
    if key not in values:
        raise UsageError(f"configs/project.yaml has no {key!r}; it has {', '.join(values)}")
    return values[key]


def _register_project_resolver() -> None:
    if not OmegaConf.has_resolver("project"):
        OmegaConf.register_new_resolver("project", project_value)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] or type(e).__name__


def main(config_name: str, run: Callable[[DictConfig], dict], doc: str = "", precheck=None) -> None:
    """Entry point: `python SCRIPT [--cfg] [key=value ...]`; `precheck`: see compose."""
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(config_name, doc, Path(sys.argv[0]).name))
        sys.exit(0)
    show = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    try:
        cfg = compose(config_name, overrides, None if show else precheck)
        if show:
            print(OmegaConf.to_yaml(cfg), end="")
            return
        run(cfg)
        close_process_group()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        tell_launcher(f"error: {e}")
        sys.exit(2)


def close_process_group() -> None:
    """After a successful multi-process run: every process waits for the others, then tears its
    process group down while the interpreter is alive. Left to interpreter exit, gloo's worker
    threads can outlive it and abort the process ("terminate called without an active
    exception", pytorch/pytorch#190489). Not on failure: a barrier there would hang on the
    processes that already left."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


EXPERIMENTS = ("prune", "train")  # the configs `+experiment=NAME` (configs/experiment/) is written for


def config_groups(config_name: str) -> dict[str, list[str]]:
    """group -> its choices (configs/<group>/*.yaml) for each group the command's config composes,
    following the configs it includes (a `- other_config` line)."""
    path = CONFIG_DIR / f"{config_name}.yaml"
    out: dict[str, list[str]] = {}
    for entry in OmegaConf.load(path).get("defaults") or []:
        if isinstance(entry, str):
            if entry != "_self_":  # another config of the same folder, included whole
                out |= config_groups(str(Path(config_name).parent / entry))
            continue
        for key in entry:
            group = str(key).split("@")[0].lstrip("/")
            if group.startswith("override "):
                continue
            folder = CONFIG_DIR / group
            out[group] = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return out


def experiments_for(config_name: str) -> list[str]:
    """The configs/experiment/ files whose keys all exist in the command's composed config
    (ratio85 is for prune, cpu_small for train)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rsprune.split import register_resolver

    register_resolver()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            keys = set(hydra_compose(config_name=config_name))  # not resolved: nothing is read
    finally:
        GlobalHydra.instance().clear()
    out = []
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        own = set(OmegaConf.load(path)) - {"defaults"}
        if own <= keys:
            out.append(path.stem)
    return out


def config_keys(config_name: str) -> str:
    """The command's own keys, defaults and the choices their comments give: its YAML less the
    package line and the defaults list."""
    lines, skipping = [], False
    for line in (CONFIG_DIR / f"{config_name}.yaml").read_text().splitlines():
        if line.startswith("# @package"):
            continue
        if line.startswith("defaults:"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "-")) or not line.strip()):
            continue
        skipping = False
        lines.append("  " + line)
    return "\n".join(lines)


def help_text(config_name: str, doc: str, prog: str) -> str:
    experiment = " [+experiment=NAME]" if config_name in EXPERIMENTS else ""
    parts = [doc.strip(), "", f"usage: {prog} [--cfg] [--help]{experiment} [key=value ...]",
             "  --cfg: print the resolved config (with your key=value overrides) and stop", ""]
    groups = config_groups(config_name)
    if experiment:
        groups["+experiment"] = experiments_for(config_name)
    if groups:
        parts.append("groups (group=CHOICE):")
        parts += [f"  {g}: {' | '.join(c) if c else '-'}" for g, c in groups.items()]
        parts.append("")
    where = "; a group's keys are in configs/<group>/<choice>.yaml" if groups else ""
    parts += [f"keys ({CONFIG_DIR / (config_name + '.yaml')}{where}):", config_keys(config_name)]
    return "\n".join(p for p in parts if p is not None)


def tell_launcher(line: str) -> None:
    """Under `accelerate launch` (torchrun), hand the one line to the launcher's error file, so
    its closing report names it as the root cause instead of "To enable traceback see ...".
    The launcher itself still exits 1 with its own traceback: that exit code is torchrun's."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    # The layout torch.distributed.elastic reads (ErrorHandler.record_exception writes the same).
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:  # the line is on stderr already; the report is a convenience
        pass
