"""A model folder keeps the user's files, survives a swap killed at any step, keeps one
previous bundle that ``restore`` brings back, and has one writer at a time (locks)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import keras
import numpy as np
import pytest

from napari_microclf import cli
from napari_microclf.core import bundle as bundles
from napari_microclf.core import files, lock
from napari_microclf.core.errors import BundleError, LockedError

X = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
TEMP_PREFIXES = (".incoming-", ".outgoing-", ".dropped-", ".microclf", "..microclf")


def tiny_model(seed: int):
    """A small stand-in for the classifier: same input and output shapes, saved in a blink."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def write(out, tag: str, seed: int, **extra):
    meta = {
        "format": "microclf-bundle/1",
        "class_names": ["a", "b"],
        "date": tag,
        "backbone": "efficientnet-b0",
        "metrics": {"accuracy": 0.5 + seed / 100},
        "preprocessing": {"image_size": 32, "pmin": 1, "pmax": 99.8},
    }
    files = {
        "report.md": f"# report {tag}\n",
        "split.json": json.dumps(
            {"test": [{"key": "a/1.tif", "sha1": tag, "group": "g"}], "val": [], "train": []}
        ),
    }
    return bundles.write_bundle(out, tiny_model(seed), meta, {**files, **extra})


def predictions(folder):
    return bundles.load_bundle(folder).model.predict(X, verbose=0)


def add_user_files(out):
    (out / "notes.txt").write_text("my notes")
    (out / "figures").mkdir()
    (out / "figures" / "fig1.svg").write_text("<svg/>")
    (out / "reports").mkdir()
    (out / "reports" / "2024-01-01-test.md").write_text("an evaluation")


def assert_user_files(out):
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / "figures" / "fig1.svg").read_text() == "<svg/>"
    assert (out / "reports" / "2024-01-01-test.md").read_text() == "an evaluation"


def assert_clean(out):
    left = [n for n in os.listdir(out) if n.startswith(TEMP_PREFIXES)]
    assert left == [], left
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def leave_killed_lock(out, command="microclf train"):
    """What a killed training leaves: its lock file, naming a process that is gone."""
    (out / lock.MODEL_LOCK).write_text(
        json.dumps(
            {
                "pid": dead_pid(),
                "host": socket.gethostname(),
                "command": command,
                "started": "2024-01-01T10:02:00",
                "time": time.time(),
            }
        )
    )


# -- user files and previous/ ------------------------------------------------------------


def test_retraining_keeps_user_files_and_one_previous_bundle(tmp_path):
    out = tmp_path / "model"
    write(out, "A", 1, **{"only-in-a.txt": "a's own file"})
    first = predictions(out)
    add_user_files(out)
    write(out, "B", 2)
    assert_user_files(out)
    assert bundles.read_meta(out)["date"] == "B"
    assert bundles.read_meta(out / "previous")["date"] == "A"
    np.testing.assert_allclose(predictions(out / "previous"), first)
    assert not np.allclose(predictions(out), first)
    # the old bundle's own files went with it (those the new one does not write too)
    assert not (out / "only-in-a.txt").exists()
    assert (out / "previous" / "only-in-a.txt").read_text() == "a's own file"
    assert (out / "report.md").read_text() == "# report B\n"
    # previous/ holds the bundle only, never the user's files
    assert sorted(os.listdir(out / "previous")) == sorted(
        [bundles.MODEL_FILE, bundles.META_FILE, "report.md", "split.json", "only-in-a.txt"]
    )
    write(out, "C", 3)  # one generation: A is gone, B is previous
    dates = bundles.read_meta(out)["date"], bundles.read_meta(out / "previous")["date"]
    assert dates == ("C", "B")
    assert_user_files(out)
    assert_clean(out)
    assert sorted(os.listdir(out)) == sorted(
        [
            bundles.MODEL_FILE,
            bundles.META_FILE,
            "report.md",
            "split.json",
            "previous",
            "notes.txt",
            "figures",
            "reports",
        ]
    )


