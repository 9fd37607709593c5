"""Features computed ahead of training, in this process and on a 2-worker Dask cluster, and
large feature sets read memory-mapped from the cache."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from napari_microclf.cli import main as cli_main
from napari_microclf.core.dataset import load_samples
from napari_microclf.core.features import (
    CACHE_DIR,
    FeatureCache,
    FeatureExtractor,
    cache_entries,
    cache_key,
    clear_cache,
    extract_features,
)
from napari_microclf.core.features_cluster import compute_features, features_task
from napari_microclf.core.model import build_classifier, weights_identity
from napari_microclf.core.sample import write_sample
from napari_microclf.core.train import TrainConfig

# small and quick: a random frozen base (weights none) reads cached features like any other
OPTIONS = ["--weights", "none", "--image-size", "32", "--batch-size", "8", "--views", "1"]
SETTINGS = {"weights": None, "image_size": 32, "batch_size": 8, "views": 1, "epochs": 1}


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_sample(tmp_path_factory.mktemp("s") / "s", n_per_class=8, size=48, seed=5)[
        "dataset"
    ]


@pytest.fixture()
def data(sample, tmp_path):
    """A fresh copy of the sample dataset (its own split and cache)."""
    return shutil.copytree(sample, tmp_path / "data")


def _entries(data, config):
    """The cache entries of ``config``, by file digest."""
    (entry,) = cache_entries(data)
    folder = entry["folder"]
    return {p.stem: np.load(p) for p in folder.glob("*.npy") if not p.name.startswith(".")}


def test_features_then_train_computes_nothing(data, tmp_path, capsys):
    assert cli_main(["features", str(data), *OPTIONS]) == 0
    out = capsys.readouterr().out
    assert re.search(r"24 computed, 0 reused, 0 file\(s\) failed", out), out
    assert (
        cli_main(["train", str(data), "--out", str(tmp_path / "m"), "--epochs", "1", *OPTIONS]) == 0
    )
    out = capsys.readouterr().out
    line = next(li for li in out.splitlines() if li.startswith("Backbone features"))
    # every page, training pages with their augmented view, is read from the cache
    assert "0 image(s) computed, 24 reused" in line and "2 view(s)" in line
    # a second run has nothing left to do
    assert cli_main(["features", str(data), *OPTIONS]) == 0
    assert "0 computed, 24 reused" in capsys.readouterr().out


def test_cluster_features_equal_this_process(data, client, tmp_path):
    config = TrainConfig(str(data), **SETTINGS)
    summary = compute_features(config, client)
    assert not summary.failed and not summary.stopped
    assert (summary.workers, summary.computed, summary.reused) == (2, 24, 0)
    on_cluster = _entries(data, config)
    assert len(on_cluster) == 24 == len(list(data.glob("*/*.tif")))  # one entry per file
    # the plain view is what a training computes for itself in one process
    samples = load_samples(data, seed=0)
    refs = samples.train + samples.val + samples.test
    extractor = FeatureExtractor(build_classifier(3, 32, None, seed=0, warn=False), 0, 0.05, 8)
    plain = extract_features(refs, 1, config.preprocessing, extractor, None)[:, 0]
    from napari_microclf.core.files import file_digest

    got = np.stack([on_cluster[file_digest(r.path)][r.page, 0] for r in refs])
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5)
    # all views, the augmented ones included, are those of a run in this process
    here = shutil.copytree(data, tmp_path / "here", ignore=shutil.ignore_patterns(CACHE_DIR))
    assert compute_features(TrainConfig(str(here), **SETTINGS)).computed == 24
    local = _entries(here, config)
    assert local.keys() == on_cluster.keys()
    for digest, feats in local.items():
        np.testing.assert_allclose(on_cluster[digest], feats, rtol=1e-5, atol=1e-5)


def test_large_feature_sets_are_memory_mapped(data, monkeypatch):
    samples = load_samples(data, seed=0)
    refs, spec = samples.train, TrainConfig(str(data), **SETTINGS).preprocessing
    extractor = FeatureExtractor(build_classifier(3, 32, None, seed=0, warn=False), 0, 0.05, 8)
    key = cache_key(spec, weights_identity("efficientnet-b0", None, 0), 0, 0.05)
    cache = FeatureCache(data, key)
    in_memory = extract_features(refs, 2, spec, extractor, cache)
    assert type(in_memory) is np.ndarray and cache.computed == len(refs)
    monkeypatch.setenv("MICROCLF_MEMMAP_MB", "0")
    cache = FeatureCache(data, key)
    mapped = extract_features(refs, 2, spec, extractor, cache)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    assert (cache.computed, cache.hits) == (0, len(refs))
    np.testing.assert_array_equal(mapped, in_memory)
    (assembled,) = cache.folder.glob("assembled-*.npy")
    assert Path(mapped.filename) == assembled.resolve()
    # unchanged: the same file, mapped again; not a cache entry of its own
    again = extract_features(refs, 2, spec, extractor, FeatureCache(data, key))
    assert again.filename == mapped.filename
    assert cache_entries(data)[0]["files"] == len(refs)
    # fewer views, another file; computing what is missing goes straight into the map
    shutil.rmtree(cache.folder)
    cache = FeatureCache(data, key)
    fresh = extract_features(refs, 1, spec, extractor, cache)
    assert isinstance(fresh, np.memmap) and cache.computed == len(refs)
    np.testing.assert_allclose(fresh[:, 0], in_memory[:, 0], rtol=1e-5, atol=1e-5)
    assert clear_cache(data)[0] > 0 and not (data / CACHE_DIR).exists()


def test_a_corrupt_file_is_named_in_one_line(data, capsys):
    (data / "round" / "broken.tif").write_bytes(b"not an image at all")
    assert cli_main(["features", str(data), *OPTIONS]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "round/broken.tif" in err, err
    assert not (data / CACHE_DIR).exists()  # said before any work


def test_a_file_that_fails_in_a_task_is_reported_and_the_rest_go_on(data):
    from napari_microclf.core.features_cluster import _plan

    config = TrainConfig(str(data), **SETTINGS)
    settings, tasks, _ = _plan(config, lambda u: None)
    task = tasks[0]
    gone = task[0][0]
    (data / gone).unlink()  # vanished between the plan and the work
    status = features_task(settings, task)
    assert [p for p, _ in status["failed"]] == [gone] and "no such file" in status["failed"][0][
        1
    ].lower()
    assert status["computed"] == sum(len(pages) for _, pages, _ in task[1:])
