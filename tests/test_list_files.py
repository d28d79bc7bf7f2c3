"""List files as editors and scripts write them: a BOM, trailing spaces, duplicates, UTF-16.

Each is either read as the user meant (the BOM) or refused with one line naming the line to fix;
none loses an image silently or ends in a traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import aid_paths

from rsprune.corpus import read_list
from rsprune.errors import UsageError


def test_a_bom_is_stripped_with_and_without_a_base_header(tmp_path):
    paths = aid_paths(3)
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"\xef\xbb\xbf" + "".join(p + "\n" for p in paths).encode())
    assert read_list(plain) == paths and all(os.path.isfile(p) for p in read_list(plain))
    base = os.path.dirname(os.path.dirname(os.path.dirname(paths[0])))  # .../data: lines aid/Class/x.jpg
    headed = tmp_path / "headed.txt"
    headed.write_bytes(b"\xef\xbb\xbf" + (f"# base: {base}\n" + "".join(
        os.path.relpath(p, base) + "\n" for p in paths)).encode())
    assert read_list(headed) == paths


@pytest.mark.parametrize("body, match", [
    ("{0}\n{1} \n", r"b\.txt:2: the line ends in whitespace"),
    ("{0}\n{1}\n{0}\n", r"b\.txt:3: .* is listed twice \(first at line 1\)"),
])
def test_trailing_space_and_duplicate_lines_are_refused_naming_the_line(tmp_path, body, match):
    bad = tmp_path / "b.txt"
    bad.write_text(body.format(*aid_paths(2)))
    with pytest.raises(UsageError, match=match):
        read_list(bad)


def test_a_utf16_list_is_one_error_line_and_exit_2(tmp_path):
    listed = tmp_path / "u16.txt"
    listed.write_text("".join(p + "\n" for p in aid_paths(3)), encoding="utf-16")
    with pytest.raises(UsageError, match="not a UTF-8 list file"):
        read_list(listed)
    out = subprocess.run([sys.executable, "prune/run.py", f"data.corpus=[{listed}]", f"run_dir={tmp_path / 'r'}"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 2, out.stderr[-500:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in out.stderr