def test_a_foreign_folder_is_still_refused(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.docx").write_text("years of work")
    with pytest.raises(BundleError, match="not a microclf model folder"):
        write(folder, "A", 1)
    assert os.listdir(folder) == ["chapter1.docx"]


def test_restore_swaps_back_and_forth(tmp_path, capsys):
    out = tmp_path / "model"
    write(out, "A", 1)
    first = predictions(out)
    add_user_files(out)
    write(out, "B", 2)
    second = predictions(out)
    meta = bundles.restore_previous(out)
    assert meta["date"] == "A" and bundles.read_meta(out / "previous")["date"] == "B"
    np.testing.assert_allclose(predictions(out), first)
    assert_user_files(out)
    # restoring twice is back where it was; the command line says which model is active
    assert cli.main(["restore", str(out)]) == 0
    said = capsys.readouterr().out
    assert "trained B" in said and "test accuracy 52.0%" in said and "previous/" in said
    np.testing.assert_allclose(predictions(out), second)
    assert bundles.read_meta(out / "previous")["date"] == "A"
    assert_user_files(out)
    assert_clean(out)


def test_restore_without_previous_says_so(tmp_path, capsys):
    out = tmp_path / "model"
    write(out, "A", 1)
    with pytest.raises(BundleError, match="no previous model to restore"):
        bundles.restore_previous(out)
    assert cli.main(["restore", str(out)]) == 1
    assert "no previous model" in capsys.readouterr().err
    assert bundles.read_meta(out)["date"] == "A"


# -- a swap interrupted at every step -----------------------------------------------------


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it)."""


def _steps(tmp_path, op: str) -> list[str]:
    out = _setup(tmp_path / f"record-{op}")
    seen: list[str] = []
    bundles._HOOK["step"] = seen.append
    try:
        _do(op, out)
    finally:
        bundles._HOOK["step"] = None
    return seen


def _setup(out):
    write(out, "A0", 0)
    write(out, "A", 1)  # previous/ = A0, so the swap also drops an old previous/
    add_user_files(out)
    return out


def _do(op: str, out):
    if op == "write":
        write(out, "B", 2)
    else:
        bundles.restore_previous(out)


@pytest.mark.parametrize("op", ["write", "restore"])
def test_a_swap_killed_after_any_step_is_repaired(tmp_path, op):
    steps = _steps(tmp_path, op)
    assert "journal" in steps and "committed" in steps and "dropped" in steps
    new = "B" if op == "write" else "A0"
    for k, step in enumerate(steps):
        out = _setup(tmp_path / f"{op}-{k}")

        def kill(name, step=step):
            if name == step:
                raise Killed(name)

        bundles._HOOK["step"] = kill
        try:
            with pytest.raises(Killed):
                _do(op, out)
        finally:
            bundles._HOOK["step"] = None
        leave_killed_lock(out)
        # the next load repairs the folder: a whole bundle, the new one once its journal
        # was written (it was complete by then), else the old one
        before_journal = steps.index(step) < steps.index("journal")
        active = bundles.read_meta(out)["date"]
        assert active == ("A" if before_journal else new), (step, active)
        assert bundles.read_meta(out / "previous")["date"] == ("A0" if before_journal else "A")
        bundles.load_bundle(out)
        assert_user_files(out)
        assert_clean(out)
        assert not (out / lock.MODEL_LOCK).exists()


def test_a_swap_killed_before_its_journal_leaves_the_old_bundle(tmp_path, monkeypatch):
    out = tmp_path / "model"
    write(out, "A", 1)

    class Broken:
        def save(self, path):
            path.write_bytes(b"half a model")
            raise Killed("killed while saving")

    with pytest.raises(Killed):
        bundles.write_bundle(out, Broken(), {"class_names": ["a", "b"]})
    assert bundles.read_meta(out)["date"] == "A" and not (out / "previous").exists()
    assert_clean(out)


def test_the_old_swap_leftovers_are_restored_and_removed(tmp_path):
    """microclf before this version swapped whole folders beside OUT; killed between its
    two renames it left no OUT, the old bundle as .OUT.old-* and the new one as .OUT.tmp-*."""
    out = tmp_path / "model"
    write(out, "A", 1)
    add_user_files(out)
    old = tmp_path / ".model.old-1a2b3c4d"
    out.rename(old)
    tmp = tmp_path / ".model.tmp-5e6f7a8b"
    tmp.mkdir()
    (tmp / bundles.MODEL_FILE).write_bytes(b"partial")
    past = lock.PROCESS_START - 60
    for p in (old, tmp):
        os.utime(p, (past, past))
    assert bundles.load_bundle(out).meta["date"] == "A"
    assert_user_files(out)
    assert sorted(os.listdir(tmp_path)) == ["model"]
    # and through the command line, before anything else
    out.rename(old)
    os.utime(old, (past, past))
    cli.main(["restore", str(out)])  # no previous: refused, but the folder is back
    assert bundles.read_meta(out)["date"] == "A" and sorted(os.listdir(tmp_path)) == ["model"]


def test_leftovers_of_a_running_old_swap_are_left_alone(tmp_path):
    out = tmp_path / "model"
    write(out, "A", 1)
    fresh = tmp_path / ".model.tmp-00000000"  # newer than this process: maybe still written
    fresh.mkdir()
    bundles.repair_model_folder(out)
    assert fresh.exists()


# -- locks --------------------------------------------------------------------------------


HOLDER = """
import sys, time
from napari_microclf.core.lock import model_lock
with model_lock(sys.argv[1], "microclf train"):
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""


