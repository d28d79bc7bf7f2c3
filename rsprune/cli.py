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


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose `configs/<config_name>.yaml` with overrides, resolved; UsageError if invalid."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rsprune import rawcorpus, split

    split.register_resolver()  # ${split:NAME} in configs/data/default.yaml
    rawcorpus.register_resolver()  # ${raw:NAME} in configs/data/raw.yaml
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
        OmegaConf.resolve(cfg)
    except Exception as e:  # Hydra/OmegaConf raise many types; all mean "fix your config"
        raise UsageError(one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:400] or type(e).__name__


def main(config_name: str, run: Callable[[DictConfig], dict], doc: str = "") -> None:
    """Entry point: `python SCRIPT [--cfg] [key=value ...]`."""
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        groups = sorted(p.name for p in (CONFIG_DIR / config_name).parent.glob("*") if p.is_dir())
        print((doc.strip() + "\n\n") if doc else "", end="")
        print(f"usage: {Path(sys.argv[0]).name} [--cfg] [+experiment=NAME] [key=value ...]")
        print(f"config: {CONFIG_DIR / (config_name + '.yaml')}; groups under {CONFIG_DIR}: {', '.join(groups)}")
        sys.exit(0)
    show = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    try:
        cfg = compose(config_name, overrides)
        if show:
            print(OmegaConf.to_yaml(cfg), end="")
            return
        run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        tell_launcher(f"error: {e}")
        sys.exit(2)


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
