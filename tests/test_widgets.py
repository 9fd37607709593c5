"""The plugin in napari: manifest, Annotate (buttons and keys 1-9), Train, Predict."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
import tifffile
from napari.utils import progress
from napari.utils.notifications import notification_manager
from qtpy.QtCore import Qt, QTimer

from napari_microclf._qt._session import SESSION
from napari_microclf._qt.annotate import AnnotateWidget
from napari_microclf._qt.label_next import LabelNextWidget
from napari_microclf._qt.predict import PredictWidget
from napari_microclf._qt.predictor_cache import cache_info
from napari_microclf._qt.review import ReviewWidget
from napari_microclf._qt.train import UPDATE_MS, State, TrainWidget
from napari_microclf.core.sample import make_sample_dataset, make_sample_stack
from napari_microclf.core.train import BatchEnd

PLUGIN = "napari-microclf"
TINY = {
    "epochs": 2,
    "batch_size": 8,
    "image_size": 32,
    "weights": "none",
    "fine_tune": "all",
    "learning_rate": 1e-3,
    "early_stopping": False,
}


@pytest.fixture(autouse=True)
def _fresh_session():
    SESSION.last_bundle = SESSION.dataset = None
    yield
    SESSION.last_bundle = SESSION.dataset = None


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    return make_sample_dataset(tmp_path_factory.mktemp("data") / "ds", n_per_class=8, size=32)


@pytest.fixture(scope="session")
def trained_bundle(scratch):
    return scratch.bundle


def _messages(level=None):
    return [
        str(n.message)
        for n in notification_manager.records
        if level is None or str(n.severity).lower().endswith(level)
    ]


def _late_update_is_ignored(widget: TrainWidget, qtbot, final: str) -> None:
    """An update of the run delivered after its end (queued before it) leaves the status
    line on the run's final state."""
    assert widget.status.text().startswith(final), widget.status.text()
    widget._on_update(BatchEnd(8, 200, 3, 10, {"loss": 0.5}))
    qtbot.wait(2 * UPDATE_MS)
    assert widget.status.text().startswith(final), widget.status.text()


def _tiny(widget: TrainWidget, **changes):
    for name, value in {**TINY, **changes}.items():
        getattr(widget.form, name).value = value


# -- manifest ------------------------------------------------------------------------------


def test_manifest_contributions_load_through_napari(make_napari_viewer):
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution(PLUGIN)
    assert {w.display_name for w in manifest.contributions.widgets} == {
        "Microscopy Classifier",
        "Annotate",
        "Train",
        "Predict",
        "Review errors",
        "Label next",
    }
    viewer = make_napari_viewer()
    kinds = {}
    for name in ("Annotate", "Train", "Predict", "Review errors", "Label next"):
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        kinds[name] = type(widget)
    assert kinds == {
        "Annotate": AnnotateWidget,
        "Train": TrainWidget,
        "Predict": PredictWidget,
        "Review errors": ReviewWidget,
        "Label next": LabelNextWidget,
    }
    # one entry with all of them as tabs, each with the whole height
    _, tabs = viewer.window.add_plugin_dock_widget(PLUGIN, "Microscopy Classifier")
    assert [type(tabs.widget(i)) for i in range(tabs.count())] == [
        AnnotateWidget,
        TrainWidget,
        PredictWidget,
        ReviewWidget,
        LabelNextWidget,
    ]
    assert [tabs.tabText(i) for i in range(tabs.count())] == [
        "Annotate",
        "Train",
        "Predict",
        "Review errors",
        "Label next",
    ]
    # napari's Layers menu: Annotate under Layers > Annotate, the rest under Classify
    from napari._app_model import get_app_model

    menus = get_app_model().menus

    def commands(menu_id):
        return [i.command.id for i in menus.get_menu(menu_id) if hasattr(i, "command")]

    assert "napari-microclf.annotate" in commands("napari/layers/annotate")
    assert {
        f"napari-microclf.{c}" for c in ("all", "train", "predict", "review", "label_next")
    } <= set(commands("napari/layers/classify"))
    assert set(manifest.categories) == {"Annotation", "Measurement"}
    layers = viewer.open_sample(PLUGIN, "microscopy_classes")
    assert [lyr.name for lyr in layers][-1] == "mixed stack"
    assert viewer.layers["mixed stack"].data.shape == (12, 96, 96)
    assert len(viewer.layers["mixed stack"].metadata["true_classes"]) == 12


# -- annotate ------------------------------------------------------------------------------


def _press(viewer, qtbot, key: str):
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key)


