"""Annotate: put slices of image layers into class folders of a dataset.

The dataset is ``<folder>/<class>/<image>.tif`` (see :mod:`core.dataset`). A slice is the
2D image the dims sliders show for a layer: a plain image, one page of a stack, an RGB
image, or, for a multichannel file opened as one layer per channel (by this plugin's reader
or another; see :func:`_layers.channel_group`), the channels of all its channel layers
together (saved as one ``(C, Y, X)`` example, the way the file stores them).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core import dataset as ds
from . import _layers, _settings
from ._notify import notify as _notify
from ._rows import folder_row
from ._session import SESSION, connect_widget
from ._worker import stoppable_progress, surfaced
from .annotate_objects import ObjectAnnotator, class_colour
from .annotate_objects import ds_key as _key

KEYS = [str(i) for i in range(1, 10)]
DEFAULT_DATASET = "microclf-dataset"


class AnnotateWidget(QWidget):
    """Dataset folder, classes with live counts, layer picker, add / undo, keys 1-9."""

    #: each page "Add all slices" has done: its ``core.dataset.AddResult`` (written or found)
    added = Signal(object)

    def __init__(self, napari_viewer, dataset: str | Path | None = None):
        super().__init__()
        self.viewer = napari_viewer
        # files written by this widget, newest last, per dataset folder (for Undo)
        self._histories: dict[Path, list[Path]] = {}
        self._shown: Path | None = None  # the key of the dataset the table shows
        self._worker = None
        self._stop = threading.Event()
        self._pbar = None  # napari's progress bar of "Add all slices" while it runs

        # -- dataset folder
        if dataset is None:  # the folder of the last session
            dataset = _settings.load("annotate").get("dataset")
        self.folder_edit = QLineEdit(str(Path(dataset or DEFAULT_DATASET).expanduser()))
        self.folder_edit.setToolTip("The dataset: one sub-folder per class, created if missing.")
        self.folder_edit.editingFinished.connect(self.refresh)
        dataset_row = folder_row(self.folder_edit, "Dataset folder", self)

        # -- classes
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Key", "Class", "Images"])
        self.table.verticalHeader().setVisible(False)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.Stretch)
        header.setSectionResizeMode(2, QHeaderView.ResizeToContents)
        self.table.setMinimumHeight(130)
        self.new_class_edit = QLineEdit()
        self.new_class_edit.setPlaceholderText("new class name, e.g. mitotic")
        self.new_class_edit.returnPressed.connect(lambda: self.add_class())
        add_btn = QPushButton("Add class")
        add_btn.clicked.connect(lambda: self.add_class())
        self.rename_btn = QPushButton("Rename...")
        self.rename_btn.clicked.connect(lambda: self.rename_class())
        self.remove_btn = QPushButton("Remove...")
        self.remove_btn.setToolTip(
            "Moves the class folder with its images into the dataset's "
            ".trash folder; nothing is deleted."
        )
        self.remove_btn.clicked.connect(lambda: self.remove_class())
        new_row = QHBoxLayout()
        new_row.addWidget(self.new_class_edit, 1)
        new_row.addWidget(add_btn)
        edit_row = QHBoxLayout()
        edit_row.addWidget(self.rename_btn)
        edit_row.addWidget(self.remove_btn)
        classes_box = QGroupBox("Classes")
        cl = QVBoxLayout(classes_box)
        cl.addWidget(self.table)
        cl.addLayout(new_row)
        cl.addLayout(edit_row)

        # -- adding
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The image layer whose slices are added by the buttons.")
        self.layer_combo.currentIndexChanged.connect(self._update_layer_info)
        self.layer_info = QLabel()
        self.layer_info.setWordWrap(True)
        self.add_slice_btn = QPushButton("Add slice in view")
        self.add_slice_btn.setToolTip(
            "Save the slice the viewer shows now into the selected class."
        )
        self.add_slice_btn.clicked.connect(lambda: self.add_slice())
        self.add_all_btn = QPushButton(self.ADD_ALL)
        self.add_all_btn.setToolTip(
            "Save every slice (page) of the layer into the selected "
            "class. While it runs, the button stops it; the slices "
            "saved until then stay."
        )
        self.add_all_btn.clicked.connect(lambda: self._add_all_clicked())
        self.undo_btn = QPushButton("Undo last")
        self.undo_btn.clicked.connect(lambda: self.undo())
        add_row = QHBoxLayout()
        add_row.addWidget(self.add_slice_btn)
        add_row.addWidget(self.add_all_btn)
        add_box = QGroupBox("Add examples")
        form = QFormLayout(add_box)
        form.addRow("Image layer", self.layer_combo)
        form.addRow(self.layer_info)
        form.addRow(add_row)
        form.addRow(self.undo_btn)
        self.keys_toggle = QCheckBox("Annotate with keys 1-9")
        self.keys_toggle.setToolTip(
            "While on, keys 1-9 put the slice in view into that class, replacing napari's own "
            "1-9 shortcuts (e.g. an image layer's 1/2 transform/pan modes); off gives them back."
        )
        self.keys_toggle.toggled.connect(self.set_keys_active)
        self.keys_label = QLabel()
        self.keys_label.setWordWrap(True)
        form.addRow(self.keys_toggle)
        form.addRow(self.keys_label)

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self._keys_active = False
        self.objects = ObjectAnnotator(self)  # refreshes at once when a Labels layer is open

        layout = QVBoxLayout(self)
        intro = QLabel(
            "Save slices of your images, or the cells of their Labels layers, as training "
            "examples, one folder per class."
        )
        intro.setWordWrap(True)
        layout.addWidget(intro)
        layout.addWidget(QLabel("Dataset folder"))
        layout.addLayout(dataset_row)
        layout.addWidget(classes_box)
        layout.addWidget(add_box)
        layout.addWidget(self.objects)
        layout.addWidget(self.status)
        layout.addStretch(1)

        events = self.viewer.layers.events
        for ev in (events.inserted, events.removed, events.reordered):
            ev.connect(self._refresh_layers)
        events.inserted.connect(self._bind_layer_keys)
        self.viewer.layers.selection.events.active.connect(self._follow_active)
        self.viewer.dims.events.current_step.connect(self._update_layer_info)
        viewer = self.viewer
        self.destroyed.connect(lambda *_: _unbind_keys(viewer))
        self._refresh_layers()
        self.refresh()
        connect_widget(SESSION.dataset_edited, self, "_dataset_edited")
        self.table.itemSelectionChanged.connect(self.objects._update_info)

    ADD_ALL, STOP_ADDING = "Add all slices", "Stop adding"

    # -- dataset and classes --------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.folder_edit.text().strip() or DEFAULT_DATASET).expanduser()

    @property
    def history(self) -> list[Path]:
        """Examples this widget wrote into the dataset shown, newest last (for Undo).

        Each dataset folder keeps its own history, so Undo acts on the dataset in view and
        never moves a file of a dataset the user has switched away from; switching back
        makes that dataset's examples undoable again.
        """
        return self._histories.setdefault(_key(self.root), [])

    @history.setter
    def history(self, paths: list[Path]) -> None:
        self._histories[_key(self.root)] = list(paths)

    def set_dataset(self, path: str | Path) -> None:
        self.folder_edit.setText(str(path))
        self.refresh()

    def classes(self) -> list[str]:
        return ds.list_classes(self.root)

    def refresh(self) -> None:
        """Re-read the class folders and their counts."""
        selected = self.selected_class()
        counts = ds.class_counts(self.root)
        self.table.setRowCount(len(counts))
        objects = getattr(self, "objects", None) is not None and self.objects.active()
        for row, (name, n) in enumerate(counts.items()):
            key = KEYS[row] if row < len(KEYS) else ""
            for col, text in enumerate((key, name, str(n))):
                item = QTableWidgetItem(text)
                if col != 1:
                    item.setTextAlignment(Qt.AlignCenter)
                elif objects:  # the colour of the class's annotated cells
                    item.setData(Qt.DecorationRole, QColor(class_colour(row)))
                self.table.setItem(row, col, item)
        if selected in counts:
            self.table.selectRow(list(counts).index(selected))
        elif counts:
            self.table.selectRow(0)
        total = sum(counts.values())
        where = "" if self.root.is_dir() else " (the folder is created when you add a class)"
        self.table.setToolTip(f"{total} images in {len(counts)} classes in {self.root}{where}")
        self._update_keys_label(counts)
        self._shown = _key(self.root)
        history = self.history
        self.undo_btn.setEnabled(bool(history))
        self.undo_btn.setToolTip(
            f"Move {history[-1].name}, the last example added to this dataset, to "
            f"{self.root / ds.TRASH_DIR}."
            if history
            else "Nothing added to this dataset yet. Undo acts on the dataset shown only, never "
            "on another dataset folder you added examples to."
        )
        SESSION.set_dataset(self.root)
        _settings.save("annotate", {"dataset": str(_key(self.root))})
        if hasattr(self, "objects"):
            self.objects.refresh_dataset()

    def _update_keys_label(self, counts: dict | None = None) -> None:
        names = list(counts if counts is not None else ds.class_counts(self.root))
        mapping = ", ".join(f"{KEYS[i]} = {c}" for i, c in enumerate(names[:9]))
        if not mapping:
            text = "Keys: add classes to use keys 1-9."
        elif self._keys_active and getattr(self, "objects", None) and self.objects.active():
            text = f"Keys: {mapping} puts the clicked cell into that class."
        elif self._keys_active:
            text = (
                f"Keys: {mapping} puts the slice in view of the selected image layer into "
                "that class."
            )
        else:
            text = (
                f"Keys {mapping}: turn on 'Annotate with keys' to use them (off, 1-9 keep "
                "napari's own shortcuts)."
            )
        self.keys_label.setText(text)

    def _dataset_edited(self, path: str) -> None:
        if _key(Path(path)) == _key(self.root):
            self.refresh()

    def counts(self) -> dict[str, int]:
        return {
            self.table.item(r, 1).text(): int(self.table.item(r, 2).text())
            for r in range(self.table.rowCount())
        }

    def selected_class(self) -> str | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        if rows:
            item = self.table.item(rows[0].row(), 1)
            return item.text() if item else None
        return None

    def select_class(self, name: str) -> None:
        names = self.classes()
        if name in names:
            self.table.selectRow(names.index(name))

    def add_class(self, name: str | None = None) -> None:
        name = self.new_class_edit.text() if name is None else name
        try:
            name = ds.check_class_name(name)
            if name in self.classes():
                raise ds.DatasetError(f"class {name!r} already exists")
            ds.add_class(self.root, name)
        except (ds.DatasetError, OSError) as exc:
            _notify("error", f"Cannot add the class: {exc}")
            return
        self.new_class_edit.clear()
        self.refresh()
        self.select_class(name)
        self._say(f"Class '{name}' added.")

    def rename_class(self, old: str | None = None, new: str | None = None) -> None:
        old = old or self.selected_class()
        if not old:
            _notify("warning", "Select a class to rename.")
            return
        if new is None:
            new, ok = QInputDialog.getText(self, "Rename class", f"New name for '{old}':", text=old)
            if not ok:
                return
        try:
            ds.rename_class(self.root, old, new)
        except (ds.DatasetError, OSError) as exc:
            _notify("error", f"Cannot rename the class: {exc}")
            return
        new = new.strip()
        self.history = [
            p.parent.parent / new / p.name if p.parent.name == old else p for p in self.history
        ]
        self.refresh()
        self.select_class(new)
        self._say(f"Class '{old}' renamed to '{new}'.")

    def confirm(self, text: str) -> bool:
        """Ask the user; tests replace this."""
        answer = QMessageBox.question(
            self, "Remove class", text, QMessageBox.Yes | QMessageBox.No, QMessageBox.No
        )
        return answer == QMessageBox.Yes

    def remove_class(self, name: str | None = None) -> None:
        name = name or self.selected_class()
        if not name:
            _notify("warning", "Select a class to remove.")
            return
        n = ds.class_counts(self.root).get(name, 0)
        if not self.confirm(
            f"Remove class '{name}' and its {n} image(s)? They are moved to "
            f"{self.root / ds.TRASH_DIR}, not deleted."
        ):
            return
        try:
            dst = ds.remove_class(self.root, name)
        except (ds.DatasetError, OSError) as exc:
            _notify("error", f"Cannot remove the class: {exc}")
            return
        self.history = [p for p in self.history if p.parent.name != name]
        self.refresh()
        self._say(f"Class '{name}' moved to {dst}.")

    # -- layers ----------------------------------------------------------------------------
    def _refresh_layers(self, *_) -> None:
        current = self.layer_combo.currentText()
        names = [lyr.name for lyr in _layers.image_layers(self.viewer)]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        active = self.viewer.layers.selection.active
        want = (
            current
            if current in names
            else (active.name if active is not None and active.name in names else None)
        )
        if want:
            self.layer_combo.setCurrentText(want)
        self.layer_combo.blockSignals(False)
        self._update_layer_info()

    def _follow_active(self, event=None) -> None:
        active = self.viewer.layers.selection.active
        if active is not None and active.name in [
            self.layer_combo.itemText(i) for i in range(self.layer_combo.count())
        ]:
            self.layer_combo.setCurrentText(active.name)

    def layer(self):
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None  # noqa: SIM401

    def _update_layer_info(self, *_) -> None:
        if hasattr(self, "objects"):
            self.objects.refresh_layers()
        layer = self.layer()
        if layer is None:
            self.layer_info.setText("Open an image (File > Open) to add examples.")
            return
        group = _layers.channel_group(self.viewer, layer)
        pages = _layers.n_pages(layer)
        parts = []
        if pages > 1:
            index = _layers.page_in_view(self.viewer, layer)
            parts.append(f"slice {_layers.flat_page(layer, index) + 1} of {pages} in view")
        if layer.rgb:
            parts.append("RGB")
        if len(group) > 1:
            parts.append(
                f"{len(group)} channels saved together ("
                + ", ".join(lyr.name for lyr in group)
                + ")"
            )
        self.layer_info.setText("; ".join(parts) or "a single 2D image")

    def _layer_for_keys(self):
        active = self.viewer.layers.selection.active
        from napari.layers import Image

        return active if isinstance(active, Image) else self.layer()

    # -- adding ------------------------------------------------------------------------------
    def _target_class(self, class_name):
        name = class_name or self.selected_class()
        if not name:
            _notify("warning", "Add a class first (type a name and press Add class).")
        return name

    def add_slice(self, class_name: str | None = None, layer=None):
        """Save the slice in view of ``layer`` (default: the picked one) into the class."""
        name = self._target_class(class_name)
        layer = layer or self.layer()
        if not name:
            return None
        if layer is None:
            _notify("warning", "Open an image layer first.")
            return None
        src = _layers.page_source(self.viewer, layer)
        index = _layers.page_in_view(self.viewer, layer)
        page = _layers.flat_page(layer, index)
        try:
            result = ds.add_example(self.root, name, src.page(page or 0), *src.origin(page))
        except (ds.DatasetError, OSError, ValueError) as exc:
            _notify("error", f"Cannot add the slice: {exc}")
            return None
        where = f"slice {page + 1} of " if page is not None else ""
        self._report(result, f"{where}{src.name}")
        self.refresh()
        return result

    def _report(self, result, what: str) -> None:
        if result.written:
            self.history.append(result.path)
            self._say(f"Added {what} to '{result.class_name}' ({result.path.name}).")
        else:
            _notify(
                "info",
                f"{what} is already in the dataset, in class "
                f"'{result.class_name}' ({result.path.name}); not written again.",
            )

    def _add_all_clicked(self) -> None:
        if self._worker is not None:
            self.stop_adding()
        else:
            self.add_all_slices()

    def add_all_slices(self, class_name: str | None = None, layer=None):
        """Save every page of the layer into the class, in a worker; returns the worker.

        Each page costs the same however many are already in the dataset: duplicates are
        looked up in a hash index made once, and the counts are bumped, not re-read. It stops
        at the next page on :meth:`stop_adding` (the button, or Cancel in napari's activity
        dock); every example is written atomically, so what was saved until then is whole.
        """
        from napari.qt.threading import thread_worker

        if self._worker is not None:
            _notify("warning", "Slices are being added; stop that first.")
            return None
        name = self._target_class(class_name)
        layer = layer or self.layer()
        if not name or layer is None:
            if layer is None:
                _notify("warning", "Open an image layer first.")
            return None
        src = _layers.page_source(self.viewer, layer)
        root, key = self.root, _key(self.root)
        history = self.history  # this dataset's, even if the user switches meanwhile
        multi = src.n_pages > 1
        stop = self._stop = threading.Event()

        def work():
            index = ds.hash_index(root)  # one pass over the dataset, then a lookup a page
            for page in range(src.n_pages):
                if stop.is_set():
                    return
                where = src.origin(page) if src.origins else (src.source, page if multi else None)
                yield ds.add_example(root, name, src.page(page), *where, index=index)

        pbar = self._pbar = stoppable_progress(
            src.n_pages, f"Adding {src.name} to {name}", self.stop_adding
        )
        worker = thread_worker(surfaced(work), ignore_errors=True)()
        summary = {"written": 0, "duplicate": 0, "shown": 0, "at": time.monotonic()}

        def move_bar(force=False):
            # napari's bar runs the event loop when it moves (QtLabeledProgressBar.setValue),
            # so the next results (and ``finished``) may run inside this call: it is made
            # last, after this result is counted, and at most every 0.1 s.
            done = summary["written"] + summary["duplicate"]
            if done > summary["shown"] and (force or time.monotonic() - summary["at"] > 0.1):
                step = done - summary["shown"]
                summary.update(shown=done, at=time.monotonic())
                pbar.update(step)

        def on_result(result):
            if result.written:
                history.append(result.path)
                summary["written"] += 1
                self._bump(key, result.class_name)
            else:
                summary["duplicate"] += 1
            self.added.emit(result)
            move_bar()

        def on_error(exc):
            _notify("error", f"Adding slices stopped: {exc}")

        def on_finished():
            move_bar(force=True)
            pbar.close()
            self._worker = self._pbar = None
            self.add_all_btn.setText(self.ADD_ALL)
            self.add_all_btn.setEnabled(True)
            self.refresh()
            done = summary["written"] + summary["duplicate"]
            text = f"Added {summary['written']} slice(s) of {src.name} to '{name}'."
            if stop.is_set() and done < src.n_pages:
                text += f" Stopped after {done} of {src.n_pages} slices."
            if summary["duplicate"]:
                _notify(
                    "info",
                    f"{summary['duplicate']} slice(s) of {src.name} were already "
                    "in the dataset and were not written again.",
                )
            self._say(text)

        worker.yielded.connect(on_result)
        worker.errored.connect(on_error)
        worker.finished.connect(on_finished)
        self.add_all_btn.setText(self.STOP_ADDING)
        self._worker = worker
        worker.start()
        return worker

    def stop_adding(self) -> None:
        """Stop "Add all slices" before its next page (the pages saved so far stay)."""
        if self._worker is None:
            return
        self._stop.set()
        self._worker.quit()
        self.add_all_btn.setEnabled(False)
        self.add_all_btn.setText("Stopping...")

    def _bump(self, key: Path, class_name: str) -> None:
        """Count one more example of a class in the table, without re-reading the folders."""
        if key != self._shown:
            return  # the table shows another dataset now
        for row in range(self.table.rowCount()):
            if self.table.item(row, 1).text() == class_name:
                item = self.table.item(row, 2)
                item.setText(str(int(item.text()) + 1))
                self.undo_btn.setEnabled(True)
                return
        self.refresh()  # a class the table does not list yet

    def undo(self) -> Path | None:
        """Move the newest example written into the dataset shown to its trash."""
        history = self.history
        while history:
            path = history.pop()
            if path.exists():
                try:
                    dst = ds.move_to_trash(self.root, path)
                except (ds.DatasetError, OSError) as exc:
                    _notify("error", f"Cannot undo: {exc}")
                    return None
                self.objects.forget(path)
                self.refresh()
                self._say(f"Moved {path.name} to {dst.parent}.")
                return dst
        _notify("info", "Nothing to undo.")
        self.refresh()
        return None

    def _say(self, text: str) -> None:
        self.status.setText(text)

    # -- keys 1-9 -----------------------------------------------------------------------------
    def key_pressed(self, number: int):
        """Put the selected object (a Labels layer chosen in Objects) or else the slice in
        view of the active image layer into class ``number`` (1-based)."""
        names = self.classes()
        if number > len(names):
            _notify(
                "warning",
                f"Key {number}: there is no class {number} (the dataset has {len(names)}).",
            )
            return None
        if self.objects.active():
            self.select_class(names[number - 1])
            return self.objects.add_selected(names[number - 1])
        layer = self._layer_for_keys()
        if layer is None:
            _notify("warning", "Select an image layer first.")
            return None
        self.select_class(names[number - 1])
        return self.add_slice(names[number - 1], layer)

    def _make_handler(self, number):
        def handler(_target):
            self.key_pressed(number)

        handler.__name__ = f"microclf_assign_class_{number}"
        handler.__doc__ = f"Annotate: put the slice in view into class {number}"
        return handler

    @property
    def keys_active(self) -> bool:
        return self._keys_active

    def set_keys_active(self, on: bool) -> None:
        """Keys 1-9 annotate while ``on``; off, napari's own 1-9 shortcuts are back.

        The viewer's keymap answers when no image layer is active; an active image layer's
        own keymap comes first (it binds 1 and 2 to its modes), so each image layer gets the
        same bindings, and unbinding ours lets the layer's class keymap answer again.
        """
        on = bool(on)
        if self.keys_toggle.isChecked() != on:
            self.keys_toggle.setChecked(on)  # comes back here through ``toggled``
            return
        self._keys_active = on
        if on:
            for i, key in enumerate(KEYS, 1):
                self.viewer.bind_key(key, self._make_handler(i), overwrite=True)
            for layer in _key_layers(self.viewer):
                self._bind_layer(layer)
        else:
            _unbind_keys(self.viewer)
        self._update_keys_label()

    def _bind_layer(self, layer) -> None:
        for i, key in enumerate(KEYS, 1):
            layer.bind_key(key, self._make_handler(i), overwrite=True)

    def _bind_layer_keys(self, event) -> None:
        from napari.layers import Image, Labels

        if self._keys_active and isinstance(event.value, Image | Labels):
            self._bind_layer(event.value)


def _unbind_keys(viewer) -> None:
    """Remove the Annotate key bindings from the viewer and its image layers (napari's own
    bindings answer again). No reference to the widget: it also runs when the widget is gone."""
    from napari.utils.key_bindings import coerce_keybinding

    for owner in [viewer, *_key_layers(viewer)]:
        for key in KEYS:
            func = owner.keymap.get(coerce_keybinding(key))
            if getattr(func, "__name__", "").startswith("microclf_assign_class_"):
                owner.bind_key(key, None)


def _key_layers(viewer) -> list:
    """The layers whose own 1-9 shortcuts the Annotate keys replace while on: the image
    layers, and the Labels layers (whose 1-6 choose painting modes) for objects."""
    from napari.layers import Labels

    return [*_layers.image_layers(viewer), *(x for x in viewer.layers if isinstance(x, Labels))]
