import time
import numpy as np
import pytest
from qtpy.QtCore import QTimer
from napari_microclf.core.sample import make_sample_dataset

TINY = {"epochs": 2, "batch_size": 8, "image_size": 32, "weights": "none", "fine_tune": "all",
        "learning_rate": 1e-3, "early_stopping": False}

@pytest.mark.parametrize("which", ["head", "new", "head", "new"])
def test_ab(make_napari_viewer, qtbot, tmp_path, which):
    if which == "head":
        from napari_microclf._qt._zz_train_head_tmp import TrainWidget
    else:
        from napari_microclf._qt.train import TrainWidget
    ds = make_sample_dataset(tmp_path / "ds", n_per_class=8, size=32)
    viewer = make_napari_viewer()
    widget = TrainWidget(viewer, ds, tmp_path / "model")
    viewer.window.add_dock_widget(widget)
    for k, v in TINY.items():
        getattr(widget.form, k).value = v
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(50)
    t0 = time.perf_counter()
    worker = widget.start()
    with qtbot.waitSignal(worker.finished, timeout=240000):
        pass
    timer.stop()
    gaps = np.diff(np.r_[t0, ticks])
    print(f"\nAB {which} maxgap {gaps.max():.2f} top3 {np.sort(gaps)[-3:].round(2)} total {time.perf_counter()-t0:.0f}s")
