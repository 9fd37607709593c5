"""Class probabilities along a classified stack, docked under the viewer.

One line per class (x = page, y = probability), the confidence threshold dashed, a vertical
marker on the page the dims slider shows, and a one-line summary of the stack (pages per
label, mean confidence). Linked both ways with the slider: the marker follows it, a click on
the plot moves it (:meth:`StackPlot.click_page`).

The plot reads the Predict widget's results (``owner.results``, ``owner.class_names``,
``owner.label(pred)``, ``owner.go_to_page(name, page)``); it shows the active classified
stack and keeps the last one while a layer that is not a classified stack is active.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from matplotlib.ticker import MaxNLocator
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from . import _layers
from ._plots import Canvas

# class colours (matplotlib's tab10, readable on napari's dark and light backgrounds)
COLOURS = (
    "#4ea8ff",
    "#ffa640",
    "#5fbf3f",
    "#ff6f6f",
    "#a37bff",
    "#c09060",
    "#ff7fd0",
    "#909090",
    "#c0c030",
    "#30c0c0",
)


def summary(preds, labels: list[str], class_names: list[str]) -> str:
    """'12 pages: 7 fragmented, 5 round; mean confidence 0.94' (the labels as shown, so
    'uncertain' and 'unfamiliar' pages are counted as such)."""
    counts = Counter(labels)
    order = [c for c in class_names if counts[c]] + sorted(
        c for c in counts if c not in class_names
    )
    mean = float(np.mean([p.confidence for p in preds])) if preds else 0.0
    n = len(preds)
    return (
        f"{n} page{'' if n == 1 else 's'}: "
        + ", ".join(f"{counts[c]} {c}" for c in order)
        + f"; mean confidence {mean:.2f}"
    )


class ProbabilityCanvas(Canvas):
    """The probability lines and the slider marker (``marker`` is the vertical line)."""

    def __init__(self):
        super().__init__(6.0, 2.2)
        self.ax = None
        self.marker = None
        self.plot([], {}, None, "")

    def plot(
        self,
        pages,
        probabilities: dict[str, list[float]],
        threshold: float | None,
        title: str,
        ylabel: str = "probability",
    ) -> None:
        """One line per class; ``ylabel`` other than probability (objects per page): the
        y axis fits the values instead of [0, 1]."""
        self._args = (pages, probabilities, threshold, title, ylabel)
        p = self.palette
        page = self.marker_page()
        fig = self.figure
        fig.clear()
        ax = self.ax = fig.subplots()
        self._style(ax, title)
        for i, (name, values) in enumerate(probabilities.items()):
            ax.plot(pages, values, "o-", ms=3, lw=1.2, color=COLOURS[i % len(COLOURS)], label=name)
        if threshold:
            ax.axhline(threshold, color=p.grid, linestyle="--", lw=1, gid="threshold")
        if ylabel == "probability":
            ax.set_ylim(-0.03, 1.03)
        else:
            top = max((max(v) for v in probabilities.values() if len(v)), default=1)
            ax.set_ylim(-0.5, top * 1.08 + 0.5)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("page", color=p.fg, fontsize=9)
        ax.set_ylabel(ylabel, color=p.fg, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(pages):
            ax.set_xlim(-0.5, max(pages) + 0.5)
            self._legend(ax, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
        else:
            ax.text(
                0.5,
                0.5,
                "classify a stack (Run) to see its pages here",
                color=p.fg,
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=9,
            )
        self.marker = ax.axvline(0, color=p.fg, lw=1.5, gid="slider", visible=False)
        if page is not None:  # drawn again (a theme change): the marker stays where it was
            self.move_marker(page)
        self.draw_idle()

    def marker_page(self) -> int | None:
        """The page the slider marker is on (None: hidden)."""
        if self.marker is None or not self.marker.get_visible():
            return None
        return int(self.marker.get_xdata()[0])

    def move_marker(self, page: int | None) -> None:
        if self.marker is None:
            return
        self.marker.set_visible(page is not None)
        if page is not None:
            self.marker.set_xdata([page, page])
        self.draw_idle()


class StackPlot(QWidget):
    """Probabilities per page of the active classified stack (for objects: the objects of each
    class per page), linked with the dims slider.

    ``layer`` is the plotted layer's name (None: nothing plotted), ``marker_page`` the page
    the marker is on, ``summary`` the summary line.
    """

    def __init__(self, viewer, owner):
        super().__init__()
        self.viewer = viewer
        self.owner = owner
        self.layer: str | None = None
        self.marker_page: int | None = None
        self.canvas = ProbabilityCanvas()
        self.canvas.follow(viewer)
        self.canvas.mpl_connect("button_press_event", self._on_click)
        self.canvas.setToolTip("Click a page to show it (moves the slider).")
        self.summary_label = QLabel("")
        self.summary_label.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 2, 4, 2)
        layout.addWidget(self.summary_label)
        layout.addWidget(self.canvas, 1)
        self.viewer.dims.events.current_step.connect(self._follow_slider)
        self.viewer.layers.selection.events.active.connect(self._follow_active)
        self.viewer.layers.events.removed.connect(self._follow_active)

    @property
    def summary(self) -> str:
        return self.summary_label.text()

    def _objects(self, name) -> bool:
        """``name``'s objects are shown (the last run was of objects) and it is a stack."""
        objects = self.owner.objects
        return (
            objects.showing
            and name in objects.results
            and name in self.viewer.layers
            and _layers.n_pages(self.viewer.layers[name]) > 1
        )

    def _stack(self, name) -> bool:
        if self._objects(name):
            return True
        return (
            name in self.owner.results
            and name in self.viewer.layers
            and len(self.owner.results[name]) > 1
        )

    def _active_stack(self) -> str | None:
        """The active layer's classified stack (the image of an active label or heatmap)."""
        active = self.viewer.layers.selection.active
        if active is None:
            return None
        meta = active.metadata.get("microclf", {}) if isinstance(active.metadata, dict) else {}
        for name in (active.name, meta.get("image_layer") if isinstance(meta, dict) else None):
            if self._stack(name):
                return name
        return None

    def _follow_active(self, *_) -> None:
        name = self._active_stack()
        if name is not None and name != self.layer:
            self.plot_layer(name)
        elif self.layer is not None and not self._stack(self.layer):
            self.plot_layer(name)  # the plotted stack was removed (or reclassified as 2D)

    def refresh(self) -> None:
        """Replot after new results, a threshold change or a rename: the active classified
        stack, else the one shown, else the first classified stack."""
        name = self._active_stack()
        if name is None:
            shown = [*self.owner.objects.results, *self.owner.results]
            name = (
                self.layer
                if self._stack(self.layer)
                else next((n for n in shown if self._stack(n)), None)
            )
        self.plot_layer(name)

    def plot_layer(self, name: str | None) -> None:
        """Plot classified stack ``name`` (None or an unknown name: an empty plot): its
        probabilities page by page, or for objects its objects of each class per page."""
        if name is not None and self._objects(name):
            self._plot_objects(name)
            return
        if name is None or name not in self.owner.results or name not in self.viewer.layers:
            self.layer = None
            self.summary_label.setText("")
            self.canvas.plot([], {}, None, "Probabilities along the stack")
            self.marker_page = None
            return
        preds = self.owner.results[name]
        self.layer = name
        pages = [p.page for p in preds]
        classes = list(self.owner.class_names) or list(preds[0].probabilities)
        probs = {c: [p.probabilities.get(c, np.nan) for p in preds] for c in classes}
        text = summary(preds, [self.owner.label(p) for p in preds], classes)
        self.summary_label.setText(f"{name}: {text}")
        self.canvas.plot(pages, probs, self.owner.threshold.value(), name)
        self._follow_slider()

    def _plot_objects(self, name: str) -> None:
        """The objects of each class (and uncertain, unfamiliar) on each page of ``name``."""
        objects = self.owner.objects
        preds = objects.results[name]
        n = _layers.n_pages(self.viewer.layers[name])
        labels = [objects.label(p) for p in preds]
        order = [*self.owner.class_names, "uncertain", "unfamiliar"]
        shown = [c for c in order if c in self.owner.class_names or c in labels]
        counts = {c: [0] * n for c in shown}
        for p, label in zip(preds, labels, strict=True):
            counts[label][p.page] += 1
        self.layer = name
        self.summary_label.setText(f"{name}: {len(preds)} objects on {n} pages")
        self.canvas.plot(list(range(n)), counts, None, f"{name}: objects per page", "objects")
        self._follow_slider()

    def _follow_slider(self, *_) -> None:
        page = None
        if self.layer is not None and self.layer in self.viewer.layers:
            layer = self.viewer.layers[self.layer]
            page = _layers.flat_page(layer, _layers.page_in_view(self.viewer, layer))
        self.marker_page = page
        self.canvas.move_marker(page)

    def click_page(self, page: int) -> None:
        """Show ``page`` of the plotted stack: the slider moves (and the marker with it)."""
        if self.layer is None:
            return
        n = len(self.owner.results.get(self.layer, ()))
        self.owner.go_to_page(self.layer, int(np.clip(page, 0, max(n - 1, 0))))

    def _on_click(self, event) -> None:
        if event.inaxes is self.canvas.ax and event.xdata is not None:
            self.click_page(round(event.xdata))
