"""Parametric (linear) interpolation between two minima: the "parametric plot".

Keskar et al. (2017, Fig. 2) and Jaiswal & Taura (Section 2.3.2, Fig. 6) evaluate
the cross-entropy loss and the accuracy, on training and validation data, of the
models whose parameters lie on the line through a small-batch minimum theta_S and
a large-batch minimum theta_L:

    theta(a) = (1 - a) * theta_S + a * theta_L,    a in [-1, 2]

(a = 0 is the small-batch model, a = 1 the large-batch model). A minimum is sharp
when the loss rises quickly as a leaves it.

BatchNormalization along the path. A BN layer holds two kinds of weights: the
trainable scale and offset, and the moving mean and variance used at inference.
Two choices are offered through the `batchnorm` argument:

* ``"interpolate"`` (the default, what Keskar et al.'s plots do): every weight,
  trainable or not, moving statistics included, is interpolated alike. The model
  at a = 0 and a = 1 is then exactly the trained model, and the curve shows the
  geometry of the parameter space with the statistics the two networks learned.
* ``"recompute"``: the trainable weights are interpolated, then each BN layer's
  moving mean and variance are recomputed from the training data at theta(a):
  one pass in training mode over `train_data`, averaging the per-batch means and
  (biased) variances weighted by batch size (the cumulative average that
  stochastic weight averaging uses). This measures the network one would
  actually deploy at theta(a); between the end points the interpolated moving
  statistics of the first option need not match the activations at all. Layers
  with BatchNormalization's update rule (e.g. ghost batch normalization) are
  recomputed the same way. Note
  that the pass runs every layer in training mode, so Dropout is active during
  it, as in ordinary training.

Weights that are not floating point (rare) are copied from theta_S.

References:
    N. S. Keskar, D. Mudigere, J. Nocedal, M. Smelyanskiy and P. T. P. Tang,
    "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp
    Minima", ICLR 2017, https://arxiv.org/abs/1609.04836 (Section 3, Fig. 2).
    I. J. Goodfellow, O. Vinyals and A. M. Saxe, "Qualitatively characterizing
    neural network optimization problems", ICLR 2015.
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 2.3.2, Fig. 6).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras.analysis import _common

BATCHNORM_MODES = ("interpolate", "recompute")


def default_alphas() -> np.ndarray:
    """The default interpolation coefficients, 25 points from -1 to 2 (Keskar et al.)."""
    return np.linspace(-1.0, 2.0, 25)


@dataclasses.dataclass(frozen=True)
class InterpolationResult:
    """Loss and accuracy along theta(a) = (1 - a) theta_S + a theta_L.

    Attributes:
        alphas: the coefficients a, shape (K,).
        train_loss, train_accuracy: mean loss and accuracy on the training data at
            each a, shape (K,).
        val_loss, val_accuracy: the same on the validation data, or None when no
            validation data was given.
        batchnorm: how BatchNormalization statistics were set along the path.
    """

    alphas: np.ndarray
    train_loss: np.ndarray
    train_accuracy: np.ndarray
    val_loss: np.ndarray | None
    val_accuracy: np.ndarray | None
    batchnorm: str


def _check_batchnorm(batchnorm) -> str:
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}; received {batchnorm!r}.")
    return batchnorm


def _check_compatible(model_small: keras.Model, model_large: keras.Model) -> None:
    shapes_small = [tuple(w.shape) for w in model_small.weights]
    shapes_large = [tuple(w.shape) for w in model_large.weights]
    if shapes_small != shapes_large:
        raise ValueError(
            "model_small and model_large must have the same architecture (the same weight "
            f"shapes in the same order); received {shapes_small} and {shapes_large}."
        )


def interpolate_weights(weights_small, weights_large, alpha: float) -> list[np.ndarray]:
    """(1 - alpha) * w_S + alpha * w_L for each pair of floating-point arrays.

    Args:
        weights_small: a list of arrays (e.g. from `model.get_weights()`).
        weights_large: a list of arrays of the same shapes.
        alpha: the interpolation coefficient; 0 gives `weights_small`, 1 gives
            `weights_large`, values outside [0, 1] extrapolate.

    Returns:
        The interpolated arrays, with the dtypes of `weights_small`. Non-float
        arrays are copied from `weights_small`.
    """
    if len(weights_small) != len(weights_large):
        raise ValueError(
            "weights_small and weights_large must have the same length; received "
            f"{len(weights_small)} and {len(weights_large)}."
        )
    result = []
    for small, large in zip(weights_small, weights_large, strict=True):
        small, large = np.asarray(small), np.asarray(large)
        if small.shape != large.shape:
            raise ValueError(f"weight shapes differ: {small.shape} and {large.shape}.")
        if np.issubdtype(small.dtype, np.floating):
            mixed = (1.0 - alpha) * small.astype(np.float64) + alpha * large.astype(np.float64)
            result.append(mixed.astype(small.dtype))
        else:
            result.append(small.copy())
    return result


def _batchnorm_layers(model: keras.Model) -> list:
    """Layers with BatchNormalization's moving-statistics update rule.

    `keras.layers.BatchNormalization`, and any layer with `moving_mean` and
    `moving_variance` weights and a float `momentum` read at call time, updated as
    moving = momentum * moving + (1 - momentum) * batch (e.g. ghost batch norm).
    """
    return [
        layer
        for layer in internals.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
        or all(hasattr(layer, name) for name in ("moving_mean", "moving_variance", "momentum"))
    ]


def recompute_batchnorm_statistics(model: keras.Model, train_data, *, batch_size: int = 256):
    """Resets every BN layer's moving mean/variance to averages over `train_data`, in place.

    One pass over `train_data` in training mode; for the j-th batch of n_j examples,
    after n examples were seen, the BN momentum is n / (n + n_j), so the moving
    statistics end as the batch-size-weighted average of the per-batch means and
    (biased) variances. Modifies `model`: call it on a copy.

    Args:
        model: a Keras model; its BatchNormalization layers (including those in
            nested models, and layers with the same `moving_mean`,
            `moving_variance` and `momentum` update rule, such as ghost batch
            normalization) are updated. Batch renormalization is not supported.
        train_data: `(x, y)` arrays or a batched `tf.data.Dataset` of `(x, y)`.
        batch_size: batch size for arrays.

    Returns:
        The number of BatchNormalization layers updated.
    """
    layers = _batchnorm_layers(model)
    for layer in layers:
        if getattr(layer, "renorm", False):
            raise ValueError(
                f"recompute_batchnorm_statistics does not support batch renormalization; "
                f"layer {layer.name!r} has renorm=True."
            )
    if not layers:
        return 0
    saved = [(layer.momentum, layer.trainable) for layer in layers]
    try:
        for layer in layers:
            layer.trainable = True
        seen = 0
        for x, y in _common.iterate_batches(train_data, batch_size, "train_data"):
            n = _common.batch_length(y)
            for layer in layers:
                layer.momentum = seen / (seen + n)
            model(x, training=True)
            seen += n
    finally:
        for layer, (momentum, trainable) in zip(layers, saved, strict=True):
            layer.momentum = momentum
            layer.trainable = trainable
    return len(layers)


def _correct_predictions(y_true, logits):
    """1.0 where argmax(logits) equals the label (sparse or one-hot), else 0.0."""
    if logits.shape.rank < 2 or logits.shape[-1] is None or logits.shape[-1] < 2:
        raise ValueError(
            "accuracy needs a classifier with one output per class (last dimension >= 2); "
            f"the model outputs shape {logits.shape}."
        )
    predicted = tf.argmax(logits, axis=-1)
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == logits.shape.rank and y_true.shape[-1] == logits.shape[-1]:
        labels = tf.argmax(y_true, axis=-1)
    else:
        labels = tf.reshape(tf.cast(y_true, tf.int64), tf.shape(predicted))
    return tf.cast(tf.equal(labels, predicted), tf.float64)


def _make_evaluator(model: keras.Model, loss):
    @tf.function(reduce_retracing=True)
    def totals(x, y):
        logits = model(x, training=False)
        losses = tf.cast(_common.per_example_loss(loss, y, logits), tf.float64)
        return tf.reduce_sum(losses), tf.reduce_sum(_correct_predictions(y, logits))

    def evaluate(data, batch_size, name):
        loss_sum, correct, count = 0.0, 0.0, 0
        for x, y in _common.iterate_batches(data, batch_size, name):
            batch_loss, batch_correct = totals(x, y)
            loss_sum += float(batch_loss)
            correct += float(batch_correct)
            count += _common.batch_length(y)
        if count == 0:
            raise ValueError(f"{name} holds no examples.")
        return loss_sum / count, correct / count

    return evaluate


def evaluate_loss_accuracy(model, data, *, loss=None, batch_size: int = 256):
    """Mean loss and accuracy of a classifier over a whole dataset, in inference mode.

    Args:
        model: a Keras model outputting one score per class (logits by default).
        data: `(x, y)` arrays or a batched `tf.data.Dataset` of `(x, y)`; labels
            sparse (integers) or one-hot.
        loss: a `keras.losses.Loss` or a per-example loss function; defaults to
            `SparseCategoricalCrossentropy(from_logits=True)`.
        batch_size: batch size for arrays.

    Returns:
        `(mean_loss, accuracy)` as floats, each averaged over all examples (so
        batches of unequal size are weighted by their size).
    """
    evaluate = _make_evaluator(model, _common.resolve_loss(loss))
    return evaluate(data, batch_size, "data")


def interpolated_model(
    model_small,
    model_large,
    alpha: float,
    *,
    batchnorm: str = "interpolate",
    train_data=None,
    batch_size: int = 256,
) -> keras.Model:
    """A new model with weights theta(alpha) = (1 - alpha) theta_S + alpha theta_L.

    Args:
        model_small: a model, or the path of a `.keras` file; not modified.
        model_large: a model of the same architecture, or a path; not modified.
        alpha: interpolation coefficient.
        batchnorm: ``"interpolate"`` (default) or ``"recompute"``; see the module
            docstring.
        train_data: training data, required for ``batchnorm="recompute"``.
        batch_size: batch size for array data.

    Returns:
        A clone of `model_small` holding the interpolated weights.
    """
    model_small = _common.load_model(model_small, "model_small")
    model_large = _common.load_model(model_large, "model_large")
    _check_batchnorm(batchnorm)
    _check_compatible(model_small, model_large)
    if batchnorm == "recompute" and train_data is None:
        raise ValueError('batchnorm="recompute" needs train_data; received train_data=None.')
    clone = keras.models.clone_model(model_small)
    clone.set_weights(
        interpolate_weights(model_small.get_weights(), model_large.get_weights(), float(alpha))
    )
    if batchnorm == "recompute":
        recompute_batchnorm_statistics(clone, train_data, batch_size=batch_size)
    return clone


def parametric_interpolation(
    model_small,
    model_large,
    train_data,
    val_data=None,
    *,
    alphas=None,
    loss=None,
    batch_size: int = 256,
    batchnorm: str = "interpolate",
) -> InterpolationResult:
    """Loss and accuracy along the line through two minima (Keskar et al.'s parametric plot).

    theta(a) = (1 - a) theta_S + a theta_L is evaluated, in inference mode, on the
    training data and the validation data for every a in `alphas`.

    Args:
        model_small: the small-batch model theta_S (a = 0), or a `.keras` path.
        model_large: the large-batch model theta_L (a = 1), or a `.keras` path; same
            architecture. Neither model is modified: the work happens on a clone.
        train_data: `(x, y)` arrays or a batched `tf.data.Dataset` of `(x, y)`.
        val_data: the same for validation data, or None.
        alphas: 1-D sequence of coefficients; default `np.linspace(-1, 2, 25)`.
        loss: a `keras.losses.Loss` or per-example loss function; default
            `SparseCategoricalCrossentropy(from_logits=True)`. Regularization
            penalties are not included (the plot shows the data loss).
        batch_size: batch size for array data.
        batchnorm: ``"interpolate"`` (default: all weights, moving statistics
            included, are interpolated alike) or ``"recompute"`` (moving statistics
            recomputed from `train_data` at each a). See the module docstring.

    Returns:
        An `InterpolationResult`.

    References:
        Keskar et al., ICLR 2017, Fig. 2; Jaiswal & Taura, Section 2.3.2, Fig. 6.
    """
    model_small = _common.load_model(model_small, "model_small")
    model_large = _common.load_model(model_large, "model_large")
    _check_batchnorm(batchnorm)
    _check_compatible(model_small, model_large)
    alphas = default_alphas() if alphas is None else np.asarray(alphas, dtype=np.float64)
    if alphas.ndim != 1 or alphas.size == 0 or not np.all(np.isfinite(alphas)):
        raise ValueError(
            f"alphas must be a non-empty 1-D sequence of finite numbers; received {alphas!r}."
        )
    loss = _common.resolve_loss(loss)
    weights_small, weights_large = model_small.get_weights(), model_large.get_weights()
    clone = keras.models.clone_model(model_small)
    evaluate = _make_evaluator(clone, loss)
    columns = {"train_loss": [], "train_accuracy": [], "val_loss": [], "val_accuracy": []}
    for alpha in alphas:
        clone.set_weights(interpolate_weights(weights_small, weights_large, float(alpha)))
        if batchnorm == "recompute":
            recompute_batchnorm_statistics(clone, train_data, batch_size=batch_size)
        train_loss, train_accuracy = evaluate(train_data, batch_size, "train_data")
        columns["train_loss"].append(train_loss)
        columns["train_accuracy"].append(train_accuracy)
        if val_data is not None:
            val_loss, val_accuracy = evaluate(val_data, batch_size, "val_data")
            columns["val_loss"].append(val_loss)
            columns["val_accuracy"].append(val_accuracy)
    arrays = {key: np.asarray(value) if value else None for key, value in columns.items()}
    return InterpolationResult(alphas=alphas.copy(), batchnorm=batchnorm, **arrays)
