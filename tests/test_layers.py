"""The core's layers only look down, and its modules import one another without cycles.

Each module of ``src/napari_microclf/core`` has a place in :data:`LAYERS` (the table that
``core/__init__.py``'s docstring gives in words). A module imports modules of its own layer
or of a lower one, never a higher one; in the layer where training and inference stand side
by side, a module imports only its own side. Imports are read from the source (``ast``),
at module level and inside functions alike, so an import hidden in a function counts as
much as one at the top. The core imports neither Qt nor napari, nor ``cli``/``_qt``: they
are the layer above it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "napari_microclf"
CORE = PACKAGE / "core"

# Lowest first. A new module of the core must be placed here (test_every_module_has_a_layer).
LAYERS: dict[str, set[str]] = {
    "foundations": {"errors", "settings", "files", "lock", "device"},
    "pages and class folders": {"images", "dataset", "pipeline", "sample", "review", "objects"},
    "networks, engines, bundles, the feature cache and the formats both sides share": {
        "lite0",
        "model",
        "bundle",
        "engine",
        "features",
        "finetune",
        "familiar",
        "tta",
        "report",
        "metrics",
        "train_config",
        "predict_options",
        "results",
        "csv_format",
    },
    "training and inference, side by side": {
        "train",
        "preflight",
        "report_html",
        "predictor",
        "evaluate",
        "folder_runs",
        "predict",
        "predict_objects",
        "explain",
        "cluster",
        "export",
    },
    "workflows that use both (label-next's retrain, features on a cluster)": {
        "active",
        "features_cluster",
    },
}
SIDE_BY_SIDE = 3  # the layer of SIDES: there a module imports only modules of its own side
SIDES: dict[str, set[str]] = {
    "training": {"train", "preflight", "report_html"},
    "inference": {
        "predictor",
        "evaluate",
        "folder_runs",
        "predict",
        "predict_objects",
        "explain",
        "cluster",
    },
    "bundle tools": {"export"},
}
LAYER_OF = {m: i for i, mods in enumerate(LAYERS.values()) for m in mods}
SIDE_OF = {m: side for side, mods in SIDES.items() for m in mods}

# What the core may not import: the GUI toolkits and napari; of the package above the core
# (``from .. import x``, ``..cli``, ``.._qt``, ...) only ``_version``, which imports nothing.
GUI = {"qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy"}
ALLOWED_ABOVE = {"_version"}


def _core_modules() -> list[str]:
    return sorted(p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


def _imports(path: Path) -> list[tuple[str, int, bool, int, str]]:
    """``(module, level, in_function, line, text)`` of every import in ``path``: ``module``
    as written (``level`` dots before it), for ``from . import a, b`` one entry per name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                out.extend((a.name, 0, in_function, child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                text = "." * child.level + (child.module or "")
                if child.module is None:  # from . import a, b: modules a and b
                    out.extend(
                        (a.name, child.level, in_function, child.lineno, text) for a in child.names
                    )
                else:
                    out.append((child.module, child.level, in_function, child.lineno, text))
            visit(child, inner)

    visit(tree, False)
    return out


def _core_edges() -> list[tuple[str, str, bool, int]]:
    """``(importer, imported, in_function, line)`` for every import between core modules."""
    edges = []
    for name in _core_modules():
        for module, level, in_function, line, _ in _imports(CORE / f"{name}.py"):
            if level == 1:
                edges.append((name, module.split(".")[0], in_function, line))
            elif level == 0 and module.startswith("napari_microclf.core."):
                edges.append((name, module.split(".")[2], in_function, line))
    return edges


def test_every_module_has_a_layer():
    modules = set(_core_modules())
    placed = [m for mods in LAYERS.values() for m in mods]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert sorted(modules - set(placed)) == [], "place the new module in LAYERS (and __init__)"
    assert sorted(set(placed) - modules) == [], "LAYERS names a module that is gone"
    assert set(SIDE_OF) == {m for m, i in LAYER_OF.items() if i == SIDE_BY_SIDE}


def test_the_core_docstring_names_every_module_in_its_layer():
    doc = ast.get_docstring(ast.parse((CORE / "__init__.py").read_text(encoding="utf-8")))
    for i, mods in enumerate(LAYERS.values()):
        paragraph = doc.split(f"Layer {i}", 1)[1].split(f"Layer {i + 1}", 1)[0]
        for m in mods:
            assert f"``{m}``" in paragraph, f"core/__init__.py: {m} is not in layer {i}"


def test_imports_only_look_down_and_sides_stay_apart():
    wrong = []
    for a, b, in_function, line in _core_edges():
        if a not in LAYER_OF or b not in LAYER_OF:
            continue  # said by test_every_module_has_a_layer
        where = f"core/{a}.py:{line} imports .{b}" + (" (in a function)" if in_function else "")
        if LAYER_OF[b] > LAYER_OF[a]:
            wrong.append(f"{where}: layer {LAYER_OF[b]} above its own {LAYER_OF[a]}")
        elif LAYER_OF[a] == LAYER_OF[b] == SIDE_BY_SIDE and SIDE_OF[a] != SIDE_OF[b]:
            wrong.append(f"{where}: {SIDE_OF[a]} imports {SIDE_OF[b]}; move what both need down")
    assert wrong == []


def test_no_import_cycles_between_core_modules():
    graph: dict[str, set[str]] = {m: set() for m in _core_modules()}
    for a, b, _, _ in _core_edges():
        if a != b:
            graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_our_own_modules_are_imported_at_the_top():
    """Function-local imports are for heavy optional dependencies (TensorFlow, OpenVINO,
    Dask), never to hide a cycle between two of our modules."""
    edges = _core_edges()
    local = [f"core/{a}.py:{line} imports .{b}" for a, b, inner, line in edges if inner]
    for name in _core_modules():
        for _, level, in_function, line, text in _imports(CORE / f"{name}.py"):
            if in_function and level >= 2:
                local.append(f"core/{name}.py:{line} imports {text}")
    assert local == []


def test_the_core_imports_neither_qt_napari_cli_nor_widgets():
    wrong = []
    for name in _core_modules():
        for module, level, _, line, text in _imports(CORE / f"{name}.py"):
            ours_above = module.startswith(("napari_microclf.cli", "napari_microclf._"))
            if level == 0 and (module.split(".")[0] in GUI or ours_above):
                wrong.append(f"core/{name}.py:{line} imports {module}")
            elif level >= 2 and text.lstrip(".").split(".")[0] not in ALLOWED_ABOVE:
                wrong.append(f"core/{name}.py:{line} imports {text} {module}")
    assert wrong == []


def test_cli_and_widgets_are_above_the_core():
    """``cli.py`` and ``_qt/`` use the core; nothing of the core uses them (checked above),
    and the widgets reach the core only through ``core`` modules that exist."""
    modules = set(_core_modules())
    used = set()
    for path in [PACKAGE / "cli.py", *sorted((PACKAGE / "_qt").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                parts = node.module.split(".")
                if parts[0] == "core":
                    named = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
                    assert set(named) <= modules, f"{path.name}:{node.lineno} imports {named}"
                    used.update(named)
    assert {"train", "predictor", "evaluate"} <= used  # cli.py and _qt/ stand on the core


@pytest.mark.parametrize(
    "modules",
    [
        "napari_microclf",
        "napari_microclf.cli",
        ",".join(f"napari_microclf.core.{m}" for m in sorted(LAYER_OF)),
    ],
)
def test_importing_the_core_imports_no_tensorflow_qt_or_napari(modules):
    code = (
        "import sys\n"
        f"for m in {modules!r}.split(','):\n"
        "    __import__(m)\n"
        "heavy = ('tensorflow', 'keras', 'openvino', 'nncf', 'dask', 'distributed', 'onnx',\n"
        "         'qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'napari', 'magicgui')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
