"""The one entry point for prediction: :func:`predict` classifies an array, a file, a folder
or a list of paths.

Arrays and single files go to a :class:`~.predictor.Predictor` (pages in batches, test-time
augmentation); folders and several paths to :func:`~.folder_runs.predict_folder` (past bad
files, optionally on a Dask cluster). The settings and their defaults are
:class:`~.predict_options.PredictOptions`; the CSV format is :mod:`.csv_format`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .bundle import Bundle, read_meta
from .errors import ImageReadError
from .folder_runs import predict_folder
from .predict_objects import check_model_kind, predict_objects
from .predict_options import PredictOptions, options_of
from .predictor import Predictor


def predict(
    bundle,
    image_or_path,
    batch_size: int | None = None,
    *,
    page_axis: int | None = None,
    tta: bool | None = None,
    client=None,
    engine: str | None = None,
    precision: str | None = None,
    options: PredictOptions | None = None,
    labels=None,
):
    """Classify an image array, a stack array, an image file, a folder or a list of paths.

    Parameters
    ----------
    bundle : Predictor, Bundle, str or Path
        A model folder written by training (or a loaded bundle or Predictor).
    image_or_path : numpy.ndarray, str, Path or sequence of paths
        An array: with ``page_axis=None`` one image, ``(Y, X)`` or ``(Y, X, C)`` with
        ``C <= 4``; with ``page_axis`` a stack whose pages lie along that axis (each page
        ``(Y, X)`` or ``(Y, X, C)``). A file: every page of it (a TIFF stack page by page).
        A folder or several paths: every page of every image, past files that cannot be read
        (see :func:`~.folder_runs.predict_folder`).
    batch_size : int
        Pages per forward pass (default 32).
    page_axis : int, optional
        For arrays only: the axis that enumerates pages. Nothing is guessed: a
        ``(10, 64, 64)`` array without ``page_axis`` is refused, not taken as 10 pages.
    tta : bool
        Test-time augmentation: average each page's probabilities over the page and its
        horizontal, vertical and double flips (about four times the compute; the unfamiliar
        score stays the unflipped page's). See :meth:`~.predictor.Predictor.predict_pages`.
    client : distributed.Client or str, optional
        For files and folders: classify on a Dask cluster (a ``Client``, ``"local:N"`` or
        ``"tcp://HOST:PORT"``; see :func:`~.folder_runs.predict_folder`). Arrays are
        classified here. To write a CSV and resume an interrupted run, use
        :func:`~.folder_runs.predict_folder`.
    engine, precision : str, optional
        The inference engine and its precision: see :class:`~.predictor.Predictor`.
    options : PredictOptions, optional
        All of these settings at once (:class:`~.predict_options.PredictOptions`); the
        keywords above override it.
    labels : numpy.ndarray, str or Path, optional
        The image's label image (a Labels layer's data, or a file): every object (label) is
        classified on its own, by a model trained on objects (:mod:`.objects`), and one
        :class:`~.results.ObjectPrediction` per object and page comes back. A model trained
        on objects refuses to classify without labels, and a model of whole images with
        them.

    Returns
    -------
    list of PagePrediction or FolderResult
        One :class:`~.results.PagePrediction` per page (``page`` counts along ``page_axis``). For a
        folder or several paths a :class:`~.results.FolderResult`: the same sequence of pages, plus
        ``errors``, the files that could not be read.

    Raises
    ------
    ImageReadError
        An array that is not one image without ``page_axis``; a single file that cannot be
        read or whose page is too small (the message names the file and the minimum side).

    Examples
    --------
    >>> stack = np.random.rand(5, 64, 64)               # 5 gray pages  # doctest: +SKIP
    >>> pages = predict("model", stack, page_axis=0)    # doctest: +SKIP
    >>> [(p.page, p.class_name) for p in pages]          # doctest: +SKIP
    [(0, 'round'), (1, 'round'), (2, 'fragmented'), (3, 'round'), (4, 'elongated')]
    >>> predict("model", np.random.rand(64, 64, 3))[0].confidence  # one RGB page  # doctest: +SKIP
    0.93
    >>> predict("model", "plates/", client="local:4").summary()  # doctest: +SKIP
    'Classified 960 pages from 40 files'
    """
    options = options_of(
        options, batch_size=batch_size, tta=tta, engine=engine, precision=precision
    )
    predictor = bundle if isinstance(bundle, Predictor) else None
    loaded = predictor.bundle if predictor is not None else bundle
    if isinstance(loaded, Bundle):
        check_model_kind(loaded.meta, loaded.source or loaded.path, labels is not None)
    else:
        check_model_kind(read_meta(loaded), loaded, labels is not None)
    if labels is not None:
        predictor = predictor or Predictor(bundle, options=options)
        return list(
            predict_objects(predictor, image_or_path, labels, page_axis=page_axis, tta=options.tta)
        )
    if isinstance(image_or_path, np.ndarray):
        predictor = predictor or Predictor(bundle, options=options)
        return predictor.predict_array(image_or_path, page_axis, tta=options.tta)
    if page_axis is not None:
        raise TypeError("page_axis is for arrays; a file's pages come from its own axes")
    if isinstance(image_or_path, (str, Path)) and Path(image_or_path).expanduser().is_file():
        path = Path(image_or_path).expanduser()
        if client is None:
            predictor = predictor or Predictor(bundle, options=options)
            return list(predictor.predict_file(path, tta=options.tta))
        result = predict_folder(predictor or bundle, path, options=options, client=client)
        if result.errors:  # as a single file in one process: its error, not a part of it
            raise ImageReadError(str(result.errors[0]))
        return list(result.predictions)
    return predict_folder(predictor or bundle, image_or_path, options=options, client=client)
