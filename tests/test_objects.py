"""Objects (issue 23): the crop around each label of a segmentation, on a real photograph
(scikit-image's coins, segmented by thresholding) and on small arrays whose answer is known."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from napari_microclf.core.dataset import list_classes, read_provenance, update_split
from napari_microclf.core.errors import BundleError, DatasetError, ImageReadError
from napari_microclf.core.objects import (
    OBJECTS_FILE,
    CropSpec,
    add_objects,
    crop_window,
    cut_crop,
    image_objects,
    objects_of,
)


@pytest.fixture(scope="module")
def coins(tmp_path_factory):
    """The coins photograph, its labels (Otsu threshold, small specks dropped), as files."""
    import tifffile
    from skimage import data, filters, measure

    image = data.coins()
    mask = image > filters.threshold_otsu(image)
    labels = measure.label(mask)
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < 50] = 0
    labels = measure.label(labels > 0).astype(np.uint16)
    root = tmp_path_factory.mktemp("coins")
    tifffile.imwrite(root / "coins.tif", image)
    tifffile.imwrite(root / "coins_labels.tif", labels)
    return root / "coins.tif", root / "coins_labels.tif", image, labels


def test_objects_match_regionprops_on_a_real_photograph(coins):
    from skimage import measure

    _, _, image, labels = coins
    found = objects_of(labels)
    props = measure.regionprops(labels)
    assert len(found) == len(props) > 10
    for o, p in zip(found, props, strict=True):
        assert (o.label, o.area, o.bbox) == (p.label, p.area, p.bbox)
        np.testing.assert_allclose(o.centroid, p.centroid)
    h, w = labels.shape
    assert [o.touches_border for o in found] == [
        p.bbox[0] == 0 or p.bbox[1] == 0 or p.bbox[2] == h or p.bbox[3] == w for p in props
    ]


def test_ids_need_not_be_contiguous():
    labels = np.zeros((40, 40), np.int32)
    labels[2:6, 3:9] = 7
    labels[20:30, 20:25] = 1000
    found = objects_of(labels)
    assert [(o.label, o.area, o.bbox) for o in found] == [
        (7, 24, (2, 3, 6, 9)),
        (1000, 50, (20, 20, 30, 25)),
    ]


def test_a_crop_is_centred_sized_padded_and_masked():
    page = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100) + 1
    labels = np.zeros((100, 100), np.int32)
    labels[40:60, 45:55] = 1  # 20 x 10, centre (50, 50)
    labels[0:10, 0:10] = 2  # in the corner: its crop leaves the page
    labels[62:64, 48:52] = 3  # a neighbour inside object 1's window
    one, corner, _ = objects_of(labels)
    spec = CropSpec(margin=0.25)  # side 20 * 1.5 = 30
    assert crop_window(one, spec) == (35, 35, 30)
    crop = cut_crop(page, labels, one, spec)
    np.testing.assert_array_equal(crop, page[35:65, 35:65])
    assert crop_window(one, CropSpec(size="fixed", context=64)) == (18, 18, 64)
    padded = cut_crop(page, labels, corner, spec)  # side 15, from (-3, -3)
    assert padded.shape == (15, 15) and not padded[:3].any() and not padded[:, :3].any()
    np.testing.assert_array_equal(padded[3:, 3:], page[:12, :12])
    others = cut_crop(page, labels, one, CropSpec(mask="others"))
    assert not others[27:29, 13:17].any()  # object 3, at (62-35, 48-35)
    assert others[15, 15] == page[50, 50]
    only = cut_crop(page, labels, one, CropSpec(mask="object"))
    assert (only > 0).sum() == one.area
    rgb = np.repeat(page[..., None], 3, axis=-1)
    assert cut_crop(rgb, labels, one, spec).shape == (30, 30, 3)  # channels kept


@pytest.mark.parametrize(
    "labels, said",
    [
        (np.zeros((303, 384), np.float32), "not integer labels"),
        (np.zeros((303, 384), bool), "not integer labels"),
        (np.zeros((300, 384), np.int32), "must be the segmentation of this very image"),
        (np.full((303, 384), -1, np.int32), "negative labels"),
        (np.zeros((3, 303, 384), np.int32), "has 3 pages but the image has 1"),
    ],
)
def test_labels_that_do_not_fit_are_said_in_one_line(coins, labels, said):
    with pytest.raises(ImageReadError, match=said):
        list(image_objects(coins[2], labels))


def test_a_stack_with_one_label_page_for_all_or_one_per_page(coins):
    _, _, image, labels = coins
    stack = np.stack([image, image[::-1]])
    one = list(image_objects(stack, labels, page_axis=0))
    assert [len(objs) for _, _, _, objs in one] == [labels.max()] * 2
    per_page = list(image_objects(stack, np.stack([labels, labels[::-1]]), page_axis=0))
    assert [o.bbox for o in per_page[1][3]] != [o.bbox for o in per_page[0][3]]
    assert [p for p, *_ in image_objects(stack, labels, page_axis=0, pages=[1])] == [1]


def test_objects_go_into_class_folders_with_provenance_and_one_group(coins, tmp_path):
    image_path, labels_path, _, labels = coins
    data = tmp_path / "data"
    small = [
        o.label
        for o in objects_of(labels)
        if o.area < np.median([o.area for o in objects_of(labels)])
    ]
    big = [o.label for o in objects_of(labels) if o.label not in small]
    add_objects(data, image_path, labels_path, "small", ids=small)
    added = add_objects(data, image_path, labels_path, {(0, b): "big" for b in big})
    assert list_classes(data) == ["big", "small"] and len(added) == len(big)
    assert all(r.written for r in added)
    assert json.loads((data / OBJECTS_FILE).read_text())["crop"] == CropSpec().to_dict()
    prov = read_provenance(added[0].path)
    assert prov["label"] == big[0] and prov["labels"] == str(labels_path)
    assert prov["source"] == str(image_path) and len(prov["bbox"]) == 4
    assert added[0].path.name.startswith(f"coins_p0000_l{big[0]}_")
    # again: nothing new; another crop setting for the same dataset: refused
    assert not any(
        r.written for r in add_objects(data, image_path, labels_path, "small", ids=small)
    )
    with pytest.raises(DatasetError, match="one crop setting"):
        add_objects(data, image_path, labels_path, "small", CropSpec(mask="others"), ids=small)
    # every object of one field of view is in one subset (grouped by the source image)
    split, _ = update_split(data, seed=0)
    assert len(set(split.assignments.values())) == 1


# -- a model of objects ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_on_objects(tmp_path_factory):
    """A model trained on the cells of 4 synthetic fields (their truth tables), and a 5th
    field it never saw."""
    from napari_microclf.core.sample import write_sample_fields
    from napari_microclf.core.train import TrainConfig, train

    root = tmp_path_factory.mktemp("objects")
    fields = write_sample_fields(root / "fields", n_fields=5, size=192, n_cells=18, seed=3)
    data = root / "data"
    for f in fields[:4]:
        add_objects(data, f["image"], f["labels"], {(0, k): v for k, v in f["truth"].items()})
    config = TrainConfig(str(data), str(root / "model"), image_size=64, epochs=30, seed=0)
    return train(config), fields[4], fields[0]


def test_a_model_of_objects_classifies_each_object_of_a_new_field(trained_on_objects, tmp_path):
    from napari_microclf.core.csv_format import write_csv
    from napari_microclf.core.predict_objects import predict_objects

    result, field, _ = trained_on_objects
    assert result.meta["objects"]["crop"] == CropSpec().to_dict()
    rows = list(predict_objects(result.bundle, field["image"], field["labels"]))
    assert [r.object_label for r in rows] == sorted(field["truth"])
    right = sum(r.class_name == field["truth"][r.object_label] for r in rows)
    print(f"objects of a new field: {right} of {len(rows)} right")
    assert right / len(rows) >= 0.8, (right, len(rows))
    labels = tifffile_read(field["labels"])
    for r in rows:
        ys, xs = np.nonzero(labels == r.object_label)
        assert r.area == len(ys) and r.centroid == pytest.approx((ys.mean(), xs.mean()))
    out = tmp_path / "objects.csv"
    write_csv(rows, out, result.class_names)
    with out.open(newline="") as f:
        header = next(csv.reader(f))
    probs = [f"p_{c}" for c in result.class_names]
    assert header == [
        "file", "page", "label", "class", "confidence", *probs, "centroid_y", "centroid_x",
        "area", "unfamiliar",
    ]  # fmt: skip


def tifffile_read(path):
    import tifffile

    return tifffile.imread(path)


def test_objects_from_the_command_line_and_python(trained_on_objects, lite0, tmp_path, capsys):
    import shutil

    import tifffile

    from napari_microclf.cli import main as cli_main
    from napari_microclf.core.predict import predict

    result, field, _ = trained_on_objects
    model = str(result.bundle)
    images = tmp_path / "images"
    images.mkdir()
    for key in ("image", "labels"):
        shutil.copy(field[key], images / field[key].name)
    tifffile.imwrite(images / "no_labels.tif", tifffile.imread(field["image"])[::-1])
    out = tmp_path / "o.csv"
    # a folder: each image with its <name>_labels file; one without is named
    assert cli_main(["predict", model, str(images), "--labels-suffix", "_labels"]) == 1
    assert "no_labels.tif" in capsys.readouterr().err
    (images / "no_labels.tif").unlink()
    assert (
        cli_main(["predict", model, str(images), "--labels-suffix", "_labels", "--csv", str(out)])
        == 0
    )
    said = capsys.readouterr().out
    assert f"Classified {len(field['truth'])} object(s) on 1 page(s)" in said
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["label"]) for r in rows] == sorted(field["truth"])
    assert {r["status"] for r in rows} == {"ok"}
    # Python: arrays too, the same classes
    image, labels = tifffile.imread(field["image"]), tifffile.imread(field["labels"])
    objects = predict(model, image, labels=labels)
    assert [o.class_name for o in objects] == [r["class"] for r in rows]
    # the wrong kind of model, either way: one line, before any work
    assert cli_main(["predict", model, str(field["image"])]) == 1
    assert "classifies objects" in capsys.readouterr().err
    args = ["predict", str(lite0.bundle), str(field["image"]), "--labels", str(field["labels"])]
    assert cli_main(args) == 1
    assert "trained on whole images" in capsys.readouterr().err
    with pytest.raises(BundleError, match="classifies objects"):
        predict(model, image)


def test_objects_add_from_the_command_line(coins, tmp_path, capsys):
    from napari_microclf.cli import main as cli_main

    image, labels_path, _, labels = coins
    data = tmp_path / "data"
    args = ["objects", "add", str(data), str(image), str(labels_path)]
    assert cli_main([*args, "--class", "coin", "--ids", "1,2,3", "--mask", "others"]) == 0
    assert "Added 3 object(s)" in capsys.readouterr().out
    table = tmp_path / "t.csv"
    table.write_text("label,class\n4,coin\n5,dark\n6,\n")
    assert cli_main([*args, "--table", str(table)]) == 0
    assert "Added 2 object(s)" in capsys.readouterr().out
    assert sorted(p.parent.name for p in data.glob("*/*.tif")) == ["coin"] * 4 + ["dark"]
    table.write_text("id,kind\n1,coin\n")
    assert cli_main([*args, "--table", str(table)]) == 1
    assert "needs the columns label and class" in capsys.readouterr().err
    assert cli_main([*args, "--class", "coin", "--ids", "1,x"]) == 1
    assert "give label numbers" in capsys.readouterr().err


def test_objects_on_a_cluster_give_the_single_process_csv(trained_on_objects, client, tmp_path):
    import shutil

    import tifffile

    from napari_microclf.cli import main as cli_main

    result, field, _ = trained_on_objects
    images = tmp_path / "images"
    images.mkdir()
    for key in ("image", "labels"):
        shutil.copy(field[key], images / field[key].name)
    stack = np.stack([tifffile.imread(field["image"])] * 2)  # a 2-page stack, one label page
    tifffile.imwrite(images / "stack.tif", stack)
    shutil.copy(field["labels"], images / "stack_labels.tif")
    argv = ["predict", str(result.bundle), str(images), "--labels-suffix", "_labels", "--quiet"]
    assert cli_main([*argv, "--csv", str(tmp_path / "one.csv")]) == 0
    address = client.scheduler.address
    assert cli_main([*argv, "--csv", str(tmp_path / "two.csv"), "--cluster", address]) == 0
    one = (tmp_path / "one.csv").read_bytes()
    assert one == (tmp_path / "two.csv").read_bytes()
    assert one.count(b"\r\n") == 1 + 3 * len(field["truth"])  # the field, the stack's 2 pages


def test_objects_of_an_array_are_grouped_by_the_source_given(coins, tmp_path):
    _, _, image, labels = coins
    with pytest.raises(ValueError, match="needs source="):
        add_objects(tmp_path / "d", image, labels, "coin", ids=[1])
    added = add_objects(tmp_path / "d", image, labels, "coin", ids=[1, 2], source="plate 3.tif")
    assert [read_provenance(r.path)["source"] for r in added] == ["plate 3.tif"] * 2
    assert read_provenance(added[0].path)["labels"] is None  # not the array's repr
    assert added[0].path.name.startswith("plate_3_p0000_l1_")


def test_label_next_ranks_the_objects_not_yet_in_the_dataset(trained_on_objects, tmp_path):
    import shutil

    from napari_microclf.core.active import label_next

    result, new, seen = trained_on_objects
    pool = tmp_path / "pool"
    pool.mkdir()
    for f in (new, seen):  # a field the model trained on: its cells are examples already
        for key in ("image", "labels"):
            shutil.copy(f[key], pool / f[key].name)
    cands = label_next(
        result.bundle, pool, 100, dataset=result.meta["data_dir"], labels_suffix="_labels"
    )
    assert {Path(c.file).name for c in cands} == {new["image"].name}
    assert sorted(c.label for c in cands) == sorted(new["truth"])
    u = [c.uncertainty for c in cands if not c.unfamiliar]
    assert u == sorted(u, reverse=True)


def test_a_page_without_objects_gives_no_rows_and_is_said_once(trained_on_objects):
    import tifffile

    from napari_microclf.core.predict_objects import ObjectsResult, predict_objects

    result, field, _ = trained_on_objects
    image, labels = tifffile.imread(field["image"]), tifffile.imread(field["labels"])
    empty: list[int] = []
    stack_labels = np.stack([np.zeros_like(labels), labels, np.zeros_like(labels)])
    rows = list(
        predict_objects(
            result.bundle, np.stack([image] * 3), stack_labels, page_axis=0, empty_pages=empty
        )
    )
    assert {r.page for r in rows} == {1} and len(rows) == len(field["truth"])
    assert empty == [0, 2]
    said = ObjectsResult(rows, [], [("s.tif", p) for p in empty], 1).summary()
    assert "2 page(s) have no objects (s.tif page 0, s.tif page 2)" in said
