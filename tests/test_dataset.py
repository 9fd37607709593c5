"""Class folders, adding examples, and the persisted split."""

import json

import numpy as np
import pytest
import tifffile

from napari_microclf.core import dataset as ds
from napari_microclf.core.dataset import DatasetError


def _img(seed, shape=(16, 16)):
    return np.random.default_rng(seed).integers(0, 4000, shape).astype(np.uint16)


def _fill(root, counts):
    """``n`` examples per class, each from its own source file (so each is its own group)."""
    for cls, n in counts.items():
        for i in range(n):
            ds.add_example(root, cls, _img(hash((cls, i)) % 2**32), source=f"{cls}_{i}.tif", page=0)


def test_add_example_writes_a_tiff_with_provenance(tmp_path):
    img = _img(0, (12, 14, 2))
    res = ds.add_example(tmp_path, "mitotic", img, source="/data/stack.ome.tif", page=7)
    assert res.written and res.path.parent == tmp_path / "mitotic"
    assert res.path.name.startswith("stack_p0007_") and res.path.suffix == ".tif"
    with tifffile.TiffFile(res.path) as tif:
        np.testing.assert_array_equal(np.moveaxis(tif.asarray(), 0, -1), img)
    prov = ds.read_provenance(res.path)
    assert prov["source"] == "/data/stack.ome.tif" and prov["page"] == 7
    assert [p.name for p in (tmp_path / "mitotic").iterdir()] == [res.path.name]  # no temp left


def test_duplicates_are_reported_not_written(tmp_path):
    img = _img(1)
    first = ds.add_example(tmp_path, "a", img)
    again = ds.add_example(tmp_path, "b", img.copy())
    assert again.duplicate and again.path == first.path and again.class_name == "a"
    assert ds.class_counts(tmp_path) == {"a": 1}
    other = ds.add_example(tmp_path, "a", _img(2))
    assert other.written and other.path != first.path


def test_add_example_rejects_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="2D image"):
        ds.add_example(tmp_path, "a", np.zeros((3, 8, 8, 8)))
    for bad in ["", ".hidden", "a/b", "x:y", "_cache"]:
        with pytest.raises(DatasetError):
            ds.add_example(tmp_path, bad, _img(0))


def test_class_management_never_deletes(tmp_path):
    _fill(tmp_path, {"round": 2, "long": 1})
    ds.add_class(tmp_path, "empty")
    assert ds.class_counts(tmp_path) == {"empty": 0, "long": 1, "round": 2}
    ds.rename_class(tmp_path, "long", "elongated")
    with pytest.raises(DatasetError, match="already exists"):
        ds.rename_class(tmp_path, "round", "elongated")
    trashed = ds.remove_class(tmp_path, "round")
    assert trashed.parent == tmp_path / ".trash" and len(list(trashed.iterdir())) == 2
    f = ds.class_files(tmp_path, "elongated")[0]
    moved = ds.move_to_trash(tmp_path, f)
    assert moved.exists() and not f.exists()
    assert ds.class_counts(tmp_path) == {"elongated": 0, "empty": 0}


def test_split_is_stratified_seeded_and_persisted(tmp_path):
    _fill(tmp_path, {"a": 30, "b": 20, "c": 10})
    split, _ = ds.update_split(tmp_path, 0.2, 0.1, seed=3)
    assert (tmp_path / "split.json").exists()
    for cls, n in {"a": 30, "b": 20, "c": 10}.items():
        sub = [v for k, v in split.assignments.items() if k.startswith(cls + "/")]
        assert sub.count("test") == round(n * 0.1) and sub.count("val") == round(n * 0.2)
    # the same seed on a copy of the data gives the same split
    other = tmp_path / "copy"
    _fill(other, {"a": 30, "b": 20, "c": 10})
    split2, _ = ds.update_split(other, 0.2, 0.1, seed=3)
    assert split2.assignments == split.assignments
    assert ds.load_split(tmp_path).assignments == split.assignments


def test_new_images_do_not_reshuffle_and_test_never_leaks(tmp_path):
    _fill(tmp_path, {"a": 20, "b": 20})
    first, _ = ds.update_split(tmp_path)
    for i in range(10):
        ds.add_example(tmp_path, "a", _img(1000 + i), source="new.tif", page=i)
    second, notes = ds.update_split(tmp_path)
    assert not notes
    for key, subset in first.assignments.items():
        assert second.assignments[key] == subset  # nothing moved
    assert len(second.assignments) == 50
    assert 2 <= second.counts()["test"] <= 6
    # a request with other fractions reuses the stored split and says so
    third, notes = ds.update_split(tmp_path, val_fraction=0.3)
    assert third.assignments == second.assignments and "Reusing" in notes[0]
    samples = ds.load_samples(tmp_path)
    train = {str(r.path) for r in samples.train}
    assert train.isdisjoint(str(r.path) for r in samples.test)
    assert train.isdisjoint(str(r.path) for r in samples.val)


def test_removed_files_leave_the_split(tmp_path):
    _fill(tmp_path, {"a": 10, "b": 10})
    split, _ = ds.update_split(tmp_path)
    victim = ds.class_files(tmp_path, "a")[0]
    ds.move_to_trash(tmp_path, victim)
    split, _ = ds.update_split(tmp_path)
    assert f"a/{victim.name}" not in split.assignments and len(split.assignments) == 19


def test_bad_datasets_get_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        ds.load_samples(tmp_path / "missing")
    _fill(tmp_path, {"only": 5})
    with pytest.raises(DatasetError, match="at least 2 classes"):
        ds.load_samples(tmp_path)
    ds.add_class(tmp_path, "hollow")
    with pytest.raises(DatasetError, match="hollow"):
        ds.load_samples(tmp_path)
    _fill(tmp_path, {"hollow": 5})
    (tmp_path / "hollow" / "corrupt.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(DatasetError, match="corrupt.tif"):
        ds.load_samples(tmp_path)
    (tmp_path / "hollow" / "corrupt.tif").unlink()
    (tmp_path / "split.json").write_text("{broken")
    with pytest.raises(DatasetError, match="split.json"):
        ds.load_samples(tmp_path)


def test_split_json_is_readable(tmp_path):
    _fill(tmp_path, {"a": 4, "b": 4})
    ds.update_split(tmp_path)
    d = json.loads((tmp_path / "split.json").read_text())
    assert d["val_fraction"] == 0.2 and d["test_fraction"] == 0.1 and len(d["assignments"]) == 8
