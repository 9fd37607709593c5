"""The grouped split: pages of one source never straddle train/val/test."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_microclf.core import dataset as ds
from napari_microclf.core.dataset import DatasetError

WELL = r"^(plate\d+_well[A-Z]\d+)"


def _img(seed, shape=(12, 12)):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def _annotate(root, stacks, pages=range(8)):
    """Save pages of stacks one by one as "Add all slices" does.

    ``stacks`` maps a stack number to a class, or to a function page -> class (a stack whose
    pages were annotated into several classes). Returns ``{key: source}``.
    """
    out = {}
    for s, cls in stacks.items():
        for p in pages:
            c = cls(p) if callable(cls) else cls
            res = ds.add_example(
                root, c, _img(1000 * s + p), source=f"/data/stack{s:02d}.tif", page=p
            )
            assert res.written
            out[f"{c}/{res.path.name}"] = f"/data/stack{s:02d}.tif"
    return out


def _sources(root, split):
    """{source: {subset, ...}} read back from the files' provenance."""
    out = {}
    for key, subset in split.assignments.items():
        out.setdefault(ds.read_provenance(Path(root) / key)["source"], set()).add(subset)
    return out


TWELVE = {s: "abc"[s % 3] for s in range(12)}
TWELVE[1] = lambda p: "b" if p < 5 else "a"  # pages of one stack in two classes
TWELVE[6] = lambda p: "a" if p % 2 else "c"


def test_pages_of_a_stack_never_straddle_subsets(tmp_path):
    _annotate(tmp_path, TWELVE)
    for seed in range(4):
        split, _ = ds.update_split(tmp_path, 0.2, 0.1, seed=seed, resplit=True)
        assert len(split.assignments) == 96
        straddling = {src: s for src, s in _sources(tmp_path, split).items() if len(s) > 1}
        assert not straddling
        counts = split.counts()
        assert all(counts[s] > 0 for s in ds.SUBSETS), counts
        assert 0.4 <= counts["train"] / 96 <= 0.85 and counts["test"] / 96 <= 0.35
        for cls in "abc":  # stratified: every class is trained on and validated
            subsets = {v for k, v in split.assignments.items() if k.startswith(cls + "/")}
            assert {"train", "val"} <= subsets, (seed, cls, subsets)
    samples = ds.load_samples(tmp_path, 0.2, 0.1, seed=3)
    assert sum(samples.subset_groups.values()) == 12  # each stack in exactly one subset
    assert samples.split.groups[next(iter(samples.split.groups))].startswith("source:")
    # the same seed gives the same split
    again, _ = ds.update_split(tmp_path, 0.2, 0.1, seed=3, resplit=True)
    assert again.assignments == samples.split.assignments


def _wells(root, layout, fields=6):
    """Files named like a microscope's export; no provenance. ``layout``: well -> class."""
    for well, cls in layout.items():
        for f in range(fields):
            c = cls(f) if callable(cls) else cls
            (root / c).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(root / c / f"{well}_f{f:03d}.tif", _img(hash((well, f)) % 2**32))


def test_group_by_file_name(tmp_path):
    layout = {
        f"plate{p}_well{r}{c:02d}": "xyz"[(p + c) % 3]
        for p in (1, 2)
        for r in "AB"
        for c in (1, 2, 3)
    }
    layout["plate1_wellA01"] = lambda f: "x" if f < 3 else "y"  # one well, two classes
    _wells(tmp_path, layout)
    tifffile.imwrite(tmp_path / "z" / "stray.tif", _img(7))
    split, notes = ds.update_split(tmp_path, group_by=WELL)
    assert split.group_by == WELL
    wells = {}
    for key, subset in split.assignments.items():
        wells.setdefault(key.split("/")[1][:14], set()).add(subset)
    assert all(len(s) == 1 for s in wells.values())
    assert {s for v in wells.values() for s in v} == set(ds.SUBSETS)
    assert split.groups["x/plate1_wellA01_f000.tif"] == "name:plate1_wellA01"
    assert any("1 file name did not match" in n and "z/stray.tif" in n for n in notes)
    # without group_by every file is its own group: the split is per file
    per_file, notes = ds.update_split(tmp_path, group_by=None)
    assert any("Grouping changed" in n for n in notes)
    assert len(set(per_file.group_map().values())) == len(per_file.assignments)
    # a pattern without a capture group groups by the whole match
    whole, _ = ds.update_split(tmp_path, group_by=r"plate\d_well..", resplit=True)
    assert whole.groups["x/plate1_wellA01_f000.tif"] == "name:plate1_wellA0"
    with pytest.raises(DatasetError, match="not a valid regular expression"):
        ds.update_split(tmp_path, group_by="plate(")
    samples = ds.load_samples(tmp_path, group_by=WELL, resplit=True)
    assert "grouped by file name pattern" in samples.split_lines()[0]


