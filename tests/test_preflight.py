"""Every problem a user can fix is said before any TensorFlow work, named, with what to do.

Each bad input gives its message from the preflight; a monkeypatched ``build_classifier``
(and feature extraction) fails the test if a training got as far as building a model.
"""

import errno
import random
import time
import warnings

import numpy as np
import pytest
import tifffile

import napari_microclf.core.train as train_module
from napari_microclf.cli import main as cli_main
from napari_microclf.core import preflight as pf
from napari_microclf.core.errors import (
    DatasetError,
    LockedError,
    MicroclfError,
    OutputError,
    one_line,
)
from napari_microclf.core.images import (
    MIN_LONG_SIDE,
    MIN_SIDE,
    PreprocessSpec,
    count_pages,
    library_log,
    preprocess,
    read_header,
    read_page,
)
from napari_microclf.core.sample import make_sample_dataset
from napari_microclf.core.train import TrainConfig, train


@pytest.fixture
def no_model(monkeypatch):
    """Fail if a training builds a model or computes features."""
    built = []

    def refuse(*args, **kwargs):
        built.append(args)
        raise AssertionError("a model was built although the input is bad")

    monkeypatch.setattr(train_module, "build_classifier", refuse)
    monkeypatch.setattr(train_module, "extract_features", refuse)
    return built


@pytest.fixture
def data(tmp_path):
    return make_sample_dataset(tmp_path / "ds", n_per_class=6, size=32)


def _config(data, out, **kw):
    return TrainConfig(
        str(data),
        str(out),
        **{"epochs": 1, "image_size": 32, "weights": None, "fine_tune": "all", **kw},
    )


def _write_bad(folder, kind):
    """One bad file of ``kind`` in ``folder``; returns its path."""
    if kind == "corrupt":
        path = folder / "corrupt.tif"
        path.write_bytes(b"II*\x00" + np.random.default_rng(3).bytes(200))
    elif kind == "not an image":
        path = folder / "notes.png"
        path.write_text("these are my notes, not an image\n" * 20)
    elif kind == "empty":
        path = folder / "empty.jpg"
        path.write_bytes(b"")
    elif kind == "truncated":
        path = folder / "cut.tif"
        tifffile.imwrite(
            path,
            np.random.default_rng(0).integers(0, 255, (3, 64, 64), np.uint8),
            photometric="minisblack",
        )
        path.write_bytes(path.read_bytes()[:4000])
    elif kind == "1x1":
        path = folder / "dot.tif"
        tifffile.imwrite(path, np.zeros((1, 1), np.uint16))
    elif kind == "1x20000":
        path = folder / "profile.tif"
        tifffile.imwrite(path, np.zeros((1, 20000), np.uint16))
    elif kind == "4x4":
        path = folder / "tiny.png"
        import imageio.v3 as iio

        iio.imwrite(path, np.zeros((4, 4), np.uint8))
    else:
        raise ValueError(kind)
    return path