def test_annotate_buttons_keys_undo_and_duplicates(make_napari_viewer, qtbot, tmp_path, docked):
    viewer = make_napari_viewer(show=True)
    stack, _ = make_sample_stack(n_pages=4, size=32)
    viewer.add_image(stack, name="stack")
    rgb = viewer.add_image(
        np.random.default_rng(0).integers(0, 255, (20, 24, 3), np.uint8), name="rgb", rgb=True
    )
    two = np.stack([stack[:2], stack[2:]], axis=-1)  # 2 pages, 2 channels
    path = tmp_path / "two.tif"
    tifffile.imwrite(path, np.moveaxis(two, -1, 1), metadata={"axes": "ZCYX"})
    viewer.open(str(path), plugin=PLUGIN)
    root = tmp_path / "new" / "dataset"
    widget = docked(viewer, "Annotate")
    widget.set_dataset(root)

    widget.add_class("bad/name")
    assert not root.exists() and any("bad/name" in m for m in _messages())
    widget.add_class("alive")
    widget.add_class("dead")
    assert widget.counts() == {"alive": 0, "dead": 0}
    assert "1 = alive, 2 = dead" in widget.keys_label.text()

    # keys off (the default): 1 and 2 keep napari's meaning (pan/zoom and transform mode)
    viewer.layers.selection.active = viewer.layers["stack"]
    viewer.dims.set_current_step(0, 3)
    assert not widget.keys_active and "turn on" in widget.keys_label.text()
    _press(viewer, qtbot, "2")
    assert viewer.layers["stack"].mode == "transform"
    assert widget.counts() == {"alive": 0, "dead": 0}
    _press(viewer, qtbot, "1")
    assert viewer.layers["stack"].mode == "pan_zoom"

    # keys on: key 2 on the stack, slice 3 in view
    widget.keys_toggle.setChecked(True)
    assert widget.keys_active and "puts the slice" in widget.keys_label.text()
    _press(viewer, qtbot, "2")
    assert viewer.layers["stack"].mode == "pan_zoom"
    files = list((root / "dead").glob("*.tif"))
    assert [f.name.split("_")[1] for f in files] == ["p0003"]
    np.testing.assert_array_equal(tifffile.imread(files[0]), stack[3])
    from napari_microclf.core.dataset import read_provenance

    assert read_provenance(files[0])["page"] == 3
    # the same slice again: reported, not written twice
    _press(viewer, qtbot, "2")
    assert widget.counts() == {"alive": 0, "dead": 1}
    assert any("already in the dataset" in m for m in _messages())

    # key 1 on the RGB layer
    viewer.layers.selection.active = rgb
    _press(viewer, qtbot, "1")
    (rgb_file,) = (root / "alive").glob("rgb*.tif")
    assert tifffile.imread(rgb_file).shape == (3, 20, 24)

    # off again: napari's shortcuts are back, on layers added while it was on too
    late = viewer.add_image(stack, name="late")
    widget.keys_toggle.setChecked(False)
    viewer.layers.selection.active = late
    _press(viewer, qtbot, "2")
    assert late.mode == "transform" and widget.counts() == {"alive": 1, "dead": 1}

    # a multichannel file: both channel layers saved together, with its source path
    viewer.layers.selection.active = viewer.layers["two [C1]"]
    viewer.dims.set_current_step(0, 1)
    result = widget.add_slice("alive", viewer.layers["two [C1]"])
    saved = tifffile.imread(result.path)
    np.testing.assert_array_equal(np.moveaxis(saved, 0, -1), two[1])
    assert read_provenance(result.path)["source"] == str(path)
    assert widget.counts() == {"alive": 2, "dead": 1}

    # undo moves the newest example to the trash
    widget.undo()
    assert not result.path.exists()
    assert (root / ".trash" / "alive" / result.path.name).exists()
    assert widget.counts() == {"alive": 1, "dead": 1}

    # add all slices of the stack (slice 3 is already in "dead")
    worker = widget.add_all_slices("alive", viewer.layers["stack"])
    with qtbot.waitSignal(worker.finished, timeout=30000):
        pass
    assert widget.counts() == {"alive": 4, "dead": 1}

    # rename, then remove after asking
    widget.rename_class("alive", "living")
    assert widget.counts() == {"dead": 1, "living": 4}
    widget.confirm = lambda text: False
    widget.remove_class("dead")
    assert (root / "dead").is_dir()
    asked = []
    widget.confirm = lambda text: asked.append(text) or True
    widget.remove_class("dead")
    assert not (root / "dead").exists() and (root / ".trash" / "dead").is_dir()
    assert "1 image" in asked[0]


# -- train ---------------------------------------------------------------------------------


def test_train_runs_to_the_end_and_the_gui_stays_responsive(
    make_napari_viewer, qtbot, tiny_dataset, tmp_path, docked
):
    viewer = make_napari_viewer()
    widget = docked(viewer, "Train")
    widget.set_folders(tiny_dataset, tmp_path / "model")
    _tiny(widget)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(50)
    t0 = time.perf_counter()
    worker = widget.start()
    assert widget.state is State.RUNNING and widget.start_btn.text() == "Stop"
    with qtbot.waitSignal(worker.finished, timeout=240000):
        pass
    elapsed = time.perf_counter() - t0
    timer.stop()
    # the event loop served the 50 ms timer throughout the training
    gaps = np.diff([t0, *ticks])
    assert len(ticks) > 0.4 * elapsed / 0.05, (len(ticks), elapsed)
    assert gaps.max() < 2.0, gaps.max()

    result = widget.result
    assert result is not None and not result.stopped
    assert (result.bundle / "model.keras").exists()
    assert widget.state is State.IDLE and widget.start_btn.text() == "Start training"
    _late_update_is_ignored(widget, qtbot, "Done in")
    # napari's bars are the progress: the epochs and the batches, both closed at the end
    assert not hasattr(widget, "epoch_bar") and not hasattr(widget, "batch_bar")
    assert widget.epochs_pbar.n == widget.epochs_pbar.total == 2
    assert widget.batches_pbar.n == widget.batches_pbar.total > 0
    assert widget.epochs_pbar not in progress._all_instances
    log = widget.log.toPlainText()
    assert "Class distribution: {0: " in log and "Class weights" in log
    assert "Split: train" in log  # the dataset's split lines
    assert "Epoch 2/2" in log and "val_accuracy" in log
    loss_axis, acc_axis, lr_axis = widget.curves.figure.axes
    assert [len(line.get_xdata()) for line in loss_axis.lines] == [2, 2]
    assert len(lr_axis.lines) == 1
    assert widget.class_table.rowCount() == 3
    report = widget.report_label.text()
    n, groups = result.report["n"], result.report["groups"]
    assert f"on {n} images from {groups} source" in report  # grouped by source file
    assert "Model: efficientnet-b0, no pretrained weights" in report
    assert widget.confusion.figure.axes and "Diagnosis" in widget.diagnosis.text()
    # offered to Predict
    assert SESSION.last_bundle == str(result.bundle)
    assert docked(viewer, "Predict").bundle() == str(result.bundle)


