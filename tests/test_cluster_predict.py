"""Classification on a Dask cluster: the same CSV as one process, byte for byte, past a killed
worker, after a resumed run and from the command line; clear errors for a bad --cluster.

One 2-worker LocalCluster (processes) serves the whole module: each worker imports
TensorFlow once, which takes a while on a small machine.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_microclf.cli import main as cli_main
from napari_microclf.core import cluster as cluster_mod
from napari_microclf.core.bundle import write_bundle
from napari_microclf.core.cluster import ClusterError, connect, plan_tasks
from napari_microclf.core.errors import OutputError
from napari_microclf.core.folder_runs import predict_folder
from napari_microclf.core.images import PreprocessSpec
from napari_microclf.core.model import LITE0, build_classifier
from napari_microclf.core.predict import predict
from napari_microclf.core.predictor import Predictor

BATCH = 8
CHUNK = 4  # pages per task: the 40-page stack becomes ten tasks

RNG = np.random.default_rng(3)


def _gray(h=32, w=32):
    return RNG.integers(0, 4000, (h, w)).astype(np.uint16)


def _stack(path: Path, pages: int) -> None:
    tifffile.imwrite(path, np.stack([_gray() for _ in range(pages)]), metadata={"axes": "ZYX"})


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A two-class bundle of a random 32 px model: prediction mechanics, not accuracy."""
    model = build_classifier(2, 32, None, fine_tune="all", augment=False, backbone=LITE0)
    return write_bundle(
        tmp_path_factory.mktemp("bundle") / "b",
        model,
        {"class_names": ["a", "b"], "preprocessing": PreprocessSpec(32).to_dict()},
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Stacks, single pages, a corrupt PNG, a too-small image and a stack whose page 5
    is cut short (an error row in the middle of a stack)."""
    import imageio.v3 as iio

    root = tmp_path_factory.mktemp("images")
    _stack(root / "a_stack.tif", 40)
    iio.imwrite(root / "b_page.png", (_gray() // 16).astype(np.uint8))
    (root / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
    tifffile.imwrite(root / "d_dot.tif", _gray(1, 1))
    _stack(root / "e_cut.tif", 12)
    with open(root / "e_cut.tif", "r+b") as f:  # pages 6.. lose their pixels
        f.truncate(os.path.getsize(root / "e_cut.tif") - 6 * 32 * 32 * 2 - 100)
    (root / "sub").mkdir()
    _stack(root / "sub" / "f_stack.tif", 9)
    return root


@pytest.fixture(scope="module")
def single_csv(bundle, folder, tmp_path_factory):
    """The CSV a single process writes: what every cluster run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "one.csv"
    result = predict_folder(Predictor(bundle, BATCH), folder, out)
    assert len(result.errors) == 3 and result.csv_path == out
    return out.read_bytes()


def test_tasks_cut_stacks_into_page_ranges(folder):
    files = sorted(folder.glob("*.*"))
    tasks = list(plan_tasks(files, CHUNK))
    stack = [r for t in tasks for r in t if r[0].endswith("a_stack.tif")]
    assert [(r[2], r[3]) for r in stack] == [
        (i, i + 4 if i < 36 else None) for i in range(0, 40, 4)
    ]
    assert all(Path(r[1]).is_absolute() for t in tasks for r in t)
    # resumed: the pages written and the failed files are left out
    done = {str(files[0]): set(range(38))}
    again = [r for t in plan_tasks(files, CHUNK, done, {str(files[2])}) for r in t]
    assert again[0][2:] == (38, None)
    assert not any(r[0] == str(files[2]) for r in again)


def test_the_cluster_csv_is_the_single_process_csv(bundle, folder, single_csv, client, tmp_path):
    out = tmp_path / "two.csv"
    result = predict_folder(bundle, folder, out, batch_size=BATCH, client=client, chunk_pages=CHUNK)
    assert out.read_bytes() == single_csv
    assert not out.with_name("two.csv.partial").exists()
    assert "from 4 of 6 files" in result.summary()
    # the Python API takes a client too, and a stack on its own comes back as its pages
    pages = predict(bundle, folder / "a_stack.tif", BATCH, client=client)
    assert [p.page for p in pages] == list(range(40))


def test_resume_completes_an_interrupted_run(bundle, folder, single_csv, client, tmp_path):
    # a single-process run stopped after its first batch, killed mid-line
    out = tmp_path / "r.csv"
    partial = tmp_path / "r.csv.partial"
    stopped = predict_folder(Predictor(bundle, BATCH), folder, out, should_stop=lambda: True)
    assert stopped.stopped and len(stopped) == BATCH
    with open(partial, "ab") as f:
        f.write(str(folder / "a_stack.tif").encode() + b",8,a,0.51")  # torn last line
    result = predict_folder(
        bundle, folder, out, batch_size=BATCH, client=client, chunk_pages=CHUNK, resume=True
    )
    assert out.read_bytes() == single_csv
    assert result.resumed == BATCH and "after 8 rows kept" in result.summary()

    # a cluster run stopped after a few tasks, resumed by a single process
    seen = []
    predict_folder(
        bundle,
        folder,
        out,
        batch_size=BATCH,
        client=client,
        chunk_pages=CHUNK,
        should_stop=lambda: len(seen) >= 12,
        on_item=seen.append,
    )
    assert partial.exists() and 12 <= len(seen) < 60
    predict_folder(Predictor(bundle, BATCH), folder, out, resume=True)
    assert out.read_bytes() == single_csv


def test_resume_refuses_another_models_partial(bundle, folder, tmp_path):
    out = tmp_path / "x.csv"
    out.with_name("x.csv.partial").write_text("file,page,class,confidence,p_p,p_q,status,error\r\n")
    with pytest.raises(OutputError, match="does not say which model"):
        predict_folder(Predictor(bundle, BATCH), folder, out, resume=True)
    with pytest.raises(OutputError, match="resume needs"):
        predict_folder(Predictor(bundle, BATCH), folder, resume=True)


def test_the_cli_classifies_on_a_cluster(bundle, folder, single_csv, client, tmp_path, capsys):
    out = tmp_path / "cli.csv"
    address = client.scheduler.address
    argv = ["predict", str(bundle), str(folder), "--csv", str(out), "--batch-size", str(BATCH)]
    assert cli_main([*argv, "--cluster", address]) == 0
    assert out.read_bytes() == single_csv
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith(str(folder))]
    assert len(lines) == single_csv.count(b"\n") - 1  # one line per page and error, as ever
    assert f"Classified {single_csv.count(b',ok,')} pages" in printed
    # --resume of a finished run: nothing partial, so a fresh run; same CSV
    assert cli_main([*argv, "--cluster", address, "--resume", "--quiet"]) == 0
    assert out.read_bytes() == single_csv


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--cluster", "local:0"], "cluster 'local:0': give local:N"),
        (["--cluster", "nowhere here"], "is not local:N or a scheduler address"),
        (["--cluster", "tcp://127.0.0.1:9"], "cannot reach a Dask scheduler at tcp://127.0.0.1:9"),
        (["--resume"], "--resume needs the CSV"),
    ],
)
def test_a_bad_cluster_is_one_line(bundle, folder, extra, expected, capsys, monkeypatch):
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT", 1.0)
    assert cli_main(["predict", str(bundle), str(folder), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("microclf: error: ") and expected in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(ClusterError):
        connect(extra[-1]) if extra[0] == "--cluster" else connect("")


def test_a_killed_worker_loses_and_repeats_no_page(bundle, folder, single_csv, client, tmp_path):
    """Kept last: the cluster has a fresh worker (loading TensorFlow again) afterwards."""
    pids = client.run(os.getpid)
    killed = []

    def kill_one(item):
        if not killed:
            victim = next(iter(pids.values()))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    out = tmp_path / "killed.csv"
    predict_folder(
        bundle,
        folder,
        out,
        batch_size=BATCH,
        client=client,
        chunk_pages=CHUNK,
        on_item=kill_one,
    )
    assert killed
    assert out.read_bytes() == single_csv


def test_a_cluster_does_not_take_over_dask_in_this_process(client):
    """napari reads large stacks as dask arrays: they keep computing in this process, not on
    the workers a classification connected to (whose pickling they may not survive)."""
    import dask
    import dask.array as da

    assert dask.base.get_scheduler() is not client.get
    assert int(da.ones(4, chunks=2).sum().compute()) == 4