def test_a_second_training_into_the_same_folder_is_refused_at_once(tmp_path):
    from napari_microclf.core.train import TrainConfig, train

    out = tmp_path / "model"
    write(out, "A0", 0)
    write(out, "A", 1)
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(ready)])
    try:
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline and holder.poll() is None:
            time.sleep(0.05)
        assert ready.exists()
        t0 = time.perf_counter()
        with pytest.raises(LockedError) as err:
            train(TrainConfig(str(tmp_path / "no-data"), str(out), epochs=1))
        assert time.perf_counter() - t0 < 5
        msg = str(err.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in msg
        assert "microclf train" in msg and "choose another --out" in msg and str(out) in msg
        with pytest.raises(LockedError, match=f"pid {holder.pid}"):
            bundles.restore_previous(out)
        assert bundles.read_meta(out)["date"] == "A"  # reading while it is locked is fine
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock file stays, naming a process that is gone; the next taker clears it
    assert (out / lock.MODEL_LOCK).exists()
    with lock.model_lock(out, "microclf train") as held:
        assert held.note and f"process {holder.pid} is no longer running" in held.note
        assert json.loads((out / lock.MODEL_LOCK).read_text())["pid"] == os.getpid()
    assert not (out / lock.MODEL_LOCK).exists()


def test_locks_are_reentrant_in_a_thread_and_refused_to_another(tmp_path):
    out = tmp_path / "model"
    with lock.model_lock(out, "microclf train"):
        with lock.model_lock(out, "microclf write"):  # train -> write_bundle
            pass
        assert (out / lock.MODEL_LOCK).exists()
        errors = []

        def other():
            try:
                with lock.model_lock(out):
                    pass
            except LockedError as exc:
                errors.append(str(exc))

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0]
    assert not out.exists()  # made for the lock, left empty: removed again