def test_two_phase_training_marks_fine_tuning(
    make_napari_viewer, qtbot, tiny_dataset, tmp_path, docked
):
    """The default weights ("auto": ImageNet Lite0 here, offline), fine-tuned in two phases:
    the log says when phase 2 starts, the curves mark it, report and Predict name the start."""
    viewer = make_napari_viewer()
    widget = docked(viewer, "Train")
    widget.set_folders(tiny_dataset, tmp_path / "model")
    _tiny(
        widget, weights="auto", fine_tune=1, head_epochs=1, fine_tune_epochs=1, learning_rate=1e-4
    )
    assert widget.form.head_epochs.enabled
    worker = widget.start()
    with qtbot.waitSignal(worker.finished, timeout=240000):
        pass
    result = widget.result
    assert result is not None and result.bundle is not None
    assert result.history["phase"] == [1, 2]
    assert "Phase 2: fine-tuning the top 1 of 7 stages" in widget.log.toPlainText()
    for ax in widget.curves.figure.axes:
        assert [list(line.get_xdata()) for line in ax.lines if line.get_gid() == "fine-tuning"] == [
            [1.5, 1.5]
        ]
    report = widget.report_label.text()
    assert "Model: efficientnet-lite0, ImageNet weights" in report
    assert "top 1 of 7 stages fine-tuned, from epoch 2 after 1 head-only epoch(s)" in report
    from napari_microclf.core.lite0 import LITE0_SHA256

    predict = docked(viewer, "Predict")
    predict.set_bundle(result.bundle)
    assert f"Model: efficientnet-lite0 · imagenet {LITE0_SHA256[:12]}" in predict.model_info.text()


def test_stop_stops_and_writes_nothing(make_napari_viewer, qtbot, tiny_dataset, tmp_path, docked):
    viewer = make_napari_viewer()
    widget = docked(viewer, "Train")
    widget.set_folders(tiny_dataset, tmp_path / "model")
    _tiny(widget, epochs=6)  # 12 steps: eager, no trace
    worker = widget.start()

    def stop_on_first_batch(update):
        if isinstance(update, BatchEnd) and widget.state is State.RUNNING:
            qtbot.mouseClick(widget.start_btn, Qt.LeftButton)

    worker.yielded.connect(stop_on_first_batch)
    with qtbot.waitSignal(worker.finished, timeout=240000):
        pass
    assert widget.result.stopped and widget.result.epochs_run < 6
    assert not (tmp_path / "model").exists()
    assert widget.state is State.IDLE and "no model was written" in widget.status.text()
    _late_update_is_ignored(widget, qtbot, "Stopped after")


@pytest.mark.parametrize("bar", ["epochs", "batches"])
def test_cancel_in_the_activity_dock_stops_training_as_stop_does(
    make_napari_viewer, qtbot, tiny_dataset, trained_bundle, tmp_path, bar, docked
):
    """napari's bars show in the activity dock, cancelable there: Cancel is the Stop button
    (cooperative stop), and a stopped training leaves the last good model as it was."""
    import shutil

    from napari.utils.progress import cancelable_progress

    viewer = make_napari_viewer()
    out = tmp_path / "model"
    shutil.copytree(trained_bundle, out)
    before = (out / "model.keras").read_bytes()
    widget = docked(viewer, "Train")
    widget.set_folders(tiny_dataset, out)
    _tiny(widget, epochs=6)  # 12 steps: eager, no trace
    worker = widget.start()
    assert isinstance(widget.epochs_pbar, cancelable_progress)
    assert widget.epochs_pbar in progress._all_instances  # what the activity dock shows

    def cancel_on_first_batch(update):
        if isinstance(update, BatchEnd) and widget.state is State.RUNNING:
            assert widget.batches_pbar in progress._all_instances
            getattr(widget, f"{bar}_pbar").cancel()  # the dock's Cancel button calls this
            assert widget.state is State.STOPPING

    worker.yielded.connect(cancel_on_first_batch)
    with qtbot.waitSignal(worker.finished, timeout=240000):
        pass
    assert widget.result.stopped and widget.result.epochs_run < 6
    assert (out / "model.keras").read_bytes() == before  # the last good model stays
    assert widget.state is State.IDLE and "no model was written" in widget.status.text()
    _late_update_is_ignored(widget, qtbot, "Stopped after")
    assert widget.start_btn.text() == "Start training" and widget.start_btn.isEnabled()