BAD = {
    "corrupt": "cannot read this image (invalid offset to first page",
    "not an image": "no image reader recognises its contents",
    "empty": "empty file (0 bytes)",
    "truncated": "truncated (its pixel data should end at byte",
    "1x1": f"too small: 1 x 1 pixels (height x width); each side needs at least {MIN_SIDE}",
    "1x20000": "too small: 1 x 20000 pixels",
    "4x4": f"the longer one at least {MIN_LONG_SIDE}",
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_each_bad_image_is_named_in_one_line_before_a_model_is_built(
    data, tmp_path, kind, no_model
):
    cls = sorted(p.name for p in data.iterdir() if p.is_dir())[1]
    path = _write_bad(data / cls, kind)
    with pytest.raises(DatasetError) as info:
        train(_config(data, tmp_path / "model"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{cls}/{path.name}: ") and BAD[kind] in message
    assert message.endswith(f"move them out of the dataset folder {data}, then train again")
    assert not no_model and not (tmp_path / "model").exists()


def test_all_bad_images_are_listed_at_once_the_rest_counted(data, tmp_path, no_model):
    cls = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    for kind in BAD:
        _write_bad(data / cls, kind)
    for i in range(6):  # more than MAX_LISTED in all
        tifffile.imwrite(data / cls / f"dot{i}.tif", np.zeros((1, 1), np.uint8))
    updates = []
    with pytest.raises(DatasetError) as info:
        train(_config(data, tmp_path / "model"), updates.append)
    head, *lines = str(info.value).splitlines()
    n_bad = len(BAD) + 6
    assert head.startswith(f"{n_bad} of the {18 + n_bad} image files cannot be used")
    assert len(lines) == pf.MAX_LISTED + 1 and lines[-1] == f"  ... and {n_bad - 10} more"
    assert all(line.startswith(f"  {cls}/") for line in lines[:-1])
    assert not no_model and not updates  # nothing said or done before the refusal


def test_bool_and_elongated_images_train_with_a_warning_naming_the_elongated(data, tmp_path):
    cls = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    mask = np.zeros((32, 32), bool)
    mask[8:20, 10:24] = True
    tifffile.imwrite(data / cls / "mask.tif", mask)
    assert read_page(data / cls / "mask.tif").dtype == bool
    out = preprocess(read_page(data / cls / "mask.tif"), PreprocessSpec(32))
    assert out.max() == 255 and out.min() == 0  # a mask reads as 0/1: no boolean subtract
    tifffile.imwrite(
        data / cls / "scan.tif", np.random.default_rng(1).integers(0, 4000, (2, 20000), np.uint16)
    )
    scan = pf.scan_images(data)
    assert not scan.problems and scan.files == 20
    (warning,) = scan.warnings
    assert (
        warning.startswith(
            f"{cls}/scan.tif: 2 x 20000 pixels (height x width, aspect ratio 10000:1)"
        )
        and "crop or tile" in warning
    )


def test_out_is_a_file_or_cannot_be_created(data, tmp_path, no_model):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("my notes")
    with pytest.raises(OutputError, match="is a file") as info:
        train(_config(data, a_file))
    assert "\n" not in str(info.value) and str(a_file) in str(info.value)
    with pytest.raises(OutputError) as info:
        pf.check_out_dir(a_file / "model")
    assert str(info.value) == (
        f"cannot create model folder {a_file / 'model'}: {a_file} is a file; choose another folder"
    )
    assert a_file.read_text() == "my notes" and not no_model


def _denied(*paths):
    """A ``_probe`` that finds ``paths`` unwritable (tests run as root, where chmod does not
    stop writing)."""
    real = pf._probe
    denied = {str(p) for p in paths}

    def probe(folder):
        if str(folder) in denied:
            return PermissionError(errno.EACCES, "Permission denied", str(folder))
        return real(folder)

    return probe


def test_out_not_writable(data, tmp_path, monkeypatch, no_model):
    monkeypatch.setattr(pf, "_probe", _denied(tmp_path / "locked"))
    (tmp_path / "locked").mkdir()
    with pytest.raises(OutputError) as info:
        pf.check_out_dir(tmp_path / "locked" / "model")
    assert str(info.value) == (
        f"cannot create model folder {tmp_path / 'locked' / 'model'}: "
        f"permission denied in {tmp_path / 'locked'}; choose a writable "
        "folder"
    )
    with pytest.raises(
        OutputError,
        match="cannot write into model folder .*: permission denied; choose a writable folder",
    ):
        train(_config(data, tmp_path / "locked"))
    assert not no_model


def test_read_only_dataset_says_how_to_proceed(data, tmp_path, monkeypatch, no_model):
    monkeypatch.setattr(pf, "_probe", _denied(data))
    with pytest.raises(OutputError) as info:
        train(_config(data, tmp_path / "model"))
    message = str(info.value)
    assert message == (
        f"dataset {data} cannot be written (permission denied) and has no "
        "split.json yet, where microclf keeps the train/validation/test split: "
        "make it writable, or copy the dataset to a writable folder and train "
        "on the copy"
    )
    # with a current split.json a read-only dataset is used as it is
    from napari_microclf.core.dataset import update_split

    update_split(data)
    note = pf.check_dataset_writable(data)
    assert note.startswith(
        f"Dataset {data} is read-only (permission denied); its split.json is current"
    )
    with pytest.raises(OutputError, match="a new split writes"):
        pf.check_dataset_writable(data, resplit=True)
    cls = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    tifffile.imwrite(data / cls / "new.tif", np.ones((32, 32), np.uint8))
    with pytest.raises(OutputError, match=f"misses 1 new file\\(s\\) \\(e.g. {cls}/new.tif\\)"):
        pf.check_dataset_writable(data)
    assert not no_model


def test_channel_map_beyond_the_images_channels_is_named(data, tmp_path, no_model):
    with pytest.raises(DatasetError) as info:
        train(_config(data, tmp_path / "model", channel_map=(0, 1, None)))
    head, *lines = str(info.value).splitlines()
    assert "(or choose another channel map)" in head
    assert lines[0].endswith(
        "1 channel(s), but the channel map 0,1,- uses channel 1 (channels count from 0)"
    )
    assert not no_model


def test_cli_says_each_problem_in_one_line_before_tensorflow(
    data, tmp_path, capsys, monkeypatch, no_model
):
    started = []
    monkeypatch.setattr("napari_microclf.cli._start_tensorflow_quietly", lambda: started.append(1))
    a_file = tmp_path / "model.txt"
    a_file.write_text("x")
    assert cli_main(["train", str(data), "--out", str(a_file)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line == f"microclf: error: model folder {a_file} is a file; choose a folder for the model"
    )
    assert cli_main(["train", str(data), "--out", str(tmp_path / "m"), "--fine-tune", "9"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("microclf: error: fine_tune must be 0..7 or 'all', got 9")
    assert cli_main(["train", str(data), "--out", str(tmp_path / "m"), "--channels", "0,1"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("microclf: error: channel map needs three entries")
    assert not started  # all refused before TensorFlow started
    cls = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    _write_bad(data / cls, "1x1")
    assert cli_main(["train", str(data), "--out", str(tmp_path / "m")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"microclf: error: {cls}/dot.tif: too small: 1 x 1 pixels")
    assert not no_model


def test_cli_unexpected_error_shows_its_traceback_and_says_report_it(
    data, tmp_path, capsys, monkeypatch
):
    def broken(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr("napari_microclf.core.train.train", broken)
    assert cli_main(["train", str(data), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert err.strip().splitlines()[-1] == (
        "microclf: error: unexpected TypeError: unsupported "
        "operand -- a bug in microclf; please report it "
        "with the traceback above"
    )

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m" / "x"))

    monkeypatch.setattr("napari_microclf.core.train.train", disk_full)
    assert cli_main(["train", str(data), "--out", str(tmp_path / "m")]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"microclf: error: no space left on the disk ({tmp_path / 'm' / 'x'}); free "
        "some disk space or choose another folder"
    )


def test_user_message_tells_ours_and_the_environments_from_bugs():
    assert pf.user_message(DatasetError("a/b.tif: too small")) == "a/b.tif: too small"
    assert pf.user_message(MicroclfError("x")) == "x"
    assert (
        pf.user_message(PermissionError(errno.EACCES, "Permission denied", "/m"))
        == "permission denied (/m); check the path and its permissions"
    )
    assert pf.user_message(ValueError("boom")) is None
    assert pf.user_message(KeyError("k")) is None


def test_library_hints_are_condensed_to_one_line(tmp_path, capfd):
    path = _write_bad(tmp_path, "not an image")
    with pytest.raises(Exception) as info:
        read_page(path)
    assert str(info.value) == (
        f"{path}: cannot read this image (no image reader recognises "
        "its contents). Is the file complete and a TIFF/PNG/JPEG? "
        "Re-export it or remove it."
    )
    multi = OSError(
        "Could not find a backend to open `x.png`` with iomode `r`.\nBased on the "
        "extension, the following plugins might add capable backends:\n  pyav: "
        " pip install imageio[pyav]"
    )
    assert one_line(multi, named=True) == "no image reader recognises its contents"
    assert one_line(ValueError("first line.\nsecond line"), named=True) == "ValueError: first line"
    # tifffile's log lines about a damaged page list are collected, not printed
    tifffile.imwrite(tmp_path / "multi.tif", np.zeros((6, 16, 16), np.uint8), metadata=None)
    raw = bytearray((tmp_path / "multi.tif").read_bytes())
    with tifffile.TiffFile(tmp_path / "multi.tif") as tif:
        offset = tif.pages[3].offset
    raw[offset : offset + 2] = b"\xff\xff"
    (tmp_path / "damaged.tif").write_bytes(bytes(raw))
    capfd.readouterr()
    info, notes = read_header(tmp_path / "damaged.tif")
    assert info.n_pages == 3 and notes and "corrupted tag list" in notes[0]
    assert capfd.readouterr().err == ""
    # nested collection keeps the inner lines for the outer
    with library_log() as outer, library_log() as inner:
        read_header(tmp_path / "damaged.tif")
    assert inner and outer == inner


def test_header_pass_is_fast_and_agrees_with_reading(tmp_path):
    import imageio.v3 as iio

    folder = tmp_path / "ds" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(100):
        tifffile.imwrite(folder / f"{i}.tif", rng.integers(0, 4000, (48, 40), np.uint16))
        iio.imwrite(folder / f"{i}.png", rng.integers(0, 255, (40, 48, 3), np.uint8))
    tifffile.imwrite(
        folder / "stack.tif",
        np.zeros((5, 2, 16, 16), np.uint8),
        imagej=True,
        metadata={"axes": "ZCYX"},
    )
    (tmp_path / "ds" / "b").mkdir()
    t0 = time.perf_counter()
    scan = pf.scan_images(tmp_path / "ds")
    seconds = time.perf_counter() - t0
    assert scan.files == 201 and scan.pages == 205 and not scan.problems
    assert seconds < 201 * 0.01, seconds  # about 0.1-0.6 ms a file; 10 ms is a broken pass
    assert count_pages(folder / "stack.tif") == 5
    assert read_header(folder / "0.png")[0].page_shape == (40, 48, 3)


def test_training_keeps_global_random_state_and_warning_filters(data, tmp_path):
    import keras  # noqa: F401 - imported first: its own import may add filters

    random.seed(123)
    np.random.seed(123)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    filters = list(warnings.filters)
    result = train(_config(data, tmp_path / "model", epochs=1, seed=7))
    assert result.bundle is not None
    assert random.getstate() == python_state
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(after, numpy_state, strict=True))
    assert warnings.filters == filters


# -- the Train widget: ours as one line, the unexpected with their traceback ---------------


def _widget_messages(level):
    from napari.utils.notifications import notification_manager

    return [
        str(n.message)
        for n in notification_manager.records
        if str(n.severity).lower().endswith(level)
    ]


def _wait_idle(qtbot, widget, worker) -> None:
    """Until the widget's worker has finished. Not ``waitSignal(worker.finished)`` after the
    start: a worker that fails at once can finish before that connects (a race on a loaded
    machine); the widget's own slot is connected before the worker starts."""
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60000)


def _tiny_widget(docked, viewer, data, out):
    """The Train widget as napari docks it, on ``data`` and ``out``, set to train tiny."""
    widget = docked(viewer, "Train")
    widget.set_folders(data, out)
    for name, value in {
        "epochs": 1,
        "batch_size": 8,
        "image_size": 32,
        "weights": "none",
        "fine_tune": "all",
    }.items():
        getattr(widget.form, name).value = value
    return widget


def test_widget_lists_bad_images_in_the_log_and_one_line_notification(
    make_napari_viewer, qtbot, data, tmp_path, no_model, docked
):
    from napari.utils.notifications import notification_manager

    cls = sorted(p.name for p in data.iterdir() if p.is_dir())[0]
    for kind in ("1x1", "corrupt", "empty"):
        _write_bad(data / cls, kind)
    widget = _tiny_widget(docked, make_napari_viewer(), data, tmp_path / "model")
    notification_manager.records.clear()
    worker = widget.start()  # the quick checks pass; the worker's preflight finds the images
    _wait_idle(qtbot, widget, worker)
    (error,) = _widget_messages("error")
    assert error == (
        "Cannot train: 3 of the 21 image files cannot be used for training; fix or "
        f"re-export the file(s), or move them out of the dataset folder {data}, "
        "then train again (listed in the Log tab)"
    )
    log = widget.log.toPlainText()
    for name in ("dot.tif: too small", "corrupt.tif: cannot read", "empty.jpg: empty file"):
        assert f"  {cls}/{name}" in log
    assert "Traceback" not in log and not no_model
    assert widget.tabs.currentWidget() is widget.log


def _train_raising(broken, make_napari_viewer, qtbot, data, tmp_path, monkeypatch, docked):
    """A Train widget whose training is ``broken`` (it raises at once), run to its end.
    Returns the widget and what napari's error notification received (type, exception,
    traceback)."""
    from napari.utils.notifications import notification_manager

    monkeypatch.setattr("napari_microclf._qt.train.train", broken)
    received = []
    monkeypatch.setattr(notification_manager, "receive_error", lambda *args: received.append(args))
    widget = _tiny_widget(docked, make_napari_viewer(), data, tmp_path / "model")
    notification_manager.records.clear()
    _wait_idle(qtbot, widget, widget.start())
    return widget, received


def test_widget_shows_an_unexpected_error_with_its_traceback(
    make_napari_viewer, qtbot, data, tmp_path, monkeypatch, docked
):
    def broken(config, on_update=None, should_stop=None):
        raise TypeError("unsupported operand type(s)")

    widget, received = _train_raising(
        broken, make_napari_viewer, qtbot, data, tmp_path, monkeypatch, docked
    )
    log = widget.log.toPlainText()
    assert "unexpected error (a bug in microclf" in log and "Traceback (most recent call" in log
    assert 'in broken\n    raise TypeError("unsupported operand type(s)")' in log
    assert "Cannot train" not in log and not _widget_messages("error")
    ((exc_type, exc, tb),) = received  # napari's error notification, with the traceback
    assert exc_type is TypeError and tb is not None
    assert widget.status.text().startswith("Training failed: TypeError: unsupported operand")


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("Graph execution error"),
        LockedError(
            "model folder m is being written by microclf train (pid 1 on h, started 10:02)"
        ),
    ],
)
def test_widget_recovers_from_a_runtime_error(
    make_napari_viewer, qtbot, data, tmp_path, monkeypatch, error, docked
):
    """superqt drops a generator worker's RuntimeError without ``finished``: the widget would
    stay busy for good. Ours (a LockedError) is one line; others come with their traceback."""

    def broken(config, on_update=None, should_stop=None):
        raise error

    widget, received = _train_raising(
        broken, make_napari_viewer, qtbot, data, tmp_path, monkeypatch, docked
    )
    assert widget.start_btn.text() == "Start training"
    if isinstance(error, LockedError):
        assert _widget_messages("error") == [f"Cannot train: {error}"] and not received
    else:
        ((exc_type, exc, tb),) = received
        assert exc is error and tb is not None
        assert "raise error" in widget.log.toPlainText()
        assert widget.status.text().startswith("Training failed: RuntimeError: Graph execution")


def _files(folder):
    """Every file and folder under ``folder``: relative path -> (size, mtime) of a file,
    None for a folder."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        if p.is_file()
        else None
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize(
    "where", ["inside the dataset", "the working directory", "the working directory, a model's"]
)
def test_widget_refuses_a_model_folder_in_the_dataset_or_the_working_directory(
    make_napari_viewer, qtbot, data, tmp_path, monkeypatch, no_model, where, docked
):
    """Start refuses a model folder whose writing could destroy what microclf did not write
    (the dataset's images, the files of the working directory, even one that holds a model):
    one line says why, no training starts and nothing is written, in the dataset or there."""
    from pathlib import Path

    from napari.utils.notifications import notification_manager

    from napari_microclf._qt.train import State

    started = []
    monkeypatch.setattr("napari_microclf._qt.train.train", lambda *a, **k: started.append(a))
    work = tmp_path / "work"
    work.mkdir()
    if where == "the working directory, a model's":  # not refused as a folder of other files
        (work / "microclf.json").write_text("{}")
        (work / "notes.txt").write_text("the user's own file")
    monkeypatch.chdir(work)
    inside = where == "inside the dataset"
    out = data / "model" if inside else Path(".")
    widget = _tiny_widget(docked, make_napari_viewer(), data, out)
    before = _files(data), _files(work)
    notification_manager.records.clear()

    assert widget.start() is None
    qtbot.wait(100)  # a worker started by mistake would have run by now
    assert widget.state is State.IDLE and widget.worker is None
    assert not started and not no_model
    (error,) = _widget_messages("error")
    why = f"model folder {out} is inside {data}" if inside else "is the working directory"
    assert error.startswith("Cannot train: model folder") and why in error
    assert widget.status.text() == error
    assert widget.start_btn.isEnabled() and widget.start_btn.text() == "Start training"
    assert (_files(data), _files(work)) == before
    assert not (data / "model").exists() and not (data / "split.json").exists()
