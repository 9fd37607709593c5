"""The reference: the training guide's recipe written in plain Keras, as a user would.

Frozen EfficientNetB0, augmentation layers inside the model, images decoded by tf.data every
epoch (parallel map + prefetch), the same head, optimizer, class weights and callbacks as
napari-microclf. Only the way the work is organised differs; it uses the same split and the
same per-image preprocessing function, so the two differ in speed, not in what they learn.
"""

from __future__ import annotations

import time

import numpy as np


def _dataset(refs, spec, batch_size, shuffle, seed):
    import tensorflow as tf

    from napari_microclf.core.images import preprocess, read_page

    paths = [str(r.path) for r in refs]
    pages = [int(r.page) for r in refs]
    labels = np.asarray([r.label for r in refs], np.int32)

    def load(path, page):
        return preprocess(read_page(path.decode(), int(page)), spec)

    def tf_load(path, page, label):
        img = tf.numpy_function(load, [path, page], tf.float32)
        img.set_shape((spec.image_size, spec.image_size, 3))
        return img, label

    ds = tf.data.Dataset.from_tensor_slices((paths, pages, labels))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return (
        ds.map(tf_load, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


def train_plain(samples, config) -> dict:
    """Fit the plain pipeline; returns wall time and the final validation accuracy."""
    import keras

    from napari_microclf.core.model import build_classifier
    from napari_microclf.core.train import balanced_class_weights

    t0 = time.perf_counter()
    spec = config.preprocessing
    model = build_classifier(
        len(samples.class_names),
        config.image_size,
        config.weights,
        config.dropout,
        config.augment,
        config.augment_strength,
        0,
        config.seed,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train_ds = _dataset(samples.train, spec, config.batch_size, True, config.seed)
    val_ds = _dataset(samples.val, spec, config.batch_size, False, config.seed)
    weights = (
        balanced_class_weights(samples.distribution("train")) if config.class_weights else None
    )
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=config.epochs,
        class_weight=weights,
        verbose=0,
        callbacks=[
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=config.reduce_lr_factor,
                patience=config.reduce_lr_patience,
                min_lr=config.min_lr,
            )
        ],
    )
    return {
        "seconds": time.perf_counter() - t0,
        "val_accuracy": float(history.history["val_accuracy"][-1]),
        "epochs": len(history.history["loss"]),
        "history": history.history,
    }