@pytest.mark.parametrize("problem", ["no dataset", "one class", "empty class", "unwritable"])
def test_bad_setups_are_notifications(make_napari_viewer, tmp_path, problem, docked):
    data = tmp_path / "ds"
    out = tmp_path / "model"
    if problem != "no dataset":
        make_sample_dataset(data, n_per_class=3, size=16)
    if problem == "one class":
        import shutil

        for name in ("elongated", "fragmented"):
            shutil.rmtree(data / name)
    if problem == "empty class":
        (data / "empty").mkdir()
    if problem == "unwritable":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "model"
    widget = docked(make_napari_viewer(), "Train")
    widget.set_folders(data, out)
    notification_manager.records.clear()
    assert widget.start() is None
    assert widget.state is State.IDLE and widget.worker is None
    errors = _messages("error")
    assert len(errors) == 1 and errors[0].startswith("Cannot train")
    expected = {
        "no dataset": "does not exist",
        "one class": "at least 2 classes",
        "empty class": "no images",
        "unwritable": "a-file",
    }[problem]
    assert expected in errors[0]


def test_form_builds_the_config_with_backbone_weights_phases_intensity_and_groups(
    make_napari_viewer,
    docked,
):
    from napari_microclf.core.train_config import help_of

    widget = docked(make_napari_viewer(), "Train")
    f = widget.form
    config = widget.config()
    assert (config.backbone, config.weights, config.group_by) == ("efficientnet-b0", "auto", None)
    assert (config.intensity, config.intensity_range) == ("auto", None)
    assert (config.class_weights, f.class_weights.value) == ("sqrt", "sqrt")
    # tips come from the settings' one description
    assert f.head_epochs.tooltip.lower().startswith(help_of("head_epochs")[:30].lower())
    assert f.augment.tooltip.lower().startswith(help_of("augment")[:30].lower())
    # the note says what "auto" starts from here (tests are offline, no B0 file cached)
    assert widget.note.text().startswith("Pretrained start: ImageNet EfficientNet-")
    # the phase-2 settings only matter when a pretrained base is fine-tuned
    assert not f.head_epochs.enabled and not f.fine_tune_lr_factor.enabled
    f.fine_tune.value = 2
    assert f.head_epochs.enabled and f.fine_tune_lr_factor.enabled
    f.weights.value = "none"
    assert not f.head_epochs.enabled and "No pretrained start" in widget.note.text()

    f.backbone.value = "efficientnet-lite0"
    f.weights.value = "auto"
    assert "Lite0" in widget.note.text()
    f.head_epochs.value = 3
    f.fine_tune_lr_factor.value = 0.2
    f.intensity.value = "fixed"
    assert f.intensity_range.native.isHidden()  # an advanced setting: hidden until asked
    f.advanced.value = True
    assert not f.intensity_range.native.isHidden()  # the range field appears
    f.intensity_range.value = "0,4095"
    f.group_by.value = r"^(plate\d+_well\w+)"
    config = widget.config()
    assert (config.backbone, config.weights, config.fine_tune) == ("efficientnet-lite0", "auto", 2)
    assert (config.head_epochs, config.fine_tune_lr_factor) == (3, 0.2)
    assert (config.intensity, config.intensity_range) == ("fixed", (0.0, 4095.0))
    assert config.group_by == r"^(plate\d+_well\w+)"
    f.intensity_range.value = ""  # fixed without a range: the image type's range
    assert widget.config().intensity_range is None


def test_invalid_group_by_is_refused_at_start(make_napari_viewer, tiny_dataset, tmp_path, docked):
    widget = docked(make_napari_viewer(), "Train")
    widget.set_folders(tiny_dataset, tmp_path / "model")
    _tiny(widget)
    widget.form.group_by.value = "plate(\\d+"
    notification_manager.records.clear()
    assert widget.start() is None
    assert widget.state is State.IDLE and widget.worker is None
    (error,) = _messages("error")
    assert error.startswith("Cannot train") and "not a valid regular expression" in error
    assert "plate(" in widget.status.text()


@pytest.mark.parametrize(
    ("n_per_class", "row", "batch_size"),
    [(20, "very small dataset", 8), (200, "medium dataset", 32), (340, "large dataset", 64)],
)
def test_suggest_settings_from_the_dataset_size(
    make_napari_viewer, qtbot, tmp_path, n_per_class, row, batch_size, docked
):
    data = make_sample_dataset(tmp_path / "ds", n_per_class=n_per_class, size=16)
    widget = docked(make_napari_viewer(), "Train")
    widget.set_folders(data, tmp_path / "model")
    widget.form.batch_size.value = 5
    assert widget.suggest() is not None
    assert not widget.suggest_btn.isEnabled()
    # a fast count can end before a waitSignal would connect: wait for the widget's state
    qtbot.waitUntil(lambda: widget._counting is None, timeout=60000)
    n = 3 * n_per_class
    assert widget.form.batch_size.value == batch_size
    assert widget.config().batch_size == batch_size  # applied to the form, still editable
    said = f"Suggested settings for a {row} ({n} images"
    assert widget.status.text().startswith(said)
    assert f"batch size {batch_size}," in widget.status.text()
    assert said in widget.log.toPlainText()
    assert widget.suggest_btn.isEnabled()
    if row == "large dataset":  # the fine-tuning recipe, within its time budget
        config = widget.config()
        assert (config.fine_tune, config.time_budget, config.fine_tune_epochs) == (2, "30m", 30)
        assert "time budget (e.g. 30m) 30m" in widget.status.text()
        assert widget.form.time_budget.enabled
    widget.form.batch_size.value = 12
    assert widget.config().batch_size == 12


def test_suggest_settings_without_a_dataset_says_why(make_napari_viewer, qtbot, tmp_path, docked):
    widget = docked(make_napari_viewer(), "Train")
    widget.set_folders(tmp_path / "missing", tmp_path / "model")
    notification_manager.records.clear()
    assert widget.suggest() is not None
    qtbot.waitUntil(lambda: widget._counting is None, timeout=60000)
    (error,) = _messages("error")
    assert error.startswith("Cannot suggest settings") and "does not exist" in error


