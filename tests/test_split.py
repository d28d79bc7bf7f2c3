"""The default data split: drawn once, disjoint from every other set, and optional for own data."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from prune.index import walk
from rsprune.cli import UsageError, compose
from rsprune.corpus import list_files, read_list, write_list
from rsprune.split import draw, paths, record
from tests.conftest import DATA


@pytest.fixture(scope="module")
def split_cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    return compose("train", [f"data.split.dir={d}"]).data


def _classes(ps):
    return {Path(p).parent.name for p in ps}


def test_default_sets_are_pairwise_disjoint_with_their_sizes(split_cfg):
    corpus, ref, test = paths(split_cfg.corpus), paths(split_cfg.reference), paths(split_cfg.test)
    sr_test = paths(str(DATA / "nwpu12" / "test"))  # the SR downstream test set (configs/downstream/sr.yaml)
    dubai = paths(str(DATA / "dubai_seg"))
    sets = {"corpus": corpus, "reference": ref, "test": test, "sr_test": sr_test, "dubai": dubai}
    real = {k: {os.path.realpath(p) for p in v} for k, v in sets.items()}
    names = sorted(real)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not real[a] & real[b], f"{a} and {b} share images"
    # The pool is AID + nwpu12/train, and nothing of it is lost but the copies of another part's images.
    dropped = json.loads((Path(split_cfg.corpus[0]).parent / "split.json").read_text())["dropped"]
    assert len(corpus) + len(ref) + len(test) + len(dropped) == 10_000 + 6_600
    assert len(ref) == 2000 and len(test) >= 1500
    # Stratified: every AID class in the reference, every class of both sources in the test split.
    assert len(_classes(ref)) == 30 and len(_classes(test)) == 42
    assert all("/aid/" in p for p in ref)


def test_no_content_spans_two_parts_of_the_default_split(split_cfg):
    """Disjoint by bytes, not only by path: aid/Industrial/industrial_203.jpg and _205.jpg are
    byte-identical; the test split keeps _205 and the corpus loses _203 (and says so)."""
    parts = {n: paths(split_cfg[n]) for n in ("corpus", "reference", "test")}
    owner: dict[str, set] = {}
    for name, ps in parts.items():
        for p in ps:
            owner.setdefault(hashlib.sha256(Path(p).read_bytes()).hexdigest(), set()).add(name)
    spanning = {h: o for h, o in owner.items() if len(o) > 1}
    assert not spanning, f"{len(spanning)} contents in two parts"
    meta = json.loads((Path(split_cfg.corpus[0]).parent / "split.json").read_text())
    assert [(d["path"], d["part"], d["kept_in"], d["same_as"]) for d in meta["dropped"]] == [
        ("aid/Industrial/industrial_203.jpg", "corpus", "test", "aid/Industrial/industrial_205.jpg")]
    assert str(DATA / "aid/Industrial/industrial_205.jpg") in parts["test"]
    assert {n: meta[n]["n"] for n in parts} == {n: len(ps) for n, ps in parts.items()}


def test_sr_fine_tuning_trains_outside_the_test_split(split_cfg):
    """The SR downstream's default training images (the real config) never include the ONE test
    split nor its own test set; they did when they defaulted to all of nwpu12/train."""
    from downstream.sr import image_list

    cfg = compose("downstream/sr", [f"data.split.dir={split_cfg.split.dir}"])
    train = {os.path.realpath(p) for p in image_list(cfg.sr.train, cfg.sr.max_train)}
    assert len(train) == int(cfg.sr.max_train)
    for name, other in (("test split", paths(split_cfg.test)), ("SR test", image_list(cfg.sr.test, None))):
        assert not train & {os.path.realpath(p) for p in other}, f"SR training images in the {name}"


def test_split_is_the_same_when_drawn_again_and_recorded_by_hash(split_cfg, tmp_path):
    again = compose("train", [f"data.split.dir={tmp_path}"]).data
    for name in ("corpus", "reference", "test"):
        assert paths(again[name]) == paths(split_cfg[name])
    rec = record(split_cfg)
    assert rec["test"][0]["n"] == len(paths(split_cfg.test))
    rec_again = record(again)
    assert all(rec[k][0]["sha256"] == rec_again[k][0]["sha256"] for k in ("corpus", "reference", "test"))
    # A different seed draws a different test split of the same size.
    other = compose("train", [f"data.split.dir={tmp_path}", "data.split.seed=1"]).data
    assert paths(other.test) != paths(split_cfg.test)
    assert len(paths(other.test)) == len(paths(split_cfg.test))


def test_draw_is_per_class_and_independent_of_other_classes():
    a = {"x": [f"x/{i}" for i in range(50)], "y": [f"y/{i}" for i in range(30)]}
    drawn, rest = draw(a, 0.2, seed=0)
    assert sum(p.startswith("x/") for p in drawn) == 10 and sum(p.startswith("y/") for p in drawn) == 6
    assert not set(drawn) & set(rest) and len(drawn) + len(rest) == 80
    only_x, _ = draw({"x": a["x"]}, 0.2, seed=0)  # adding class y changed nothing of x's draw
    assert [p for p in drawn if p.startswith("x/")] == only_x


def test_list_entries_get_the_same_ids_as_walking_the_folder(tmp_path):
    aid = DATA / "aid"
    files = sorted(str(p) for p in (aid / "Airport").iterdir())[:5]
    lst = tmp_path / "l.txt"
    write_list(lst, files, base=str(DATA), comment="five airports")
    assert read_list(lst) == [os.path.normpath(f) for f in files]
    by_list = walk([str(lst)]).set_index("path")
    by_folder = walk([str(aid)]).set_index("path")
    assert set(by_list.root) == {"aid"}
    assert (by_list.id == by_folder.loc[by_list.index, "id"]).all()


def test_own_folders_are_pruned_exactly_even_without_the_split_sources(small_corpus, tmp_path):
    cfg = compose("prune", [f"data.root={tmp_path / 'none'}", f"data.corpus=[{small_corpus}]",
                            f"data.reference={small_corpus}"])
    assert list(list_files(cfg.data.corpus).path) == list(list_files([str(small_corpus)]).path)
    with pytest.raises(UsageError, match="split unavailable: split source folder not found"):
        list_files([cfg.data.test])
