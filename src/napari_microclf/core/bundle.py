"""Model bundles: how a trained classifier is stored, swapped, restored and loaded.

A *bundle* is a folder with ``model.keras`` and ``microclf.json`` (``format``, class order,
preprocessing, backbone and weights, config, history, split, metrics, versions, and the
list of the bundle's own ``files``: ``split.json``, ``report.md``, ...). Anything else in
the folder (notes, figures, evaluation ``reports/``) is the user's and stays when a
retraining replaces the bundle's own files; the bundle they replace is kept in
``previous/`` (:func:`restore_previous` brings it back). The swap is journalled, so a run
killed half way is completed by the next command (:func:`repair_model_folder`). TensorFlow
and Keras are imported inside functions only.

A bundle also travels as one ``.zip`` (:func:`zip_bundle`); :func:`read_meta`,
:func:`load_bundle` and everything built on them (predict, evaluate) take the zip as they
take the folder: it is extracted once into a cache folder named by its SHA-256
(:func:`resolve_bundle_path`). A ``model.keras`` that the installed Keras cannot read (one
saved by another Keras version) is rebuilt from ``microclf.json`` and its weights loaded,
with a :class:`BundleVersionWarning`. Building the network is :mod:`.model`'s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._version import __version__
from . import settings
from .dataset import SPLIT_FILE
from .errors import BundleError, LockedError, OutputError, one_line
from .files import file_digest, mkstemp_for_user
from .images import PreprocessSpec
from .lock import MODEL_LOCK, PROCESS_START, is_locked, model_lock
from .model import B0, build_classifier
from .objects import model_crop_spec

MODEL_FILE = "model.keras"
META_FILE = "microclf.json"


class _LazyModel:
    """The ``model`` field of :class:`Bundle`: the Keras model, loaded by the bundle's
    ``loader`` on first use where the bundle was opened lazily."""

    def __get__(self, obj, objtype=None):
        if obj is None:  # the dataclass field's default
            return None
        model = obj.__dict__.get("_model")
        if model is None and obj.__dict__.get("loader") is not None:
            model = obj.__dict__["_model"] = obj.loader()
            obj.loader = None
        return model

    def __set__(self, obj, value) -> None:
        obj.__dict__["_model"] = value


@dataclass
class Bundle:
    """A model bundle: ``path`` its folder (for a zip: the folder it was extracted into),
    ``model`` the Keras model, ``meta`` its ``microclf.json``, ``source`` the .zip it was
    opened from, if any. ``loader``: load the Keras model on first use of ``model`` (a bundle
    that OpenVINO runs needs no TensorFlow until then)."""

    path: Path
    model: object = _LazyModel()
    meta: dict = field(default_factory=dict)
    source: Path | None = None
    loader: object = field(default=None, repr=False, compare=False)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def preprocess(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.meta["preprocessing"])


BUNDLE_FORMAT, BUNDLE_VERSION = "microclf-bundle", 1  # meta["format"]: "microclf-bundle/1"
PREVIOUS_DIR = "previous"  # the bundle before the last retraining (one generation)
JOURNAL_FILE = ".microclf-swap.json"  # present while a swap is under way
# A bundle's own files when its microclf.json does not list them (bundles before "files")
DEFAULT_FILES = (MODEL_FILE, META_FILE, "split.json", "report.json", "report.md", "report.html")
_TEMP_PREFIXES = (".incoming-", ".outgoing-", ".dropped-")
_HOOK = {"step": None}  # tests: called with a step name after each step of a swap


def _step(name: str) -> None:
    if _HOOK["step"] is not None:
        _HOOK["step"](name)


def bundle_files(folder: str | Path) -> list[str]:
    """The names of the bundle's own files present in ``folder`` (never the user's)."""
    folder = Path(folder)
    names = set(DEFAULT_FILES)
    try:
        listed = json.loads((folder / META_FILE).read_text()).get("files")
        if isinstance(listed, list):
            names |= {n for n in listed if isinstance(n, str) and _own_name(n)}
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(n for n in names if (folder / n).is_file())


def _own_name(name: str) -> bool:
    """A plain file name a bundle may own (no folders, nothing of ours)."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and name != PREVIOUS_DIR
        and not name.startswith(".microclf")
    )


