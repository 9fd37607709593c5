"""Regenerate the widget screenshots of the docs (run under ``xvfb-run -a -s "-screen 0
1600x1000x24"``): the demo viewer, a few annotations, a short training, a prediction."""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # no PyQt5-deprecation toast on the screenshots

from _shots import DOCS, pause, wait  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QDockWidget  # noqa: E402

from napari_microclf._demo import build  # noqa: E402


def shot(viewer, name, tab):
    """Save the window with the tabbed dock showing ``tab`` (a widget of it) as docs/NAME.png."""
    window = viewer.window._qt_window
    tab.parent().parent().setCurrentWidget(tab)  # the QTabWidget's stack, then the tabs
    dock = next(
        d
        for d in window.findChildren(QDockWidget)
        if d.windowTitle().startswith("Microscopy Classifier")
    )
    window.resizeDocks([dock], [560], Qt.Horizontal)
    pause(1.0)
    path = DOCS / f"{name}.png"
    img = viewer.window._qt_window.grab()
    img.scaledToWidth(1400).save(str(path), "PNG")  # keeps each PNG small
    print(f"{path}: {path.stat().st_size // 1024} KB")


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()) / "microclf-demo"
    viewer, w = build(out)
    viewer.window._qt_window.resize(1500, 950)
    viewer.window._qt_window.show()
    pause(1)
    # Annotate: three classes, a few slices of the stack by the 1-9 keys' handler
    ann = w["Annotate"]
    stack = viewer.layers["mixed stack"]
    labels = stack.metadata["true_classes"]
    names = ann.classes()
    ann.set_keys_active(True)
    for page in range(4):
        viewer.dims.set_current_step(0, page)
        ann.key_pressed(names.index(labels[page]) + 1)
    viewer.dims.set_current_step(0, 4)
    shot(viewer, "annotate", ann)
    # Train
    tr = w["Train"]
    # the defaults (auto: a pretrained base; the head until it converges), then the top 2
    # stages fine-tuned so the curves show the marker; 96 px (the sample images' size)
    for name, value in {"fine_tune": 2, "fine_tune_epochs": 6, "image_size": 96}.items():
        getattr(tr.form, name).value = value
    t0 = time.time()
    wait(tr.start())
    print(f"training: {time.time() - t0:.0f}s, test accuracy {tr.result.report['accuracy']}")
    tr.tabs.setCurrentWidget(tr.curves)
    shot(viewer, "train-curves", tr)
    tr.tabs.setCurrentIndex(3)
    shot(viewer, "train-report", tr)
    # Predict the mixed stack
    pr = w["Predict"]
    pr.choose(["mixed stack"])
    wait(pr.run())
    viewer.layers.selection.active = stack
    viewer.dims.set_current_step(0, 5)
    shot(viewer, "predict", pr)
    viewer.close()


if __name__ == "__main__":
    main()
