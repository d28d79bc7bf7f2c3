"""metrics.jsonl readers: a torn last line or a huge record is dropped with a warning, streaming.

A kill mid-write leaves at most one torn line; a runaway logger can write one enormous line. The
evaluation must still report the good records, and a resume must not load the line whole.
"""
from __future__ import annotations

import json
import shutil
import tracemalloc

from eval.heldout import heldout_losses
from rsprune import layout
from train.hooks import MetricsLog


def _copy(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "snapshots"))
    return run


def test_a_torn_last_line_is_dropped_and_the_report_still_reads(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    good = heldout_losses(run)
    assert len(good) >= 2  # the tiny run probes steps 3 and 6
    with open(run / layout.METRICS, "a") as f:
        f.write('{"step": 7, "heldout_lo')  # torn by a kill
    torn = heldout_losses(run)
    assert torn.equals(good)
    assert "torn line" in capsys.readouterr().err


def test_a_huge_record_is_skipped_without_loading_it(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run, tmp_path)
    lines = (run / layout.METRICS).read_text().splitlines()
    huge = json.dumps({"step": 1, "blob": "x" * (40 << 20)})  # 40 MB on one line
    (run / layout.METRICS).write_text("\n".join([lines[0], huge, *lines[1:]]) + "\n")

    tracemalloc.start()
    records = [r for _, r in layout.read_metrics(run / layout.METRICS)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak  # bounded by the record limit, not by the line
    assert [r["step"] for r in records] == [json.loads(ln)["step"] for ln in lines]
    assert "skipped line 2" in capsys.readouterr().err

    log = MetricsLog.__new__(MetricsLog)  # the resume's truncation, without starting wandb
    log.path = run / layout.METRICS
    log._truncate_after(6)
    kept = (run / layout.METRICS).read_text().splitlines()
    assert kept == lines and "blob" not in (run / layout.METRICS).read_text()