def test_curves_mark_where_fine_tuning_starts():
    from napari_microclf._qt._plots import CurvesCanvas

    canvas = CurvesCanvas()
    history = {
        "loss": [1.0, 0.8, 0.6, 0.5],
        "val_loss": [1.1, 0.9, 0.7, 0.6],
        "accuracy": [0.4, 0.6, 0.7, 0.8],
        "val_accuracy": [0.3, 0.5, 0.6, 0.7],
        "lr": [1e-4, 1e-4, 1e-5, 1e-5],
        "phase": [1, 1, 2, 2],
    }
    canvas.plot(history)
    for ax in canvas.figure.axes:  # all three panels, between epochs 2 and 3
        (marker,) = [line for line in ax.lines if line.get_gid() == "fine-tuning"]
        assert list(marker.get_xdata()) == [2.5, 2.5] and marker.get_linestyle() == "--"
        assert any(t.get_text().strip() == "fine-tuning" for t in ax.texts)
    canvas.plot({**history, "phase": [1, 1, 1, 1]})  # one phase: no marker
    assert not any(
        line.get_gid() == "fine-tuning" for ax in canvas.figure.axes for line in ax.lines
    )


# -- predict --------------------------------------------------------------------------------


def test_predict_labels_follow_the_slider_and_csv_matches(
    make_napari_viewer, qtbot, trained_bundle, tmp_path, docked
):
    viewer = make_napari_viewer()
    stack, _ = make_sample_stack(n_pages=6, size=40)
    image = viewer.add_image(stack, name="stack", scale=(1, 0.5, 0.5), units=("pixel", "µm", "µm"))
    viewer.add_image(stack[0], name="single")
    widget = docked(viewer, "Predict")
    widget.set_bundle(trained_bundle)
    widget.threshold.setValue(0.0)
    widget.choose(["stack", "single"])
    loads = cache_info().misses
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    assert cache_info().misses - loads <= 1  # one model load for both layers

    points = viewer.layers["stack classes"]
    assert len(points.data) == 6 and list(points.features["page"]) == list(range(6))
    np.testing.assert_array_equal(points.scale, image.scale)
    assert points.units == image.units  # labels in the image's physical units
    pages = image.metadata["microclf"]["predictions"]["pages"]
    assert [p["page"] for p in pages] == list(range(6))
    assert list(points.features["class"]) == [p["class"] for p in pages]
    assert len(viewer.layers["single classes"].data) == 1

    viewer.layers.selection.active = image
    for page in (4, 1):
        viewer.dims.set_current_step(0, page)
        drawn = list(points._view_text)  # napari draws only this page's label
        assert len(drawn) == 1 and drawn[0].startswith(pages[page]["class"])
        assert widget.in_view.text().startswith(
            f"In view: stack, page {page}: {pages[page]['class']}"
        )

    # results table and CSV agree
    assert widget.table.rowCount() == 7
    out = widget.export_csv(tmp_path / "layers.csv")
    with open(out) as f:
        rows = list(csv.DictReader(f))
    table = [[widget.table.item(r, c).text() for c in range(4)] for r in range(7)]
    assert [[r["file"], r["page"], r["class"]] for r in rows] == [t[:3] for t in table]
    assert [float(r["confidence"]) for r in rows] == pytest.approx(
        [float(t[3]) for t in table], abs=1e-3
    )

    # the threshold turns low confidences into "uncertain" on canvas and in the table
    widget.threshold.setValue(1.0)
    assert set(points.features["label"]) == {"uncertain"}
    assert {widget.table.item(r, 2).text() for r in range(7)} == {"uncertain"}

    # a second run reuses the loaded model
    loads = cache_info().misses
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    assert cache_info().misses == loads
    assert len(viewer.layers["stack classes"].data) == 6  # updated, not duplicated


def test_predict_names_the_model_also_for_older_bundles(
    make_napari_viewer, trained_bundle, tmp_path, docked
):
    import json
    import shutil

    from napari_microclf.core.bundle import zip_bundle

    widget = docked(make_napari_viewer(), "Predict")
    widget.set_bundle(trained_bundle)
    assert "Model: efficientnet-b0 · random start" in widget.model_info.text()
    assert widget.export_row.button.isEnabled()  # the model row can share it
    zipped = zip_bundle(trained_bundle, tmp_path / "shared.zip")
    widget.set_bundle(zipped)  # a zipped model opens as its folder does
    assert "Model: efficientnet-b0 · random start" in widget.model_info.text()
    assert widget.export_row.model_folder == zipped
    widget.set_bundle(tmp_path / "nothing-here")
    assert not widget.export_row.button.isEnabled()
    old = tmp_path / "old"
    shutil.copytree(trained_bundle, old)
    meta = json.loads((old / "microclf.json").read_text())
    for key in ("backbone", "weights_id", "phases"):  # written since backbones exist
        del meta[key]
    meta["weights"] = "imagenet"
    (old / "microclf.json").write_text(json.dumps(meta))
    widget.set_bundle(old)
    assert "Model: efficientnet-b0 · imagenet" in widget.model_info.text()
    assert "not recorded (older model)" in widget.model_info.toolTip()


