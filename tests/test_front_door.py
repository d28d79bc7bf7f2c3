"""What a newcomer meets: a user's evaluation writes beside the user's runs, never into results/."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from test_eval_convergence import write_curve

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_evaluation_leaves_results_untouched(tmp_path):
    before = tree_digest(ROOT / "results")
    runs = [write_curve(tmp_path / "runs" / f"mine-s{i}", {250: 80.0 + i, 500: 60.0 + i}) for i in (0, 1)]
    work = tmp_path / "checkout"  # the user's working directory: run as the README shows, no results_dir=
    work.mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "eval" / "convergence.py"), f"runs=[{runs[0]},{runs[1]}]"],
                       cwd=work, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (work / "outputs" / "eval" / "convergence.md").is_file()
    assert (work / "outputs" / "eval" / "convergence.png").is_file()
    assert not (work / "results").exists()
    assert tree_digest(ROOT / "results") == before
