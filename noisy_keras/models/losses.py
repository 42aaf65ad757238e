"""Cross-entropy with label smoothing for integer labels (Keras' sparse loss has no smoothing).

Label smoothing (Szegedy et al. 2016) trains towards the target distribution
q = (1 - eps) onehot(y) + eps / K over K classes instead of onehot(y):

    loss = -sum_k q_k log p_k = -(1 - eps) log p_y - (eps / K) sum_k log p_k,
    p = softmax(logits).

Keras' `CategoricalCrossentropy(label_smoothing=eps)` uses the same q on
one-hot labels; this one takes integer labels, as the package's datasets give.
It is part of the large-batch ImageNet recipes (e.g. Goyal et al.'s successors
at 32k: Ying et al. 2018).

References:
    C. Szegedy et al., "Rethinking the Inception Architecture for Computer
    Vision", CVPR 2016, Sec. 7.
"""

from __future__ import annotations

import keras
from keras import ops

from noisy_keras._validation import check_number

__all__ = ["SmoothedSparseCategoricalCrossentropy", "smoothed_sparse_cross_entropy"]


def smoothed_sparse_cross_entropy(labels, logits, label_smoothing: float):
    """Per-example -(1 - eps) log p_y - (eps / K) sum_k log p_k with p = softmax(logits).

    Args:
        labels: integer labels, shape (batch,).
        logits: shape (batch, K); computed in float32 whatever their dtype.
        label_smoothing: eps in [0, 1).

    Returns:
        float32 losses, shape (batch,).
    """
    log_p = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    labels = ops.cast(ops.reshape(labels, (-1, 1)), "int32")
    target = -ops.take_along_axis(log_p, labels, axis=-1)[:, 0]
    if not label_smoothing:
        return target
    uniform = -ops.mean(log_p, axis=-1)
    return (1.0 - label_smoothing) * target + label_smoothing * uniform


@keras.saving.register_keras_serializable(package="noisy_keras")
class SmoothedSparseCategoricalCrossentropy(keras.losses.Loss):
    """Sparse categorical cross-entropy on logits with label smoothing (see the module docstring).

    Args:
        label_smoothing: eps in [0, 1); 0 is plain sparse cross-entropy.
        reduction: as in `keras.losses.Loss`.
        name: as in `keras.losses.Loss`.
        dtype: as in `keras.losses.Loss`.

    Example:
        >>> model.compile(optimizer, loss=SmoothedSparseCategoricalCrossentropy(0.1))
    """

    def __init__(
        self,
        label_smoothing: float = 0.1,
        reduction="sum_over_batch_size",
        name="smoothed_sparse_categorical_crossentropy",
        dtype=None,
    ):
        check_number("label_smoothing", label_smoothing, "a number in [0, 1)", lambda v: 0 <= v < 1)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        return smoothed_sparse_cross_entropy(y_true, y_pred, self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}