def is_foreign_folder(out: Path) -> bool:
    """Whether folder ``out`` holds something and is no model folder: never written into
    (:func:`write_bundle` refuses it; the training's preflight says so at the start)."""
    if (out / META_FILE).exists() or (out / PREVIOUS_DIR).is_dir():
        return False
    return any(not _reserved(name) for name in os.listdir(out))


def _reserved(name: str) -> bool:

    return (
        name in (PREVIOUS_DIR, JOURNAL_FILE, MODEL_LOCK)
        or name.startswith(_TEMP_PREFIXES)
        or name.startswith(f".{JOURNAL_FILE}.")
    )


def _write_journal(out: Path, journal: dict) -> None:
    tmp = out / f".{JOURNAL_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(journal, indent=1))
    os.replace(tmp, out / JOURNAL_FILE)


def _run_swap(out: Path, journal: dict) -> None:
    """Carry a swap from the state its journal records to the end; every step can be
    repeated, so a swap killed at any instant is completed by running this again.

    ``moving-out``: the current bundle's own files go into ``.outgoing-<id>/``;
    ``moving-in``: the files of the incoming folder go into place;
    ``rotating``: ``.outgoing-<id>/`` becomes ``previous/`` (the older one is dropped);
    then the journal is removed, and the temporary folders with it.
    """
    sid = journal["id"]
    incoming = out / journal["incoming"]
    outgoing = out / f".outgoing-{sid}"
    dropped = out / f".dropped-{sid}"
    if journal["state"] == "moving-out":
        outgoing.mkdir(exist_ok=True)
        for name in journal["old"]:
            if (out / name).is_file():
                os.replace(out / name, outgoing / name)
                _step(f"out:{name}")
        journal = {**journal, "state": "moving-in"}
        _write_journal(out, journal)
        _step("moved-out")
    if journal["state"] == "moving-in":
        for name in journal["new"]:
            if (incoming / name).is_file():
                os.replace(incoming / name, out / name)
                _step(f"in:{name}")
        journal = {**journal, "state": "rotating"}
        _write_journal(out, journal)
        _step("moved-in")
    if outgoing.is_dir():
        if any(outgoing.iterdir()):
            if (out / PREVIOUS_DIR).exists():
                os.replace(out / PREVIOUS_DIR, dropped)
                _step("dropped")
            os.replace(outgoing, out / PREVIOUS_DIR)
            _step("rotated")
        else:
            outgoing.rmdir()
    (out / JOURNAL_FILE).unlink()
    _step("committed")
    for leftover in (dropped, incoming):
        if leftover.is_dir() and (leftover.name != PREVIOUS_DIR or not any(leftover.iterdir())):
            shutil.rmtree(leftover, ignore_errors=True)


def _swap(out: Path, incoming_name: str, new: list[str]) -> None:
    """Replace the bundle's own files in ``out`` by those in ``out/incoming_name``."""
    journal = {
        "id": uuid.uuid4().hex[:8],
        "incoming": incoming_name,
        "new": sorted(new),
        "old": bundle_files(out),
        "state": "moving-out",
    }
    _write_journal(out, journal)
    _step("journal")
    _run_swap(out, journal)


