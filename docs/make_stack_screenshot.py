"""Screenshots of classified stacks: docs/labels.png (two stacks of different sizes at the
same origin, their labels one under the other, the in-view overlay) and docs/stack-plot.png
(probabilities along the stack, docked under the viewer, linked with the slider).

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_stack_screenshot.py \
        [model folder]

Without a model folder a small one is trained on the sample dataset first (about a minute
on a CPU; the frozen ImageNet base when its weights are in the Keras cache).
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # no deprecation toast on the screenshots

import napari  # noqa: E402
import numpy as np  # noqa: E402
from _shots import pause, save, wait  # noqa: E402


def train_model(out: Path) -> Path:
    from napari_microclf.core.sample import make_sample_dataset
    from napari_microclf.core.train import TrainConfig, train

    data = make_sample_dataset(out / "data", n_per_class=20, size=96)
    t0 = time.time()
    print(f"model: {out / 'model'}")
    result = train(
        TrainConfig(
            str(data),
            str(out / "model"),
            epochs=8,
            batch_size=16,
            image_size=96,
            backbone="efficientnet-lite0",
            learning_rate=1e-3,
        )
    )
    print(f"training: {time.time() - t0:.0f}s, test accuracy {result.report.get('accuracy')}")
    return result.bundle


def main():
    viewer = napari.Viewer()  # OpenGL first, TensorFlow after (see tests/conftest.py)
    viewer.window._qt_window.resize(1500, 950)
    viewer.window._qt_window.show()
    pause(1)
    from napari_microclf._qt._tf import ensure_tensorflow
    from napari_microclf._qt.predict import PredictWidget
    from napari_microclf._qt.stackplot import StackPlot
    from napari_microclf.core.sample import make_sample_stack

    ensure_tensorflow()
    bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else train_model(Path(tempfile.mkdtemp()))
    big, _ = make_sample_stack(n_pages=12, size=96, seed=1)
    small, _ = make_sample_stack(n_pages=5, size=64, seed=2)
    viewer.add_image(
        big,
        name="cells.tif",
        colormap="gray",
        contrast_limits=np.percentile(big, [1, 99.8]).tolist(),
    )
    viewer.add_image(
        small,
        name="second field.tif",
        colormap="magenta",
        blending="additive",
        contrast_limits=np.percentile(small, [1, 99.8]).tolist(),
    )
    widget = PredictWidget(viewer, bundle)
    viewer.window.add_dock_widget(widget, name="Predict (napari-microclf)")
    widget.threshold.setValue(0.5)
    widget.choose(["cells.tif", "second field.tif"])
    wait(widget.run())
    viewer.layers.selection.active = viewer.layers["cells.tif"]
    viewer.dims.set_current_step(0, 3)
    plot = widget.plot
    assert isinstance(plot, StackPlot), "the plot opens after a stack is classified"
    viewer.reset_view()
    viewer.camera.zoom *= 0.8  # a margin around the image
    pause(1.5)
    save(viewer, "labels")
    plot.click_page(7)  # a click on the plot moves the slider (and the marker with it)
    pause(1.5)
    save(viewer, "stack-plot")
    print("overlay:", widget.labels.overlay.text, "| summary:", plot.summary)


if __name__ == "__main__":
    main()
