"""Matplotlib canvases for dock widgets: ``FigureCanvasQTAgg`` + ``Figure`` (no pyplot),
coloured like napari's dark theme, drawn in the main thread only."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from qtpy.QtCore import Signal

BG, FG, GRID = "#262930", "#d6d6d6", "#414851"
TRAIN, VAL, LR = "#4ea8ff", "#ffa640", "#9fdf6f"
PHASE = "#b0b0b0"


def phase_two_start(history: dict) -> int | None:
    """The first epoch (1-based) of fine-tuning's phase 2, from ``history["phase"]``."""
    phases = list(history.get("phase") or [])
    return phases.index(2) + 1 if 2 in phases else None


class Canvas(FigureCanvasQTAgg):
    def __init__(self, width: float = 4.0, height: float = 3.0, dpi: int = 80,
                 layout: str | None = "constrained"):
        self.figure = Figure(figsize=(width, height), dpi=dpi, facecolor=BG, layout=layout)
        super().__init__(self.figure)
        self.setMinimumHeight(int(height * dpi * 0.8))

    def _style(self, ax, title: str) -> None:
        ax.set_facecolor(BG)
        ax.set_title(title, color=FG, fontsize=10)
        ax.tick_params(colors=FG, labelsize=8)
        for s in ax.spines.values():
            s.set_color(GRID)
        ax.grid(True, color=GRID, linewidth=0.5)


class CurvesCanvas(Canvas):
    """Loss, accuracy and learning rate per epoch, training vs validation.

    When fine-tuning ran in two phases, a dashed line labelled "fine-tuning" separates the
    head's epochs from the fine-tuning epochs (at x = first phase-2 epoch - 0.5) in every
    panel; its label is in the line's ``gid``.
    """

    # Fixed margins in inches instead of the constrained layout, which doubles the cost of
    # every draw (0.19 s -> 0.42 s for this figure on a busy 2-core machine): the curves are
    # redrawn in the GUI thread after every epoch while the training thread competes for it.
    MARGINS = {"left": 0.72, "right": 0.15, "top": 0.28, "bottom": 0.45, "gap": 0.42}

    def __init__(self):
        super().__init__(4.0, 5.2, layout=None)
        self.plot({})

    def _fit(self) -> None:
        """Margins that stay the same in inches whatever the canvas' size."""
        m = self.MARGINS
        w, h = self.figure.get_size_inches()
        axes_h = max((h - m["top"] - m["bottom"] - 2 * m["gap"]) / 3, 0.1)
        bottom = min(m["bottom"] / h, 0.3)
        self.figure.subplots_adjust(left=min(m["left"] / w, 0.4),
                                    right=max(1 - m["right"] / w, 0.6),
                                    top=max(1 - m["top"] / h, bottom + 0.3), bottom=bottom,
                                    hspace=m["gap"] / axes_h)

    def resizeEvent(self, event):  # noqa: N802 - Qt's name
        super().resizeEvent(event)  # sets the figure's new size, then asks for a draw
        self._fit()

    def plot(self, history: dict) -> None:
        fig = self.figure
        fig.clear()
        axes = fig.subplots(3, 1, sharex=True)
        panels = (("Loss (lower is better)", "loss", "val_loss"),
                  ("Accuracy (higher is better)", "accuracy", "val_accuracy"),
                  ("Learning rate", "lr", None))
        marker = phase_two_start(history)
        for ax, (title, key, val_key) in zip(axes, panels, strict=True):
            self._style(ax, title)
            y = history.get(key, [])
            x = np.arange(1, len(y) + 1)
            if len(y):
                label = "learning rate" if key == "lr" else "training"
                ax.plot(x, y, "o-", color=LR if key == "lr" else TRAIN, ms=3, label=label)
            if val_key and history.get(val_key):
                v = history[val_key]
                ax.plot(np.arange(1, len(v) + 1), v, "o-", color=VAL, ms=3, label="validation")
            if key == "lr" and len(y):
                ax.set_yscale("log")
            if key == "accuracy":
                ax.set_ylim(-0.02, 1.02)
            if marker is not None:
                x0 = marker - 0.5
                ax.axvline(x0, color=PHASE, linestyle="--", linewidth=1, gid="fine-tuning")
                ax.text(x0, 0.96, " fine-tuning", color=PHASE, fontsize=7, ha="left",
                        va="top", transform=ax.get_xaxis_transform())
            if len(y) and val_key:
                ax.legend(fontsize=7, facecolor=BG, edgecolor=GRID, labelcolor=FG)
        axes[-1].set_xlabel("epoch", color=FG, fontsize=9)
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.5
        self._fit()
        if not history:
            axes[0].text(0.5, 0.5, "curves appear after the first epoch", color=FG,
                         ha="center", va="center", transform=axes[0].transAxes, fontsize=9)
        self.draw_idle()


class ConfusionCanvas(Canvas):
    """Confusion matrix: rows the true class, columns the predicted class, with counts.

    A click on a cell emits ``cell_clicked(true, predicted)`` (class names): the error review
    opens that cell's images.
    """

    cell_clicked = Signal(str, str)

    def __init__(self, title: str = "Confusion matrix (test images)"):
        super().__init__(4.0, 4.0)
        self.title = title
        self.class_names: list[str] = []
        self._ax = None
        self.mpl_connect("button_press_event", self._on_press)

    def _on_press(self, event) -> None:
        if event.inaxes is not self._ax or self._ax is None or event.xdata is None:
            return
        i, j = int(round(event.ydata)), int(round(event.xdata))
        k = len(self.class_names)
        if 0 <= i < k and 0 <= j < k:
            self.click_cell(self.class_names[i], self.class_names[j])

    def click_cell(self, true: str, predicted: str) -> None:
        self.cell_clicked.emit(true, predicted)

    def cell_center(self, true: str, predicted: str) -> tuple[float, float]:
        """Display coordinates (pixels, origin bottom left) of a cell's centre."""
        i, j = self.class_names.index(true), self.class_names.index(predicted)
        x, y = self._ax.transData.transform((j, i))
        return float(x), float(y)

    def plot(self, matrix, class_names) -> None:
        fig = self.figure
        fig.clear()
        ax = self._ax = fig.subplots()
        self.class_names = list(class_names)
        self._style(ax, self.title)
        ax.grid(False)
        cm = np.asarray(matrix, dtype=int)
        k = len(class_names)
        ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(int(cm.max()), 1))
        ax.set_xticks(range(k), class_names, rotation=30, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted class", color=FG, fontsize=9)
        ax.set_ylabel("true class", color=FG, fontsize=9)
        half = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if cm[i, j] > half else "black")
        self.setToolTip("Click a cell to review its images in the viewer (Review widget).")
        self.draw_idle()