def repair_model_folder(out: str | Path) -> list[str]:
    """Complete an interrupted swap in model folder ``out`` and remove what killed runs left.

    - a journal (``.microclf-swap.json``): the swap it records is carried to its end (the
      new bundle was complete before the journal was written), so the folder holds the new
      bundle and ``previous/`` the one before;
    - ``.incoming-*``, ``.outgoing-*`` (empty) and ``.dropped-*`` folders of killed runs are
      removed;
    - beside ``out``, folders of the swap of microclf before 0.4 (``.OUT.old-*`` and
      ``.OUT.tmp-*``) older than this process: when ``out`` is missing the newest
      ``.OUT.old-*`` is restored as ``out``; the others are removed.

    Nothing is done while another process (or thread) holds the folder's lock: it may be in
    the middle of its swap. Returns one line per thing done.
    """
    out = Path(out).expanduser().resolve()
    done: list[str] = []
    parent = out.parent
    if parent.is_dir():  # the swap of earlier versions, beside the folder
        olds = sorted(parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        tmps = list(parent.glob(f".{out.name}.tmp-*"))
        olds = [p for p in olds if p.stat().st_mtime < PROCESS_START]
        tmps = [p for p in tmps if p.stat().st_mtime < PROCESS_START]
        if olds and not out.exists():
            olds.pop().rename(out)
            done.append(f"Restored {out} from an interrupted replacement.")
        for p in olds + tmps:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"Removed {p.name}, left by an interrupted training.")
    if not out.is_dir() or is_locked(out):
        return done
    names = os.listdir(out)
    if (
        JOURNAL_FILE not in names
        and not any(n.startswith(_TEMP_PREFIXES) for n in names)
        and not any(n.startswith(f".{JOURNAL_FILE}.") for n in names)
    ):
        return done
    try:
        with model_lock(out, "microclf repair"):
            journal_path = out / JOURNAL_FILE
            if journal_path.exists():
                try:
                    journal = json.loads(journal_path.read_text())
                except ValueError:  # killed while writing it: nothing was moved yet
                    journal = None
                if journal is None:
                    journal_path.unlink()
                else:
                    _run_swap(out, journal)
                    done.append(f"Completed the interrupted replacement of the model in {out}.")
            for p in out.iterdir():
                if p.is_file() and p.name.startswith(f".{JOURNAL_FILE}."):
                    p.unlink()  # a journal killed while it was written
                if p.is_dir() and p.name.startswith(_TEMP_PREFIXES):
                    if p.name.startswith(".outgoing-") and any(p.iterdir()):
                        continue  # never happens without a journal; keep what it holds
                    shutil.rmtree(p, ignore_errors=True)
                    done.append(f"Removed {p.name}, left by an interrupted run.")
    except LockedError:
        pass
    return done


def write_bundle(
    out: str | Path, model, meta: dict, extra_files: dict[str, str | bytes] | None = None
) -> Path:
    """Write a bundle into model folder ``out``, replacing only the bundle's own files.

    The new files are written into ``out/.incoming-<id>/``; then, recorded by a journal, the
    current bundle's own files move to ``out/previous/`` (the older ``previous/`` is dropped)
    and the new ones into place (:func:`repair_model_folder` completes a swap killed half
    way). Other files and folders in ``out`` (notes, figures, ``reports/``) stay. A folder
    at ``out`` that is not a model folder and not empty is never touched: a BundleError says
    to choose another. Holds the folder's lock (:func:`~.lock.model_lock`).
    """
    out = Path(out).expanduser().resolve()
    repair_model_folder(out)
    if out.exists() and not out.is_dir():
        raise BundleError(
            f"{out} is a file, not a folder; choose another output folder (nothing was written)"
        )
    if out.is_dir() and is_foreign_folder(out):
        raise BundleError(
            f"{out} exists and is not a microclf model folder; choose another "
            "output folder (nothing was written)"
        )
    extra = dict(extra_files or {})
    bad = [n for n in extra if not _own_name(n) or n in (MODEL_FILE, META_FILE)]
    if bad:
        raise ValueError(f"bundle files must be plain file names, got {bad}")
    files = sorted({MODEL_FILE, META_FILE, *extra})
    meta = {**meta, "files": files}
    with model_lock(out, "microclf write"):
        incoming = out / f".incoming-{uuid.uuid4().hex[:8]}"
        incoming.mkdir()
        try:
            model.save(incoming / MODEL_FILE)
            # what the derived files (the OpenVINO copy, familiarity.npz, the report) were
            # made from: a model.keras replaced later no longer matches (model_changed)
            meta["model_sha256"] = file_digest(incoming / MODEL_FILE, "sha256")
            for name, content in extra.items():  # text, or bytes (familiarity.npz)
                if isinstance(content, bytes):
                    (incoming / name).write_bytes(content)
                else:
                    (incoming / name).write_text(content, encoding="utf-8")
            (incoming / META_FILE).write_text(
                json.dumps(meta, indent=1, default=_json_default), encoding="utf-8"
            )
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        _step("incoming")
        _swap(out, incoming.name, files)
    return out


def model_sha256(folder: str | Path) -> str:
    """The SHA-256 of the bundle's ``model.keras`` (memoised by path, size and time)."""
    return file_digest(Path(folder) / MODEL_FILE, "sha256")


def model_changed(folder: str | Path, meta: dict) -> bool:
    """Whether ``model.keras`` is no longer the file the bundle was written with: its
    SHA-256 differs from the one in ``microclf.json``. Then the files derived from it (the
    OpenVINO copy, the familiarity description, the report) do not describe it. Bundles
    from before the record are taken as they are (False)."""
    recorded = meta.get("model_sha256")
    return isinstance(recorded, str) and recorded != model_sha256(folder)