def test_classify_folder_writes_csv(make_napari_viewer, qtbot, trained_bundle, tmp_path, docked):
    folder = tmp_path / "images"
    folder.mkdir()
    stack, _ = make_sample_stack(n_pages=3, size=32)
    tifffile.imwrite(folder / "a.tif", stack, metadata={"axes": "ZYX"})
    tifffile.imwrite(folder / "b.tif", stack[0])
    widget = docked(make_napari_viewer(), "Predict")
    widget.set_bundle(trained_bundle)
    worker = widget.classify_folder(folder, tmp_path / "out.csv")
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"].rsplit("/", 1)[-1], r["page"]) for r in rows] == [
        ("a.tif", "0"),
        ("a.tif", "1"),
        ("a.tif", "2"),
        ("b.tif", "0"),
    ]
    assert widget.pbar.n == widget.pbar.total == 4  # napari's bar, closed
    assert not hasattr(widget, "bar")
    assert widget.folder_btn.text() == widget.FOLDER


def test_run_and_classify_folder_stop_keep_what_was_done(
    make_napari_viewer, qtbot, trained_bundle, tmp_path, docked
):
    """Run and Classify folder turn into Stop while they run; Stop (or Cancel in the
    activity dock) ends them at the next batch, keeps what was done and frees the UI."""
    viewer = make_napari_viewer()
    stack, _ = make_sample_stack(n_pages=3, size=32)
    big = np.concatenate([stack] * 30)  # 90 pages: 3 batches of 32
    viewer.add_image(big, name="big")
    widget = docked(viewer, "Predict")
    widget.set_bundle(trained_bundle)
    widget.choose(["big"])
    worker = widget.run()
    assert widget.run_btn.text() == "Stop" and widget.run_btn.isEnabled()
    assert not widget.folder_btn.isEnabled() and not widget.explain_btn.isEnabled()
    assert widget.pbar in progress._all_instances

    def stop_on_first(item):
        if item[0] == "big" and not widget._stop.is_set():
            widget.run_btn.click()

    worker.yielded.connect(stop_on_first)
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    done = len(widget.results["big"])
    assert 0 < done < 90
    assert len(viewer.layers["big classes"].data) == done  # the pages done are on the layer
    assert widget.status.text().startswith(f"Stopped: classified {done} of 90 page(s)")
    assert widget.run_btn.text() == "Run" and widget.run_btn.isEnabled()
    assert widget.folder_btn.isEnabled() and widget.explain_btn.isEnabled()

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"s{i}.tif", big, metadata={"axes": "ZYX"})
    worker = widget.classify_folder(folder, tmp_path / "out.csv")
    assert widget.folder_btn.text() == "Stop"

    def cancel_on_first(item):
        if item[0] == "done" and not widget._stop.is_set():
            widget.pbar.cancel()  # Cancel in the activity dock

    worker.yielded.connect(cancel_on_first)
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    partial = tmp_path / "out.csv.partial"
    assert not (tmp_path / "out.csv").exists() and partial.exists()
    with open(partial) as f:
        rows = list(csv.DictReader(f))
    assert 0 < len(rows) < 270
    text = widget.status.text()
    assert text.startswith(f"Stopped: {len(rows)} page(s) classified") and str(partial) in text
    assert widget.folder_btn.text() == widget.FOLDER and widget.worker is None


def test_feature_cache_settings_reach_the_config(make_napari_viewer, docked):
    widget = docked(make_napari_viewer(), "Train")
    assert widget.config().cache is True and widget.config().views == 4  # the defaults
    widget.form.cache.value = False
    widget.form.views.value = 2
    config = widget.config()
    assert (config.cache, config.views) == (False, 2)


# -- theme and remembered settings -------------------------------------------------------


def _rgb(colour):
    from matplotlib.colors import to_hex

    return to_hex(colour)


def test_plots_follow_napari_theme(make_napari_viewer, docked):
    from napari.utils.theme import get_theme

    from napari_microclf._qt.stackplot import StackPlot

    viewer = make_napari_viewer()
    train = docked(viewer, "Train")
    predict = docked(viewer, "Predict")
    plot = predict.show_plot()
    assert isinstance(plot, StackPlot)
    train.confusion.plot([[3, 1], [0, 4]], ["a", "b"])
    canvases = (train.curves, train.confusion, plot.canvas)
    for theme in ("light", "dark", "light"):
        viewer.theme = theme
        t = get_theme(theme)
        bg, text = t.background.as_hex(), t.text.as_hex()
        for canvas in canvases:
            fig = canvas.figure
            assert _rgb(fig.get_facecolor()) == bg, (theme, canvas)
            ax = fig.axes[0]
            assert _rgb(ax.get_facecolor()) == bg
            assert _rgb(ax.title.get_color()) == text
            assert _rgb(ax.xaxis.get_major_ticks()[0].label1.get_color()) == text
    # the confusion matrix drawn again keeps its data
    assert train.confusion.class_names == ["a", "b"] and train.confusion.figure.axes