def test_a_lock_from_another_host_is_stale_only_when_old(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    info = {
        "pid": 1,
        "host": "elsewhere",
        "command": "microclf train",
        "started": "2024-01-01T10:02:00",
        "time": time.time() - 3600,
    }
    (out / lock.MODEL_LOCK).write_text(json.dumps(info))
    with (
        pytest.raises(LockedError, match="pid 1 on elsewhere, started 2024-01-01 10:02"),
        lock.model_lock(out),
    ):
        pass
    info["time"] = time.time() - lock.STALE_AFTER_S - 60
    (out / lock.MODEL_LOCK).write_text(json.dumps(info))
    with lock.model_lock(out) as held:
        assert "older than 24 h" in held.note


def test_split_updates_take_turns(tmp_path, monkeypatch):
    from napari_microclf.core import dataset

    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(3):
            (data / c / f"{i}.png").write_bytes(bytes([i, ord(c)]) * 10)
    monkeypatch.setattr(lock, "SPLIT_WAIT_S", 0.3)
    release = threading.Event()
    taken = threading.Event()

    def holder():
        with lock.split_lock(data, "microclf train"):
            taken.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    taken.wait(10)
    try:
        with pytest.raises(
            LockedError, match="split of dataset .* is being updated by microclf train"
        ):
            dataset.update_split(data)
        assert not (data / dataset.SPLIT_FILE).exists()
    finally:
        release.set()
        t.join()
    split, _ = dataset.update_split(data)  # free again
    assert (data / dataset.SPLIT_FILE).exists() and not (data / lock.SPLIT_LOCK).exists()


# -- clear errors ---------------------------------------------------------------------------


def test_a_corrupt_model_file_says_so_and_how_to_restore(tmp_path):
    out = tmp_path / "model"
    write(out, "A", 1)
    (out / bundles.MODEL_FILE).write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(BundleError) as err:
        bundles.load_bundle(out)
    msg = str(err.value)
    assert "corrupt or unreadable" in msg and "retrain" in msg
    assert "restore" not in msg  # there is no previous model to restore
    assert "File not found" not in msg
    out = tmp_path / "retrained"
    write(out, "A", 1)
    write(out, "B", 2)
    (out / bundles.MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(BundleError, match=f"microclf restore {out}"):
        bundles.load_bundle(out)
    bundles.restore_previous(out)
    assert bundles.load_bundle(out).meta["date"] == "A"


def test_a_bundle_of_a_newer_or_other_format_is_refused(tmp_path):
    out = tmp_path / "model"
    write(out, "A", 1)
    meta = json.loads((out / bundles.META_FILE).read_text())
    for fmt, expected in [
        (
            "microclf-bundle/3",
            r"newer microclf \(format 3;.*upgrade "
            r"napari-microclf",
        ),
        ("lobe/1", "format 'lobe/1', not a microclf model"),
    ]:
        (out / bundles.META_FILE).write_text(json.dumps({**meta, "format": fmt}))
        with pytest.raises(BundleError, match=expected):
            bundles.read_meta(out)
    without_format = {k: v for k, v in meta.items() if k != "format"}
    (out / bundles.META_FILE).write_text(json.dumps(without_format))
    assert bundles.read_meta(out)["class_names"] == ["a", "b"]  # older bundles have no format


@pytest.mark.parametrize(
    "content, expected",
    [
        ("[]", "JSON object was expected"),
        ('{"test": {"a/1.tif": "x"}}', "'test' must be a list"),
        ('{"test": [{"key": "a/1.tif"}]}', r"test\[0\] must have a text 'key' and 'sha1'"),
        ('{"val": [{"key": "1.tif", "sha1": "x"}]}', "is not '<class>/<file>'"),
        ("{not json", "is corrupt"),
    ],
)
def test_a_bundle_split_list_is_checked(tmp_path, content, expected):
    from napari_microclf.core.bundle import own_split

    out = tmp_path / "model"
    write(out, "A", 1)
    assert own_split(out)["test"][0]["key"] == "a/1.tif"
    (out / "split.json").write_text(content)
    with pytest.raises(BundleError, match=expected) as err:
        own_split(out)
    assert "microclf restore" in str(err.value)


def test_the_file_digest_memo_is_bounded(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(files, "DIGEST_MEMO_SIZE", 3)
    monkeypatch.setattr(files, "_DIGEST_MEMO", files.OrderedDict())
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * 100)
        assert files.file_digest(paths[-1]) == hashlib.sha1(bytes([i]) * 100).hexdigest()
        assert files.file_digest(paths[0]) == hashlib.sha1(bytes([0]) * 100).hexdigest()
    assert len(files._DIGEST_MEMO) == 3
    kept = {k[0] for k in files._DIGEST_MEMO}
    assert str(paths[0]) in kept and str(paths[5]) in kept  # the most recently used stay
    paths[5].write_bytes(b"changed")  # a changed file is read again
    assert files.file_digest(paths[5]) == hashlib.sha1(b"changed").hexdigest()


# -- the Predict widget's Restore previous -------------------------------------------------


def test_predict_widget_restores_the_previous_model(tmp_path, qtbot, monkeypatch):
    from napari.components import ViewerModel

    from napari_microclf._qt import predict as qt_predict
    from napari_microclf._qt.predictor_cache import get_predictor

    monkeypatch.setattr(qt_predict, "_notify", lambda kind, text: None)
    out = tmp_path / "model"
    write(out, "A", 1)
    widget = qt_predict.PredictWidget(ViewerModel(), out)
    qtbot.addWidget(widget)
    assert not widget.restore_btn.isEnabled()  # nothing to restore yet
    first = get_predictor(out).bundle.model.predict(X, verbose=0)
    write(out, "B", 2)
    widget.set_bundle(out)
    assert widget.restore_btn.isEnabled()
    second = get_predictor(out).bundle.model.predict(X, verbose=0)
    assert not np.allclose(first, second)
    widget.restore_btn.click()
    assert bundles.read_meta(out)["date"] == "A" and "trained A" in widget.model_info.text()
    # the loaded-model cache does not serve the replaced model
    np.testing.assert_allclose(get_predictor(out).bundle.model.predict(X, verbose=0), first)
    widget.restore_btn.click()
    np.testing.assert_allclose(get_predictor(out).bundle.model.predict(X, verbose=0), second)