def restore_previous(out: str | Path) -> dict:
    """Make ``out/previous/`` the active bundle again; the current one becomes ``previous/``
    (so restoring twice is back where it was). Returns the now active bundle's metadata.

    Raises a BundleError when there is no previous bundle, a LockedError while a training
    writes into the folder.
    """
    out = Path(out).expanduser().resolve()
    if out.is_file() and out.name in (MODEL_FILE, META_FILE):
        out = out.parent
    if is_zipped_bundle(out) and out.is_file():
        raise BundleError(
            f"{out} is a zipped model: it keeps no previous model; restore in "
            "the model folder it was made from"
        )
    repair_model_folder(out)
    if not out.is_dir():
        raise BundleError(f"model folder {out} does not exist; nothing to restore")
    previous = out / PREVIOUS_DIR
    if not (previous / META_FILE).is_file() or not (previous / MODEL_FILE).is_file():
        raise BundleError(
            f"{out} has no previous model to restore ({PREVIOUS_DIR}/ is made "
            "when a model folder is trained again); nothing was changed"
        )
    read_meta(previous)  # refuse a previous bundle this version cannot use
    with model_lock(out, "microclf restore"):
        names = sorted(n for n in os.listdir(previous) if (previous / n).is_file() and _own_name(n))
        _swap(out, PREVIOUS_DIR, names)
    return read_meta(out)


def has_previous(out: str | Path) -> bool:
    """Whether model folder ``out`` keeps a previous bundle that :func:`restore_previous`
    can bring back."""
    previous = Path(out).expanduser() / PREVIOUS_DIR
    return (previous / META_FILE).is_file() and (previous / MODEL_FILE).is_file()


def describe_bundle(meta: dict) -> str:
    """``trained 2024-05-01 10:02, efficientnet-lite0, test accuracy 91.2%, classes a, b``."""
    parts = []
    if meta.get("date"):
        parts.append("trained " + str(meta["date"])[:16].replace("T", " "))
    parts.append(str(meta.get("backbone") or B0))
    acc = (meta.get("metrics") or {}).get("accuracy")
    if isinstance(acc, (int, float)):
        parts.append(f"test accuracy {acc:.1%}")
    parts.append("classes " + ", ".join(map(str, meta.get("class_names", []))))
    return ", ".join(parts)


def _json_default(o):

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_meta(path: str | Path) -> dict:
    """Read and check ``microclf.json`` of a bundle folder (or of a zipped bundle)."""
    source = Path(path).expanduser()
    if not is_zipped_bundle(source):
        return _read_meta(source)
    folder = resolve_bundle_path(source)
    try:
        return _read_meta(folder)
    except BundleError as exc:  # name the zip, not the cache folder it was extracted into
        raise BundleError(
            str(exc)
            .replace(str(folder / META_FILE), f"{META_FILE} in {source}")
            .replace(str(folder), str(source))
        ) from exc


def _read_meta(path: Path) -> dict:
    if path.is_file() and path.name in (MODEL_FILE, META_FILE):
        path = path.parent
    repair_model_folder(path)
    _wait_for_swap(path)
    if not path.is_dir():
        raise BundleError(
            f"model folder {path} does not exist; train a model first or pick the "
            f"folder that holds {MODEL_FILE} and {META_FILE}"
        )
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise BundleError(
            f"{path} has no {META_FILE}: not a microclf model folder (train one "
            "with microclf or pick another folder)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise BundleError(f"{meta_path} is corrupt ({exc}); retrain or restore the model") from exc
    check_format(meta, meta_path)
    problems = meta_problems(meta)
    if problems:
        raise BundleError(f"{meta_path}: " + "; ".join(problems) + " (retrain the model)")
    return meta


# Fields a bundle may lack (older bundles) but that must have this type when present.
_FIELD_TYPES = {
    "files": list,
    "config": dict,
    "metrics": dict,
    "familiarity": dict,
    "openvino": dict,
    "versions": dict,
    "split": dict,
    "phases": (dict, list),
    "history": (dict, list),
    "backbone": str,
    "weights": (str, type(None)),
    "data_dir": (str, type(None)),
    "date": str,
    "model_sha256": str,
}


def meta_problems(meta: dict) -> list[str]:
    """What is wrong with a bundle's ``microclf.json`` (read as a dict), one phrase each:
    the class names (at least two, text, none empty, none twice), the preprocessing (every
    setting in range, e.g. an image size of 8 to 1024 px), and the type of every other field
    microclf reads."""
    problems = []
    names = meta.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        problems.append("class_names must list at least 2 class names")
    else:
        if any(not n.strip() for n in names):
            problems.append("class_names has an empty name")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            problems.append(f"class_names lists {', '.join(map(repr, twice))} more than once")
    try:
        PreprocessSpec.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"preprocessing is missing or invalid ({exc})")
    for key, kind in _FIELD_TYPES.items():
        if key in meta and not isinstance(meta[key], kind):
            problems.append(f"{key} has the wrong type ({type(meta[key]).__name__})")
    files = meta.get("files")
    if isinstance(files, list) and not all(isinstance(f, str) and _own_name(f) for f in files):
        problems.append("files must list plain file names")
    if "objects" in meta:
        try:
            model_crop_spec(meta)
        except (AttributeError, TypeError, ValueError) as exc:
            problems.append(f"objects has invalid crop settings ({exc})")
    return problems


