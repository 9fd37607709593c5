"""Screenshots of objects (issue 23): docs/objects-annotate.png (cells of a Labels layer
annotated by clicking them and pressing 1-9, in their class colours) and
docs/objects-predict.png (every cell classified by a model of objects: the classes layer,
its legend and the per-object table, a row clicked).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_objects_screenshots.py

A small model of objects is trained first on 4 synthetic fields (about 15 s on a CPU).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # no deprecation toast on the screenshots

import napari  # noqa: E402
from _shots import pause, save, wait  # noqa: E402


def train_model(out: Path) -> Path:
    from napari_microclf.core.objects import add_objects
    from napari_microclf.core.sample import write_sample_fields
    from napari_microclf.core.train import TrainConfig, train

    fields = write_sample_fields(out / "fields", n_fields=4, size=192, n_cells=18, seed=3)
    for f in fields:
        add_objects(
            out / "data", f["image"], f["labels"], {(0, k): v for k, v in f["truth"].items()}
        )
    config = TrainConfig(str(out / "data"), str(out / "model"), image_size=64, epochs=30, seed=0)
    return train(config).bundle


def viewer_with_field(seed: int):
    from napari_microclf.core.sample import make_field

    viewer = napari.Viewer()  # OpenGL first, TensorFlow after (see tests/conftest.py)
    viewer.window._qt_window.resize(1500, 950)
    viewer.window._qt_window.show()
    image, labels, truth = make_field(size=256, n_cells=24, seed=seed)
    viewer.add_image(image, name="field", colormap="gray")
    viewer.add_labels(labels, name="field labels", opacity=0.25)
    pause(1)
    return viewer, labels, truth


def annotate(tmp: Path) -> None:
    viewer, labels, truth = viewer_with_field(seed=7)
    _, widget = viewer.window.add_plugin_dock_widget("napari-microclf", "Annotate")
    widget.set_dataset(tmp / "annotated")
    for name in ("round", "elongated", "fragmented"):
        widget.add_class(name)
    widget.objects.choose_labels("field labels")
    widget.keys_toggle.setChecked(True)
    for label in list(truth)[:9]:  # as clicking each cell and pressing its class's key
        widget.objects.select(0, label)
        widget.key_pressed(widget.classes().index(truth[label]) + 1)
    widget.objects.select(0, list(truth)[10])  # the next cell clicked, white
    viewer.layers.selection.active = viewer.layers["field"]
    pause(1)
    save(viewer, "objects-annotate")
    viewer.close()


def predict(model: Path) -> None:
    viewer, labels, truth = viewer_with_field(seed=11)
    _, widget = viewer.window.add_plugin_dock_widget("napari-microclf", "Predict")
    widget.set_bundle(model)
    widget.choose(["field"])
    wait(widget.run())
    right = sum(
        c == truth[k]
        for k, c in zip(
            viewer.layers["field classes"].features["label"],
            viewer.layers["field classes"].features["class"],
            strict=True,
        )
    )
    print(f"{right} of {len(truth)} cells right")
    # the row of the object nearest the field's centre: clicked, it is centred and selected
    feats = viewer.layers["field classes"].features
    row = int(((feats["centroid_y"] - 128) ** 2 + (feats["centroid_x"] - 128) ** 2).argmin())
    widget.table.selectRow(row)
    widget.objects.go_to_row(row)
    pause(1)
    save(viewer, "objects-predict")
    viewer.close()


def main():
    from napari_microclf._qt._tf import ensure_tensorflow

    with tempfile.TemporaryDirectory() as tmp:
        annotate(Path(tmp))
        ensure_tensorflow()
        predict(train_model(Path(tmp)))


if __name__ == "__main__":
    main()