def test_a_version_1_split_migrates_towards_test(tmp_path):
    keys = _annotate(tmp_path, {0: "a", 1: "a", 2: "b", 3: "b", 4: "a", 5: "b"})
    by_source = {}
    for k, src in keys.items():
        by_source.setdefault(src, []).append(k)
    old = {}
    for i, (_, ks) in enumerate(sorted(by_source.items())):
        for k in ks:
            old[k] = ["train", "val", "test"][i % 3]
    s0 = sorted(by_source["/data/stack00.tif"])  # straddles train and test
    for k in s0[:5]:
        old[k] = "train"
    for k in s0[5:]:
        old[k] = "test"
    s1 = sorted(by_source["/data/stack01.tif"])  # straddles train and val
    old[s1[0]] = "train"
    (tmp_path / "split.json").write_text(
        json.dumps(
            {"version": 1, "val_fraction": 0.2, "test_fraction": 0.1, "seed": 0, "assignments": old}
        )
    )
    assert ds.load_split(tmp_path).groups == {}

    split, notes = ds.update_split(tmp_path)
    for k, subset in old.items():
        if subset == "test":
            assert split.assignments[k] == "test"  # never out of test
    assert all(split.assignments[k] == "test" for k in s0)
    assert all(split.assignments[k] == "val" for k in s1)
    changed = {k for k in old if split.assignments[k] != old[k]}
    assert changed == set(s0[:5]) | {s1[0]}
    assert notes[0].startswith("Upgraded") and "2 groups straddled" in notes[0]
    assert any("/data/stack00.tif" in n and "5 files moved from train to test" in n for n in notes)
    assert any("/data/stack01.tif" in n and "1 file moved from train to val" in n for n in notes)
    saved = json.loads((tmp_path / "split.json").read_text())
    assert saved["version"] == 2 and saved["group_by"] is None
    assert set(saved["groups"]) == set(old) and set(saved["sha1"]) == set(old)
    assert ds.update_split(tmp_path) == (split, [])  # done once