def _wait_for_swap(folder: Path, timeout: float = 10.0) -> None:
    """While another process swaps the bundle's files (a journal and its lock), wait for it
    to finish (a swap takes a fraction of a second)."""
    deadline = time.monotonic() + timeout
    while (folder / JOURNAL_FILE).exists() and is_locked(folder) and time.monotonic() < deadline:
        time.sleep(0.05)


def check_format(meta, meta_path: str | Path) -> None:
    """Refuse a ``microclf.json`` whose ``format`` this version cannot read.

    ``"microclf-bundle/<version>"``; bundles from before the field have none (version 1).
    """
    if not isinstance(meta, dict):
        raise BundleError(
            f"{meta_path} is not a JSON object: not a microclf model (retrain the model)"
        )
    fmt = meta.get("format")
    if fmt is None:
        return
    name, _, version = str(fmt).partition("/")
    if name != BUNDLE_FORMAT or not version.isdigit():
        raise BundleError(
            f"{meta_path} has format {fmt!r}, not a microclf model "
            f"({BUNDLE_FORMAT}/{BUNDLE_VERSION}); pick a folder written by "
            "microclf"
        )
    if int(version) > BUNDLE_VERSION:
        raise BundleError(
            f"{meta_path} was made by a newer microclf (format {version}; this "
            f"one reads up to {BUNDLE_VERSION}); upgrade napari-microclf "
            "(pip install -U napari-microclf)"
        )


def check_split_schema(data, path: str | Path) -> dict[str, list[dict]]:
    """Check a bundle's ``split.json`` (``{subset: [{"key", "sha1", "group"}...]}``) and
    return its three lists; a BundleError names the first problem and what to do."""
    subsets = ("test", "val", "train")

    def bad(why: str) -> BundleError:
        return BundleError(
            f"{path} is not a valid split list ({why}); restore the previous "
            f"model (microclf restore {Path(path).parent}) or retrain"
        )

    if not isinstance(data, dict):
        raise bad(f"a JSON object was expected, found {type(data).__name__}")
    out = {}
    for s in subsets:
        entries = data.get(s, [])
        if not isinstance(entries, list):
            raise bad(f"{s!r} must be a list, found {type(entries).__name__}")
        for i, e in enumerate(entries):
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("key"), str)
                or not isinstance(e.get("sha1"), str)
            ):
                raise bad(f"{s}[{i}] must have a text 'key' and 'sha1', found {e!r:.80}")
            if "/" not in e["key"]:
                raise bad(f"{s}[{i}] key {e['key']!r} is not '<class>/<file>'")
        out[s] = list(entries)
    return out


def own_split(bundle_path: str | Path) -> dict | None:
    """The model's own ``{subset: [{"key", "sha1", "group"}...]}`` (None: an older bundle)."""
    path = Path(bundle_path) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise BundleError(
            f"{path} is corrupt ({exc}); restore the previous model (microclf "
            f"restore {Path(bundle_path)}) or retrain"
        ) from exc
    return check_split_schema(d, path)


