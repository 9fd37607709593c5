"""Small layout pieces the widgets share."""

from __future__ import annotations

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QLineEdit, QPushButton, QWidget


def folder_row(edit: QLineEdit, title: str, parent: QWidget) -> QHBoxLayout:
    """``edit`` with a Browse... button; a picked folder fills it and emits editingFinished,
    so the widget reacts as if the user had typed it."""
    row = QHBoxLayout()
    row.addWidget(edit, 1)
    browse = QPushButton("Browse...")

    def pick():
        path = QFileDialog.getExistingDirectory(parent, title, edit.text() or ".")
        if path:
            edit.setText(path)
            edit.editingFinished.emit()

    browse.clicked.connect(pick)
    row.addWidget(browse)
    return row