def test_widgets_remember_folders_and_settings(make_napari_viewer, tmp_path):
    from napari_microclf._qt import _settings

    assert str(_settings.path()).startswith(str(tmp_path))  # never the user's config
    viewer = make_napari_viewer()
    AnnotateWidget(viewer, tmp_path / "annotated")  # Train follows it until told otherwise
    train = TrainWidget(viewer)
    assert train.data_edit.text() == str((tmp_path / "annotated").resolve())
    train.set_folders(tmp_path / "ds", tmp_path / "model")
    train.form.epochs.value = 7
    train.form.batch_size.value = 4
    train.form.learning_rate.value = 0.002
    train.form.backbone.value = train.form.backbone.choices[1]
    train.form.fine_tune.value = "all"
    predict = PredictWidget(viewer)
    predict.bundle_edit.setText(str(tmp_path / "model"))
    predict.threshold.setValue(0.7)
    predict.tta.setChecked(True)

    SESSION.last_bundle = SESSION.dataset = None  # a new napari session
    again = TrainWidget(viewer)
    assert again.data_edit.text() == str(tmp_path / "ds")
    assert again.out_edit.text() == str(tmp_path / "model")
    f = again.form
    assert (f.epochs.value, f.batch_size.value, f.fine_tune.value) == (7, 4, "all")
    assert f.learning_rate.value == pytest.approx(0.002)
    assert f.backbone.value == train.form.backbone.value
    p = PredictWidget(viewer)
    assert p.bundle() == str(tmp_path / "model")
    assert p.threshold.value() == pytest.approx(0.7) and p.tta.isChecked()
    SESSION.dataset = None
    assert AnnotateWidget(viewer).root == (tmp_path / "annotated").resolve()
    # folders given to a widget (or a model Train just wrote) come first
    SESSION.last_bundle = str(tmp_path / "new")
    assert PredictWidget(viewer).bundle() == str(tmp_path / "new")
    assert TrainWidget(viewer, tmp_path / "x").data_edit.text() == str(tmp_path / "x")


# -- as docked: a proxy of the viewer ------------------------------------------------------


def test_labels_follow_their_image_as_docked_also_in_grid_mode(
    make_napari_viewer, qtbot, trained_bundle, docked
):
    """napari hands a docked widget a proxy of the viewer (a new proxy of a layer at each
    access): the labels still hide, rename and go with their image, and in grid mode (where
    napari gives every layer its own cell) they hide instead of sitting in empty cells."""
    viewer = make_napari_viewer()
    stack, _ = make_sample_stack(n_pages=3, size=32)
    viewer.add_image(stack, name="stack")
    viewer.add_image(stack[0], name="single", translate=(0, 40))
    widget = docked(viewer, "Predict")
    widget.set_bundle(trained_bundle)
    widget.choose(["stack", "single"])
    worker = widget.run()
    with qtbot.waitSignal(worker.finished, timeout=120000):
        pass
    labels = viewer.layers["stack classes"]
    assert labels.visible and set(widget.labels.boxes()) == {"stack", "single"}
    viewer.layers["stack"].visible = False
    assert not labels.visible and set(widget.labels.boxes()) == {"single"}  # not stacked up
    viewer.layers["stack"].visible = True
    assert labels.visible
    viewer.layers["stack"].name = "cells"
    assert "cells classes" in viewer.layers and "stack classes" not in viewer.layers
    assert set(widget.results) == {"cells", "single"}
    assert viewer.layers["cells classes"].text.string.format.endswith("· cells")

    viewer.layers["single"].visible = False
    viewer.canvas.grid.enabled = True
    assert not viewer.layers["cells classes"].visible  # no cell of their own
    assert not viewer.layers["single classes"].visible
    viewer.canvas.grid.enabled = False
    assert viewer.layers["cells classes"].visible  # back with its image
    assert not viewer.layers["single classes"].visible  # its image is still hidden

    viewer.layers.remove("cells")
    assert "cells classes" not in viewer.layers and set(widget.results) == {"single"}


def test_a_confusion_cell_opens_review_in_the_tabs_and_texts_never_overlap(
    make_napari_viewer, qtbot, scratch, docked, tmp_path
):
    """In the tabbed dock a cell of Train's report opens in the Review tab (napari hands
    the dock a proxy, which Qt refuses); Review writes above its image, Label next under
    its own, each hidden with its image and in grid mode."""
    import json

    viewer = make_napari_viewer()
    tabs = docked(viewer, "All")
    report = json.loads((scratch.bundle / "report.json").read_text())
    names, cm = report["class_names"], report["confusion_matrix"]
    tabs.train.show_report(report, scratch.bundle)
    true, predicted = next(
        (t, p) for i, t in enumerate(names) for j, p in enumerate(names) if cm[i][j]
    )
    worker = tabs.train.review_cell(true, predicted)
    with qtbot.waitSignal(worker.finished, timeout=60000):
        pass
    assert tabs.currentWidget() is tabs.review
    review = viewer.layers[tabs.review.layer_name(true, predicted)]
    review_text = viewer.layers[tabs.review.points_name(review.name)]

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, page in enumerate(make_sample_stack(n_pages=3, size=40)[0]):
        tifffile.imwrite(folder / f"u{i}.tif", page)
    tabs.label_next.bundle_edit.setText(str(scratch.bundle))
    worker = tabs.label_next.find(folder=str(folder))
    with qtbot.waitSignal(worker.finished, timeout=60000):
        pass
    guesses = viewer.layers["Label next guesses"]
    # Review's texts hang above the top edge (y < 0), Label next's at the bottom edge
    assert review_text.text.anchor == "upper_left" and (review_text.data[:, -2] < 0).all()
    bottom = viewer.layers["Label next"].data.shape[1] - 0.5
    assert guesses.text.anchor == "lower_left" and (guesses.data[:, -2] >= bottom).all()

    review.visible = False
    assert not review_text.visible and guesses.visible
    review.visible = True
    viewer.canvas.grid.enabled = True
    assert not review_text.visible and not guesses.visible
    viewer.canvas.grid.enabled = False
    assert review_text.visible and guesses.visible


# -- Train: the event loop and the report's rough edges ------------------------------------