def load_bundle(path: str | Path, *, lazy: bool = False) -> Bundle:
    """Load a bundle (a folder or a zipped bundle) with Keras' safe mode and check that model
    and metadata agree. ``lazy``: read and check the metadata now, the Keras model (and
    TensorFlow) on first use of ``Bundle.model``.

    A ``model.keras`` the installed Keras cannot deserialise (saved by another Keras
    version) is rebuilt from ``microclf.json`` (backbone, image size, classes, head) and its
    weights are loaded from the archive, with a :class:`BundleVersionWarning` naming both
    versions; when that fails too, a BundleError says what to do.
    """
    source = Path(path).expanduser()
    zipped = is_zipped_bundle(source)
    meta = read_meta(source)
    folder = resolve_bundle_path(source)
    folder = folder.parent if folder.is_file() else folder
    model_path = folder / MODEL_FILE
    shown = f"{model_path.name} in {source}" if zipped else str(model_path)
    if not model_path.exists():
        raise BundleError(f"{source if zipped else folder} has no {MODEL_FILE}; retrain the model")
    if lazy:
        return Bundle(
            folder.resolve(),
            None,
            meta,
            source.resolve() if zipped else None,
            loader=lambda: load_bundle(path).model,
        )
    import keras

    def unreadable(reason: str) -> BundleError:
        what = (
            "restore the previous model (microclf restore "
            f"{folder.resolve()}, or Restore previous in the Predict widget) or retrain it"
            if has_previous(folder)
            else "retrain the model"
        )
        return BundleError(f"{shown} is corrupt or unreadable ({reason}); {what}")

    try:
        whole = zipfile.is_zipfile(model_path)
    except OSError as exc:
        raise unreadable(exc.strerror or str(exc)) from exc
    if not whole:  # Keras would say "File not found" of it
        raise unreadable("not a complete .keras archive: truncated, overwritten or not a model")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises anything on a file it cannot read
        reason = one_line(exc, named=True, limit=200)
        try:
            model = rebuild_model(meta, model_path)
        except Exception as exc2:  # noqa: BLE001 - said with the first reason, below
            rec_keras, keras_now = _recorded_and_installed(meta)[:2]
            other = (
                f" (it was saved by Keras {rec_keras}, this is Keras {keras_now}: "
                f"pip install keras=={rec_keras} may read it)"
                if rec_keras not in ("unknown", keras_now)
                else ""
            )
            also = one_line(exc2, named=True, limit=200)
            raise unreadable(
                f"{reason}; rebuilding it from {META_FILE} failed too: {also}{other}"
            ) from exc
        warnings.warn(BundleVersionWarning(_version_note(meta, shown, reason)), stacklevel=2)
    else:
        newer = _newer_keras(meta)
        if newer:
            warnings.warn(
                BundleVersionWarning(
                    f"{shown} was saved by Keras {newer[0]} (napari-microclf {newer[2]}), newer "
                    f"than the installed Keras {newer[1]} (napari-microclf {newer[3]}); it loaded, "
                    "but if its predictions look wrong, upgrade (pip install -U keras "
                    "napari-microclf)"
                ),
                stacklevel=2,
            )
    n_out = int(model.output_shape[-1])
    if n_out != len(meta["class_names"]):
        raise BundleError(
            f"{shown} predicts {n_out} classes but {META_FILE} lists "
            f"{len(meta['class_names'])} ({meta['class_names']}); the files do not belong "
            "together: retrain or restore the model folder"
        )
    size = PreprocessSpec.from_dict(meta["preprocessing"]).image_size
    if tuple(model.input_shape[1:]) != (size, size, 3):
        raise BundleError(
            f"{shown} takes input {model.input_shape[1:]} but {META_FILE} "
            f"says {size}x{size}x3; retrain or restore the model folder"
        )
    return Bundle(folder.resolve(), model, meta, source.resolve() if zipped else None)


class BundleVersionWarning(UserWarning):
    """A bundle made by another Keras (or microclf) version: it was loaded, but say so."""


def _recorded_and_installed(meta: dict) -> tuple[str, str, str, str]:
    """(recorded Keras, installed Keras, recorded microclf, installed microclf)."""
    import keras

    recorded = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    return (
        str(recorded.get("keras") or "unknown"),
        str(keras.__version__),
        str(recorded.get("napari_microclf") or "unknown"),
        str(__version__),
    )


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def _newer_keras(meta: dict) -> tuple[str, str, str, str] | None:
    """The versions when the bundle's recorded Keras major.minor is newer than the installed
    one (an older one is what Keras promises to read); else None."""
    versions_ = _recorded_and_installed(meta)
    recorded, installed = _major_minor(versions_[0]), _major_minor(versions_[1])
    return versions_ if recorded and installed and recorded > installed else None


