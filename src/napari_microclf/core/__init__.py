"""The engine: works without Qt and napari; TensorFlow is imported inside functions only.

The modules stand in layers, and a module imports only modules of its own layer or a lower
one (``tests/test_layers.py`` checks it, imports inside functions included, and that no two
modules import each other even through others). Our own modules are imported at the top of
a module; an import inside a function is for a heavy optional dependency (TensorFlow, Keras,
OpenVINO, Dask, ONNX, matplotlib).

Layer 0, foundations: ``errors`` (the error types), ``settings`` (every ``MICROCLF_*``
variable), ``files`` (content digests, atomic writes, outputs that would destroy an input
refused), ``lock`` (one writer at a time), ``device`` (GPUs, memory).

Layer 1, pages and class folders: ``images`` (reading, pages, normalisation), ``dataset``
(class folders, examples, the split), ``pipeline`` (pages streamed to training), ``sample``
(the synthetic sample data), ``review`` (relabelling and trashing examples), ``objects``
(the crop around each label of a segmentation, and datasets of such crops).

Layer 2, networks, engines, bundles, the feature cache and what both sides share: ``lite0``
and ``model`` (the networks), ``bundle`` (a trained model on disk, its own split),
``engine`` (OpenVINO or TensorFlow), ``features`` (the backbone's cached features),
``finetune`` (fine-tuning's top stages on the frozen stages' cached activations),
``familiar`` (out-of-distribution scores), ``tta`` (flipped views; a model's probabilities
over pages), ``report`` (metrics, diagnosis, Markdown), ``metrics`` (balanced accuracy and
macro-F1, in numpy and as Keras metrics), ``train_config`` (``TrainConfig``),
``predict_options`` (``PredictOptions``), ``results`` and ``csv_format`` (what a prediction
gives, as rows of a CSV).

Layer 3, training and inference side by side; neither side imports the other, what both
need is in layer 2. Training: ``train``, ``preflight`` (its checks before TensorFlow starts),
``report_html`` (the report page). Inference: ``predictor``, ``predict`` (the entry point),
``folder_runs`` (folders into a CSV, resumed), ``predict_objects`` (each object of
a segmentation), ``cluster`` (on Dask), ``evaluate`` (a model
scored on its own test list), ``explain`` (heatmaps). Bundle tools: ``export``.

Layer 4, workflows that use both: ``active`` (label-next: rank pages, retrain, score old and
new), ``features_cluster`` (a training's features computed on a cluster).

``cli.py`` and the widgets in ``_qt/`` stand above the core and are never imported by it.
"""
