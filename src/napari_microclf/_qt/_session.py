"""State the widgets share within one napari session.

Train announces the bundle it wrote (``bundle_trained``) and Predict preselects it; the
Annotate widget's dataset folder becomes Train's (``dataset_changed``) until the user sets
Train's own. Widgets that move or add examples outside Annotate (error review, label next)
announce it (``dataset_edited``) and Annotate re-reads its counts.
"""

from __future__ import annotations

from psygnal import Signal


class Session:
    bundle_trained = Signal(str)
    dataset_changed = Signal(str)
    dataset_edited = Signal(str)

    def __init__(self):
        self.last_bundle: str | None = None
        self.dataset: str | None = None

    def set_bundle(self, path) -> None:
        self.last_bundle = str(path)
        self.bundle_trained.emit(self.last_bundle)

    def set_dataset(self, path) -> None:
        self.dataset = str(path)
        self.dataset_changed.emit(self.dataset)

    def edited(self, path) -> None:
        """Examples of the dataset ``path`` were moved, added or trashed."""
        self.dataset_edited.emit(str(path))


SESSION = Session()


def connect_widget(signal, widget, slot: str) -> None:
    """Connect ``signal`` to ``widget.<slot>`` until the widget (or its Qt object) is gone."""
    import weakref

    ref = weakref.ref(widget)

    def call(*args):
        w = ref()
        try:
            if w is not None:
                w.objectName()  # raises RuntimeError once Qt deleted the widget
                getattr(w, slot)(*args)
                return
        except RuntimeError:
            pass
        signal.disconnect(call)

    signal.connect(call)