def _version_note(meta: dict, shown: str, reason: str) -> str:
    rec_keras, keras_now, rec_mc, mc_now = _recorded_and_installed(meta)
    return (
        f"{shown} was saved by Keras {rec_keras} (napari-microclf {rec_mc}); the installed "
        f"Keras {keras_now} (napari-microclf {mc_now}) could not read its model "
        f"({reason}). It was rebuilt from {META_FILE} and its weights loaded from the "
        "archive; check a few predictions, or retrain (or re-save) the model with this "
        "version to silence this warning"
    )


def rebuild_model(meta: dict, model_path: str | Path):
    """Build the classifier ``meta`` describes (backbone, image size, classes, head and
    augmentation as trained) and load the weights of the ``.keras`` archive into it.

    For a ``model.keras`` whose architecture the installed Keras cannot deserialise: the
    weights file inside (``model.weights.h5``) is keyed by the layers' structure, which is
    microclf's own and does not depend on the Keras version.
    """
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    size = PreprocessSpec.from_dict(meta["preprocessing"]).image_size
    fine_tune = meta.get("fine_tune", config.get("fine_tune", 0))
    model = build_classifier(
        len(meta["class_names"]),
        size,
        weights=None,
        dropout=float(config.get("dropout", 0.2)),
        augment=bool(config.get("augment", True)),
        augment_strength=float(config.get("augment_strength", 0.05)),
        fine_tune=fine_tune,
        seed=None,
        backbone=meta.get("backbone") or config.get("backbone") or B0,
        warn=False,
    )
    # Keras reads model.weights.h5 inside the archive. It raises for weights that do not fit;
    # for a group it cannot find it may only warn and keep fresh weights: that is a failure
    # here (a model with some random layers must not pass for the trained one).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(str(model_path))
    partial = [
        w for w in caught if "freshly-initialized" in str(w.message) or "Skipping" in str(w.message)
    ]
    if partial:
        raise ValueError(
            "its weights do not fit the model microclf.json describes ("
            + str(partial[0].message).splitlines()[0][:200]
            + ")"
        )
    for w in caught:  # anything else is said as it was
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


# -- zipped bundles ------------------------------------------------------------------------

ZIP_SUFFIX = ".zip"


def is_zipped_bundle(path: str | Path) -> bool:
    """Whether ``path`` names a zipped bundle (a ``.zip`` file; it need not exist yet)."""
    path = Path(path)
    return path.suffix.lower() == ZIP_SUFFIX and not path.is_dir()


def bundle_cache_dir() -> Path:
    """Where zipped bundles are extracted: ``$MICROCLF_CACHE``, else
    ``$XDG_CACHE_HOME/napari-microclf/bundles`` (``~/.cache/...``)."""
    return settings.bundle_cache()


def resolve_bundle_path(path: str | Path) -> Path:
    """The folder to read a bundle from: ``path`` itself, or for a zipped bundle the cache
    folder it is extracted into (once per content: the folder is named by the zip's
    SHA-256, so a changed zip is extracted again). A BundleError names a zip that is
    missing, corrupt or holds no bundle."""
    path = Path(path).expanduser()
    if not is_zipped_bundle(path):
        return path
    if not path.is_file():
        raise BundleError(
            f"zipped model {path} does not exist; pick a model folder or a .zip "
            "written by microclf export"
        )

    try:
        sha = file_digest(path, "sha256")  # memoised by (path, size, time, inode)
    except OSError as exc:
        raise BundleError(
            f"cannot read zipped model {path} ({exc.strerror or exc}); check "
            "the file and its permissions"
        ) from exc
    for root in (bundle_cache_dir(), Path(tempfile.gettempdir()) / "napari-microclf-bundles"):
        dest = root / sha
        if (dest / META_FILE).is_file():
            return dest  # extracted before (the folder appears whole, by one rename)
        try:
            root.mkdir(parents=True, exist_ok=True)
            return _extract_bundle(path, dest)
        except OSError:
            continue  # the cache cannot be written: try the temporary folder
    raise BundleError(
        f"cannot extract zipped model {path}: neither {bundle_cache_dir()} nor "
        f"the temporary folder can be written; set {settings.CACHE.name} to a writable "
        "folder, or unzip it and pick the folder"
    )


