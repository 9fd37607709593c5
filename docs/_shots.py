"""What the screenshot scripts of docs/ share: waiting for a worker, letting Qt draw, saving
the window as docs/NAME.png."""

from __future__ import annotations

import time
from pathlib import Path

from qtpy.QtCore import QEventLoop, QTimer
from qtpy.QtWidgets import QApplication

DOCS = Path(__file__).parent


def wait(worker, timeout=600):
    """Run the event loop until ``worker`` finishes (or ``timeout`` seconds pass)."""
    loop = QEventLoop()
    worker.finished.connect(loop.quit)
    QTimer.singleShot(timeout * 1000, loop.quit)
    loop.exec_()


def pause(seconds=0.5):
    """Let Qt draw for ``seconds``."""
    t = time.time()
    while time.time() - t < seconds:
        QApplication.processEvents()


def save(viewer, name, width=1400):
    """The window as docs/NAME.png, ``width`` pixels wide."""
    path = DOCS / f"{name}.png"
    viewer.window._qt_window.grab().scaledToWidth(width).save(str(path), "PNG")
    print(f"{path}: {path.stat().st_size // 1024} KB")
