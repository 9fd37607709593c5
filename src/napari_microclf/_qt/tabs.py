"""One dock for the whole loop: Annotate, Train, Predict, Review errors and Label next as
tabs (the manifest's "Microscopy Classifier" entry). Each widget docked alone gets a sliver
of the height when three or more share the side; as tabs each gets all of it."""

from __future__ import annotations

from qtpy.QtWidgets import QTabWidget

from .annotate import AnnotateWidget
from .label_next import LabelNextWidget
from .predict import PredictWidget
from .review import ReviewWidget
from .train import TrainWidget


class MicroclfWidget(QTabWidget):
    """The five widgets as tabs; ``annotate``, ``train``, ``predict``, ``review`` and
    ``label_next`` are the widgets themselves."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.annotate = AnnotateWidget(napari_viewer)
        self.train = TrainWidget(napari_viewer)
        self.predict = PredictWidget(napari_viewer)
        self.review = ReviewWidget(napari_viewer)
        self.label_next = LabelNextWidget(napari_viewer)
        for widget, title in (
            (self.annotate, "Annotate"),
            (self.train, "Train"),
            (self.predict, "Predict"),
            (self.review, "Review errors"),
            (self.label_next, "Label next"),
        ):
            self.addTab(widget, title)
        self.setMinimumWidth(420)