def _extract_bundle(zip_path: Path, dest: Path) -> Path:
    """Extract the bundle in ``zip_path`` (at its top level or in one folder) into ``dest``,
    atomically: into a temporary folder beside it, then one rename."""

    def bad(why: str) -> BundleError:
        return BundleError(
            f"{zip_path} is not a zipped microclf model ({why}); pick a .zip "
            "written by microclf export, or a model folder"
        )

    try:
        with zipfile.ZipFile(zip_path) as zf:
            names = [n for n in zf.namelist() if not n.startswith("__MACOSX/")]
            if META_FILE in names:
                prefix = ""
            else:
                inner = [n for n in names if n.count("/") == 1 and n.endswith("/" + META_FILE)]
                if len(inner) != 1:
                    raise bad(
                        f"no {META_FILE} in it"
                        if not inner
                        else f"{len(inner)} folders with a {META_FILE}"
                    )
                prefix = inner[0][: -len(META_FILE)]
            if prefix + MODEL_FILE not in names:
                raise bad(f"no {MODEL_FILE} beside its {META_FILE}")
            members = [n for n in names if n.startswith(prefix) and _own_name(n[len(prefix) :])]
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.mkdir()
            try:
                for name in members:
                    with zf.open(name) as src, open(tmp / name[len(prefix) :], "wb") as out:
                        shutil.copyfileobj(src, out)
                try:
                    os.replace(tmp, dest)
                except OSError:
                    if not (dest / META_FILE).is_file():
                        raise
                    # another process extracted the same zip first: use its folder
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise bad(f"not a readable zip: {exc}") from exc
    return dest


def zip_bundle(folder: str | Path, out_zip: str | Path) -> Path:
    """Write the bundle of model folder ``folder`` into one ``.zip`` (atomically); returns it.

    The zip holds the bundle's own files at its top level (``model.keras``,
    ``microclf.json`` and those ``microclf.json`` lists: ``split.json``, ``report.md``, ...),
    never ``previous/``, the user's files or locks. :func:`load_bundle`, :func:`read_meta`
    and predict open it as they open the folder.

    Examples
    --------
    >>> zip_bundle("model", "model.zip")  # doctest: +SKIP
    >>> predict("model.zip", "images/")  # doctest: +SKIP
    """
    folder = Path(folder).expanduser()
    if folder.is_file() and folder.name in (MODEL_FILE, META_FILE):
        folder = folder.parent
    out_zip = Path(out_zip).expanduser()
    if is_zipped_bundle(folder):
        raise BundleError(f"{folder} is already a zipped model; give the model folder to zip")
    if out_zip.is_dir():
        raise OutputError(
            f"{out_zip} is a folder; give the .zip file to write (e.g. "
            f"{out_zip / (folder.resolve().name + ZIP_SUFFIX)})"
        )
    for _attempt in range(3):
        read_meta(folder)  # a model folder of a format this version reads, swap completed
        meta_before = (folder / META_FILE).read_bytes()
        names = bundle_files(folder)
        if MODEL_FILE not in names:
            raise BundleError(f"{folder} has no {MODEL_FILE}; retrain the model")
        try:
            out_zip.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = mkstemp_for_user(
                prefix=f".{out_zip.name}.", suffix=".tmp", dir=out_zip.parent
            )
        except OSError as exc:
            raise OutputError(
                f"cannot write {out_zip} ({exc.strerror or exc}); choose another destination"
            ) from exc
        try:
            swapped = False
            with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
                for name in names:
                    try:
                        zf.write(folder / name, arcname=name)
                    except FileNotFoundError:
                        swapped = True  # moved away by a swap under way
                        break
            # a retraining that swapped the files meanwhile: zip the new bundle instead
            swapped = (
                swapped
                or (folder / JOURNAL_FILE).exists()
                or (folder / META_FILE).read_bytes() != meta_before
            )
            if not swapped:
                os.replace(tmp, out_zip)
                return out_zip.resolve()
        except OSError as exc:
            raise OutputError(
                f"cannot write {out_zip} ({exc.strerror or exc}); choose "
                "another destination (nothing was written)"
            ) from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise BundleError(
        f"{folder} kept changing while it was zipped (a training writing into "
        "it?); zip it when the training has finished"
    )


def versions() -> dict:
    import keras
    import tensorflow as tf

    return {
        "napari_microclf": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
