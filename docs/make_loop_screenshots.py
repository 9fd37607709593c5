"""Regenerate ``docs/review.png``, ``docs/gradcam.png`` and ``docs/label-next.png``: the
improvement loop in napari, as a user sees it.

    xvfb-run -a python docs/make_loop_screenshots.py [MODEL]

Without MODEL: the sample dataset and the short training of ``make_report_screenshot.py``
(some test images misclassified, so the error review has something to show); then, for
Grad-CAM and label next, a model trained with the defaults at a higher learning rate.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

DOCS = Path(__file__).parent


def wait(widget, timeout: float = 600) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while widget.worker is not None and time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        QApplication.processEvents()
        time.sleep(0.02)


def save(viewer, name: str) -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(30):
        QApplication.processEvents()
        time.sleep(0.02)
    path = DOCS / name
    viewer.window._qt_window.grab().scaledToWidth(1400).save(str(path), "PNG")
    print(f"{path}: {path.stat().st_size // 1024} KB")


def main() -> None:
    warnings.filterwarnings("ignore")  # no deprecation toast on the screenshots
    import napari
    import numpy as np

    sys.path.insert(0, str(DOCS))
    from make_report_screenshot import train_sample

    from napari_microclf._qt._tf import ensure_tensorflow
    from napari_microclf._qt.label_next import LabelNextWidget
    from napari_microclf._qt.predict import PredictWidget
    from napari_microclf._qt.train import TrainWidget
    from napari_microclf.core.bundle import read_meta
    from napari_microclf.core.review import load_report
    from napari_microclf.core.sample import write_sample
    from napari_microclf.core.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        viewer = napari.Viewer(show=True)  # OpenGL before TensorFlow (see _qt/_tf.py)
        viewer.window._qt_window.resize(1500, 950)
        ensure_tensorflow()
        bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else train_sample(tmp)
        report = load_report(bundle)

        # 1. error review: a click on an error cell of Train's confusion matrix
        train_w = TrainWidget(viewer)
        viewer.window.add_dock_widget(train_w, name="Train", area="right")
        train_w.show_report(report, bundle, read_meta(bundle))
        cm = np.array(report["confusion_matrix"])
        off = cm - np.diag(np.diag(cm))
        i, j = np.unravel_index(int(off.argmax()), off.shape) if off.any() else (0, 0)
        names = report["class_names"]
        train_w.review_cell(names[i], names[j])
        review = next(
            w for w in viewer.window.dock_widgets.values() if type(w).__name__ == "ReviewWidget"
        )
        wait(review)
        viewer.window.remove_dock_widget(viewer.window.dock_widgets["Train"].parent())
        save(viewer, "review.png")

        # 2. Grad-CAM over the sample stack, with a model trained as the defaults do
        viewer.window.remove_dock_widget(review.parent())
        viewer.layers.clear()
        data = read_meta(bundle)["data_dir"]
        bundle = train(
            TrainConfig(data, str(tmp / "good"), image_size=96, learning_rate=1e-3)
        ).bundle
        sample = write_sample(tmp / "sample", n_per_class=1, size=96, seed=3)
        viewer.open(str(sample["stack"]), plugin="napari-microclf")
        predict = PredictWidget(viewer, bundle=bundle)
        viewer.window.add_dock_widget(predict, name="Predict", area="right")
        predict.choose([viewer.layers[0].name])
        predict.run()
        wait(predict)
        predict.explain()
        wait(predict)
        viewer.dims.set_current_step(0, 3)
        viewer.reset_view()
        save(viewer, "gradcam.png")

        # 3. label next over a folder of new images
        for name, widget in dict(viewer.window.dock_widgets).items():
            if name != "Train":  # Predict and its plot along the stack
                viewer.window.remove_dock_widget(widget.parent())
        viewer.layers.clear()
        pool = write_sample(tmp / "pool", n_per_class=8, size=96, seed=11)["dataset"]
        label = LabelNextWidget(viewer, bundle=bundle)
        viewer.window.add_dock_widget(label, name="Label next", area="right")
        label.top.setValue(8)
        label.find(folder=pool)
        wait(label)
        save(viewer, "label-next.png")
        viewer.close()


if __name__ == "__main__":
    main()
