"""``python -m napari_microclf._demo``: napari with the plugin's tabbed dock (Annotate, Train,
Predict, Review errors, Label next) and the sample data open, ready to train on a sample
dataset written to ``./microclf-demo``; a field of labelled cells and its Labels layer are
open too (hidden), with three more fields in ``./microclf-demo/cells`` for objects.

``--out FOLDER`` moves the demo folder. ``docs/make_screenshots.py`` builds the same viewer
for the docs' screenshots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PLUGIN = "napari-microclf"


def build(out: Path):
    """The viewer with the tabbed "Microscopy Classifier" dock and the sample data; returns
    (viewer, widgets): the tab widget under "Tabs" and each tab's widget under its name."""
    import napari

    from .core.sample import write_sample

    info = write_sample(out, n_per_class=150, size=96, seed=0, fields=4)
    viewer = napari.Viewer(title="napari-microclf demo")
    # a field of labelled cells and its segmentation, hidden: for the Objects group of
    # Annotate (click a cell, press a class key) and for Predict with a model of objects
    field = info["fields"][0]
    viewer.open(field["image"], name="cells", visible=False)
    viewer.open(field["labels"], name="cells labels", layer_type="labels", visible=False)
    viewer.open_sample(PLUGIN, "microscopy_classes")
    _, tabs = viewer.window.add_plugin_dock_widget(PLUGIN, "Microscopy Classifier")
    annotate, train, predict = tabs.annotate, tabs.train, tabs.predict
    annotate.set_dataset(info["dataset"])
    # the guide's defaults: weights "auto" (ImageNet EfficientNet-B0 when Keras has it, else
    # the installed ImageNet EfficientNet-Lite0), a frozen base, 224 px; the widget's note
    # says which one this computer will use
    train.set_folders(info["dataset"], out / "model")
    if (out / "model" / "microclf.json").exists():
        predict.set_bundle(out / "model")
    predict.choose(["mixed stack"])
    viewer.layers.selection.active = viewer.layers["mixed stack"]
    return viewer, {
        "Tabs": tabs,
        "Annotate": annotate,
        "Train": train,
        "Predict": predict,
        "Review errors": tabs.review,
        "Label next": tabs.label_next,
    }


def main(argv=None) -> int:
    import napari

    p = argparse.ArgumentParser(prog="python -m napari_microclf._demo")
    p.add_argument("--out", default="microclf-demo", help="demo folder (dataset and model)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    viewer, _ = build(out)
    print(
        f"napari-microclf demo: sample dataset in {out / 'dataset'}; press Start training "
        "in the Train tab, then Run in the Predict tab."
    )
    viewer.window._qt_window.showMaximized()
    napari.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
