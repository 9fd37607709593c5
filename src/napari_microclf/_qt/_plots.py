"""Matplotlib canvases for dock widgets: ``FigureCanvasQTAgg`` + ``Figure`` (no pyplot),
drawn in the main thread only, coloured by napari's theme: :meth:`Canvas.follow` reads
``viewer.theme`` (``napari.utils.theme.get_theme``) and redraws on ``viewer.events.theme``,
as napari-matplotlib's ``base.py`` does."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator
from qtpy.QtCore import Signal

TRAIN, VAL, LR = "#4ea8ff", "#ffa640", "#6fbf3f"


@dataclass(frozen=True)
class Palette:
    """A figure's colours: background, text (titles, labels, ticks), grid and spines, and
    the lines drawn over the data (the fine-tuning marker, the slider)."""

    bg: str = "#262930"
    fg: str = "#d6d6d6"
    grid: str = "#414851"
    mark: str = "#b0b0b0"


DARK = Palette()


def palette(theme: str) -> Palette:
    """The colours of napari's theme ``theme`` ("dark", "light", "system" or a custom one)."""
    from napari.utils.theme import get_theme

    t = get_theme(theme)
    return Palette(
        bg=t.background.as_hex(), fg=t.text.as_hex(), grid=t.primary.as_hex(), mark=t.icon.as_hex()
    )


def phase_two_start(history: dict) -> int | None:
    """The first epoch (1-based) of fine-tuning's phase 2, from ``history["phase"]``."""
    phases = list(history.get("phase") or [])
    return phases.index(2) + 1 if 2 in phases else None