def test_bad_split_files_say_what_to_do(tmp_path):
    _annotate(tmp_path, {0: "a", 1: "b"}, pages=range(3))
    (tmp_path / "split.json").write_text(json.dumps({"version": 7, "assignments": {}}))
    with pytest.raises(DatasetError, match="version 7.*update napari-microclf.*delete"):
        ds.update_split(tmp_path)
    (tmp_path / "split.json").write_text(
        json.dumps(
            {
                "version": 2,
                "val_fraction": 0.2,
                "test_fraction": 0.1,
                "seed": 0,
                "assignments": {"a/x.tif": "train"},
            }
        )
    )  # no groups
    with pytest.raises(DatasetError, match="corrupt.*delete it"):
        ds.load_samples(tmp_path)
    (tmp_path / "split.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="corrupt"):
        ds.load_split(tmp_path)


def test_identical_files_are_kept_in_one_subset(tmp_path):
    for cls in "ab":
        (tmp_path / cls).mkdir()
        for i in range(20):
            tifffile.imwrite(tmp_path / cls / f"{cls}{i:02d}.tif", _img(hash((cls, i)) % 2**32))
    split, notes = ds.update_split(tmp_path)
    assert not notes
    copies = {}
    for subset in ds.SUBSETS:  # copy a file of each subset into the other class
        original = split.files(subset)[0]
        other = "b" if original.startswith("a/") else "a"
        copy = f"{other}/copy_of_{original.split('/')[1]}"
        shutil.copy(tmp_path / original, tmp_path / copy)
        copies[copy] = (original, subset)
    split2, notes = ds.update_split(tmp_path)
    for copy, (original, subset) in copies.items():
        assert split2.assignments[copy] == split2.assignments[original] == subset
        assert any(
            original in n
            and copy in n
            and f"kept together in {subset}" in n
            and "different classes" in n
            for n in notes
        )
    assert all(split2.assignments[k] == v for k, v in split.assignments.items())
    # copies present at the first split are kept together too
    fresh, notes = ds.update_split(tmp_path, seed=5, resplit=True)
    for copy, (original, _) in copies.items():
        assert fresh.assignments[copy] == fresh.assignments[original]
    assert sum("Identical files" in n for n in notes) == 3
    manifest = ds.split_manifest(tmp_path, fresh)
    entry = next(e for s in ds.SUBSETS for e in manifest[s] if e["key"] in copies)
    original = copies[entry["key"]][0]
    assert entry["sha1"] == hashlib.sha1((tmp_path / original).read_bytes()).hexdigest()
    assert entry["group"] == next(
        e["group"] for s in ds.SUBSETS for e in manifest[s] if e["key"] == original
    )


def test_new_pages_join_their_source_and_nothing_moves(tmp_path, monkeypatch):
    _annotate(tmp_path, {s: "ab"[s % 2] for s in range(8)}, pages=range(4))
    first, _ = ds.update_split(tmp_path)
    subset_of = {src: s.pop() for src, s in _sources(tmp_path, first).items()}
    assert set(subset_of.values()) == set(ds.SUBSETS)

    reads = []
    real = ds.read_provenance
    monkeypatch.setattr(ds, "read_provenance", lambda p: reads.append(p) or real(p))
    again, notes = ds.update_split(tmp_path)
    assert again.assignments == first.assignments and not notes and not reads  # all recorded

    added = _annotate(tmp_path, {s: "ab"[s % 2] for s in range(9)}, pages=range(4, 7))
    second, notes = ds.update_split(tmp_path)
    assert not notes and len(reads) == len(added) == 27  # only the new files were read
    assert all(second.assignments[k] == v for k, v in first.assignments.items())
    for key, src in added.items():
        if src in subset_of:
            assert second.assignments[key] == subset_of[src]
    new_stack = {second.assignments[k] for k, src in added.items() if src not in subset_of}
    assert len(new_stack) == 1


def test_rename_and_removal_keep_the_groups(tmp_path):
    _annotate(tmp_path, {0: "a", 1: "a", 2: "b", 3: "b", 4: "a", 5: "b"}, pages=range(3))
    split, _ = ds.update_split(tmp_path)
    ds.rename_class(tmp_path, "a", "alpha")
    renamed = ds.load_split(tmp_path)
    assert set(renamed.groups) == set(renamed.assignments) == set(renamed.sha1)
    assert {k.split("/")[0] for k in renamed.assignments} == {"alpha", "b"}
    for k, v in split.assignments.items():
        new = k.replace("a/", "alpha/", 1) if k.startswith("a/") else k
        assert renamed.assignments[new] == v and renamed.groups[new] == split.groups[k]
    after, notes = ds.update_split(tmp_path)
    assert after.assignments == renamed.assignments and not notes
    victim = ds.class_files(tmp_path, "b")[0]
    ds.move_to_trash(tmp_path, victim)
    after, _ = ds.update_split(tmp_path)
    assert f"b/{victim.name}" not in after.groups and len(after.assignments) == 17


def test_split_lines_and_few_groups_warning(tmp_path):
    stacks = {0: "round", 1: "round", **dict.fromkeys(range(2, 10), "long")}
    _annotate(tmp_path, stacks, pages=range(5))
    samples = ds.load_samples(tmp_path, 0.0, 0.2)  # no validation set: round goes train/test
    n = {s: len(getattr(samples, s)) for s in ds.SUBSETS}
    g = samples.subset_groups
    lines = samples.split_lines()
    assert lines[0] == (
        f"Split: train {n['train']} images in {g['train']} groups, "
        f"val 0 in 0, test {n['test']} in {g['test']} (grouped by source file)"
    )
    assert sum(g.values()) == 10 and samples.class_groups == {"long": 8, "round": 2}
    assert samples.image_counts["test"]["round"] == 5 and samples.group_counts["test"]["round"] == 1
    assert samples.warnings == [
        "Warning: class 'round' has only 2 groups: its test set holds "
        "1 group, so its test accuracy rests on one source."
    ]
    assert lines[-1] == samples.warnings[0] and "  class 'long': train" in "\n".join(lines)
    assert not any(w in samples.notes for w in samples.warnings)

    # with a validation set the two groups go to train and val: no test accuracy at all
    samples = ds.load_samples(tmp_path, 0.2, 0.1, resplit=True)
    assert any("'round' has only 2 groups and none in the test set" in w for w in samples.warnings)
    assert all(not w.startswith("Warning: class 'long'") for w in samples.warnings)


def test_identical_files_join_groups_across_names(tmp_path):
    layout = {
        f"plate{p}_well{r}{c:02d}": "xy"[(p + c) % 2]
        for p in (1, 2)
        for r in "AB"
        for c in (1, 2, 3)
    }
    _wells(tmp_path, layout, fields=4)
    split, _ = ds.update_split(tmp_path, group_by=WELL)
    well_subset = {k.split("/")[1][:14]: v for k, v in split.assignments.items()}
    # a copy under the name of a new well joins the well of its original
    original = split.files("test")[0]
    copy = ("y" if original.startswith("x/") else "x") + "/plate9_wellZ99_f000.tif"
    shutil.copy(tmp_path / original, tmp_path / copy)
    split, notes = ds.update_split(tmp_path, group_by=WELL)
    assert split.assignments[copy] == "test"
    assert any(original in n and copy in n and "kept together in test" in n for n in notes)
    # a copy that bridges a train well and a test well makes them one group, in test
    train_well = next(w for w, s in well_subset.items() if s == "train")
    test_well = original.split("/")[1][:14]
    bridge = f"x/{test_well}_f900.tif"
    shutil.copy(
        tmp_path / next(k for k in split.files("train") if train_well in k), tmp_path / bridge
    )
    before = dict(split.assignments)
    split, notes = ds.update_split(tmp_path, group_by=WELL)
    assert all(split.assignments[k] == "test" for k in split.assignments if train_well in k)
    assert any(
        n.startswith("Keeping groups whole") and "4 files moved from train to test" in n
        for n in notes
    )
    moved = {k for k, v in before.items() if split.assignments[k] != v}
    assert moved and all(before[k] == "train" for k in moved)