def test_training_never_stalls_the_event_loop(make_napari_viewer, qtbot, tmp_path, docked):
    """A fast training (a frozen base, its features cached: many epochs and batches a
    second) in a shown window: a 20 ms timer is never late by 250 ms. The panel coalesces
    updates (status, bars and log at most every UPDATE_MS, the curves every CURVES_S);
    before, every update redrew (up to 0.8 s late here, 4 s on a busy machine)."""
    data = make_sample_dataset(tmp_path / "ds", n_per_class=8, size=32)
    viewer = make_napari_viewer(show=True)
    widget = docked(viewer, "Train")
    widget.set_folders(data, tmp_path / "model")
    _tiny(widget, weights="auto", fine_tune=0, epochs=25, batch_size=2, views=1)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    t0 = time.perf_counter()
    worker = widget.start()
    with qtbot.waitSignal(worker.finished, timeout=240000):
        pass
    timer.stop()
    gaps = np.diff([t0, *ticks])
    assert widget.result is not None and widget.result.epochs_run == 25
    # 0.25 s is the aim; one late tick is the 2-core machine's, not the widget's (before the
    # coalescing: a hundred late ticks and 0.8 s at most, here)
    assert (gaps > 0.25).sum() <= 1 and gaps.max() < 0.5, np.sort(gaps)[-5:]
    # what was coalesced is all there at the end
    assert "Epoch 25/25" in widget.log.toPlainText()
    assert [len(line.get_xdata()) for line in widget.curves.figure.axes[0].lines] == [25, 25]
    assert widget.epochs_pbar.n == 25


def test_train_report_and_settings_rough_edges(make_napari_viewer, docked):
    """The Log wraps; a class without test images reads n/a; a report on a handful of test
    images says how few; the matrix follows the dark theme; the usual settings come first,
    the others under Advanced; the backbone field names the backbone that will be used."""
    from matplotlib.colors import to_hex
    from napari.utils.theme import get_theme
    from qtpy.QtWidgets import QPlainTextEdit

    from napari_microclf._qt.train_form import FORM, USUAL

    viewer = make_napari_viewer()
    viewer.theme = "dark"
    widget = docked(viewer, "Train")
    assert widget.log.lineWrapMode() == QPlainTextEdit.WidgetWidth

    row = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    report = {
        "class_names": ["a", "b", "c"],
        "n": 4,
        "accuracy": 0.75,
        "confusion_matrix": [[2, 0, 0], [1, 1, 0], [0, 0, 0]],
        "per_class": [
            {**row, "class": "a", "precision": 0.67, "recall": 1.0, "f1": 0.8, "support": 2},
            {**row, "class": "b", "precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2},
            {**row, "class": "c", "support": 0},
        ],
    }
    widget.show_report(report)
    cells = [[widget.class_table.item(r, c).text() for c in range(5)] for r in range(3)]
    assert cells[0][1:4] == ["0.67", "1.00", "0.80"]
    assert cells[2] == ["c", "n/a", "n/a", "n/a", "0"]
    assert "Only 4 test images" in widget.report_label.text()
    widget.show_report({**report, "n": 300})
    assert "Only" not in widget.report_label.text()

    bg = get_theme("dark").background.as_hex()
    image = widget.confusion._ax.images[0]
    assert to_hex(image.cmap(image.norm(0))) == bg  # an empty cell: dark, not white
    texts = {t.get_text(): t.get_color() for t in widget.confusion._ax.texts}
    assert texts["0"] == "white"

    f = widget.form
    names = [w.name for w in f]
    usual = [r.field for r in FORM if r.field in USUAL]
    assert [n for n in names[: names.index("advanced")] if n in USUAL] == usual
    assert set(names[: names.index("advanced")]) == {*USUAL, "weights_file"}
    assert f.epochs.native.isVisibleTo(f.native) and not f.dropout.native.isVisibleTo(f.native)
    f.advanced.value = True
    assert f.dropout.native.isVisibleTo(f.native)

    # offline, no B0 weights in the Keras cache: "auto" trains Lite0, and the field says so
    f.backbone.value, f.weights.value = "efficientnet-b0", "auto"
    assert "uses EfficientNet-Lite0" in f.backbone.current_choice
    assert widget.config().backbone == "efficientnet-b0"  # the value itself is unchanged
    f.weights.value = "none"
    assert f.backbone.current_choice == "EfficientNet-B0"


def test_predict_refuses_a_csv_path_that_is_an_input(
    make_napari_viewer, qtbot, trained_bundle, tmp_path, docked
):
    """Classify folder never writes its CSV over one of the images it classifies, nor into
    the model folder: refused before any work, as a notification; the image is intact."""
    folder = tmp_path / "images"
    folder.mkdir()
    stack, _ = make_sample_stack(n_pages=2, size=32)
    tifffile.imwrite(folder / "a.tif", stack, metadata={"axes": "ZYX"})
    before = (folder / "a.tif").read_bytes()
    widget = docked(make_napari_viewer(), "Predict")
    widget.set_bundle(trained_bundle)
    notification_manager.records.clear()
    assert widget.classify_folder(folder, folder / "a.tif") is None
    assert widget.worker is None
    (error,) = _messages("error")
    assert "a.tif is one of the inputs" in error
    assert (folder / "a.tif").read_bytes() == before
    notification_manager.records.clear()
    assert widget.classify_folder(folder, trained_bundle / "out.csv") is None
    (error,) = _messages("error")
    assert "is inside" in error and not (trained_bundle / "out.csv").exists()
    header = widget.table.horizontalHeaderItem(4)  # the unfamiliar score says what it means
    assert ">1" in header.text() and "above 1" in header.toolTip()