def cell_colormap(p: Palette):
    """Counts from the theme's background (0) to a full blue (the most): a dark theme's
    matrix is dark where nothing is, not a white patch."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("counts", [p.bg, "#2f7fd6"])


def text_on(colour) -> str:
    """Black or white, whichever reads better on ``colour``."""
    r, g, b = colour[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


class Canvas(FigureCanvasQTAgg):
    """A figure coloured by ``self.palette``; ``plot(*args)`` draws it, and a theme change
    draws the last plot again in the new colours."""

    def __init__(
        self,
        width: float = 4.0,
        height: float = 3.0,
        dpi: int = 80,
        layout: str | None = "constrained",
    ):
        self.palette = DARK
        self.figure = Figure(figsize=(width, height), dpi=dpi, facecolor=DARK.bg, layout=layout)
        super().__init__(self.figure)
        self.setMinimumHeight(int(height * dpi * 0.8))
        self._args: tuple | None = None  # the last plot's arguments (redrawn on a theme)
        self._followed = None  # a weak reference to the viewer whose theme this follows
        from napari import current_viewer

        self.follow(current_viewer())  # widgets that know their viewer call follow(viewer)

    def follow(self, viewer) -> None:
        """Take ``viewer``'s theme now and whenever it changes (until this canvas is gone)."""
        if viewer is None or not hasattr(viewer, "events"):
            return
        if self._followed is not None and self._followed() is viewer:
            return
        self._followed = weakref.ref(viewer)
        self.set_theme(viewer.theme)
        ref, viewer_ref = weakref.ref(self), self._followed
        emitter = viewer.events.theme

        def on_theme(event):
            canvas = ref()
            try:
                if canvas is not None and canvas._followed() is viewer_ref():
                    canvas.objectName()  # raises RuntimeError once Qt deleted the canvas
                    canvas.set_theme(event.value)
                    return
            except RuntimeError:
                pass
            emitter.disconnect(on_theme)

        emitter.connect(on_theme)

    def set_theme(self, theme: str) -> None:
        """Colour the figure by napari's theme ``theme`` and draw the last plot again."""
        self.palette = palette(theme)
        self.figure.set_facecolor(self.palette.bg)
        if self._args is not None:
            self.plot(*self._args)
        else:
            self.draw_idle()

    def plot(self, *args) -> None:  # each canvas draws its own figure
        raise NotImplementedError

    def draw_idle(self) -> None:
        """Draw soon, or when shown: a canvas on a hidden tab (the curves while the Log tab
        is read) is not drawn in the GUI thread for nothing."""
        if not self.isVisible():
            self._stale = True
            return
        super().draw_idle()

    def showEvent(self, event) -> None:
        super().showEvent(event)
        if getattr(self, "_stale", False):
            self._stale = False
            self.draw_idle()

    def draw(self) -> None:
        """Draw, unless Qt deleted the canvas meanwhile (a ``draw_idle`` queued before its
        dock closed, or a theme change on the way)."""
        try:
            self.objectName()
        except RuntimeError:
            return
        super().draw()

    def _style(self, ax, title: str) -> None:
        p = self.palette
        ax.set_facecolor(p.bg)
        ax.set_title(title, color=p.fg, fontsize=10)
        ax.tick_params(colors=p.fg, labelsize=8)
        for s in ax.spines.values():
            s.set_color(p.grid)
        ax.grid(True, color=p.grid, linewidth=0.5)

    def _legend(self, ax, **kwargs) -> None:
        p = self.palette
        ax.legend(facecolor=p.bg, edgecolor=p.grid, labelcolor=p.fg, **kwargs)


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
        self.figure.subplots_adjust(
            left=min(m["left"] / w, 0.4),
            right=max(1 - m["right"] / w, 0.6),
            top=max(1 - m["top"] / h, bottom + 0.3),
            bottom=bottom,
            hspace=m["gap"] / axes_h,
        )

    def resizeEvent(self, event):
        super().resizeEvent(event)  # sets the figure's new size, then asks for a draw
        self._fit()

    def _panels(self) -> list:
        """The three panels, emptied. They are made once and kept: their tick marks, made
        anew for a new figure, were most of the cost of a redraw after every epoch."""
        fig = self.figure
        if len(fig.axes) != 3 or getattr(self, "_theme_of_axes", None) is not self.palette:
            fig.clear()
            fig.subplots(3, 1, sharex=True)
            self._theme_of_axes = self.palette
        for ax in fig.axes:
            for artist in [*ax.lines, *ax.texts]:
                artist.remove()
            if ax.get_legend() is not None:
                ax.get_legend().remove()
            ax.relim()
        return list(fig.axes)

    def plot(self, history: dict) -> None:
        self._args = (history,)
        p = self.palette
        axes = self._panels()
        panels = (
            ("Loss (lower is better)", "loss", "val_loss"),
            ("Accuracy, validation macro-F1 (higher is better)", "accuracy", "val_accuracy"),
            ("Learning rate", "lr", None),
        )
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
            if key == "accuracy" and history.get("val_macro_f1"):  # what imbalance cannot fool
                f1 = history["val_macro_f1"]
                ax.plot(np.arange(1, len(f1) + 1), f1, "--", color=VAL, lw=1, label="val. macro-F1")
            if key == "lr":
                scale = "log" if len(y) else "linear"
                if ax.get_yscale() != scale:
                    ax.set_yscale(scale)
                    ax.yaxis.set_minor_locator(NullLocator())  # its many ticks
            if key == "accuracy":
                ax.set_ylim(-0.02, 1.02)
            if marker is not None:
                x0 = marker - 0.5
                ax.axvline(x0, color=p.mark, linestyle="--", linewidth=1, gid="fine-tuning")
                ax.text(
                    x0,
                    0.96,
                    " fine-tuning",
                    color=p.mark,
                    fontsize=7,
                    ha="left",
                    va="top",
                    transform=ax.get_xaxis_transform(),
                )
            if len(y) and val_key:
                self._legend(ax, fontsize=7)
        axes[-1].set_xlabel("epoch", color=p.fg, fontsize=9)
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.5
        self._fit()
        if not history:
            axes[0].text(
                0.5,
                0.5,
                "curves appear after the first epoch",
                color=p.fg,
                ha="center",
                va="center",
                transform=axes[0].transAxes,
                fontsize=9,
            )
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
        self._args = (matrix, class_names)
        p = self.palette
        fig = self.figure
        fig.clear()
        ax = self._ax = fig.subplots()
        self.class_names = list(class_names)
        self._style(ax, self.title)
        ax.grid(False)
        cm = np.asarray(matrix, dtype=int)
        k = len(class_names)
        cmap = cell_colormap(p)
        image = ax.imshow(cm, cmap=cmap, vmin=0, vmax=max(int(cm.max()), 1) if cm.size else 1)
        # thin lines between the cells: an empty cell has the background's colour
        ax.set_xticks(np.arange(k + 1) - 0.5, minor=True)
        ax.set_yticks(np.arange(k + 1) - 0.5, minor=True)
        ax.grid(True, which="minor", color=p.grid, linewidth=0.8)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(k), class_names, rotation=30, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted class", color=p.fg, fontsize=9)
        ax.set_ylabel("true class", color=p.fg, fontsize=9)
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    str(cm[i, j]),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color=text_on(image.cmap(image.norm(cm[i, j]))),
                )
        self.setToolTip("Click a cell to review its images in the viewer (Review widget).")
        self.draw_idle()
