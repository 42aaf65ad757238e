"""The package's layers: Ghost Batch Normalization, and the pieces of ResNet option A.

`GhostBatchNormalization` (Hoffer, Hubara & Soudry 2017): large mini-batches
make batch normalization's statistics less noisy, which is part of what the
large batch loses. Ghost Batch Normalization splits each
(per-replica) training batch into "ghost" batches of `virtual_batch_size`
examples and normalizes each with its own mean and variance, so the noise of
the statistics stays that of a small batch. Keras 2 had this as
`BatchNormalization(virtual_batch_size=...)`; Keras 3 dropped it.

`ChannelZeroPadding` and `Subsample2D` make the parameter-free shortcut of the
CIFAR ResNets (He et al. 2016, option A) in `noisy_keras.models.zoo`.

Reference:
    Hoffer, Hubara & Soudry 2017, "Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks", Sec. 4,
    https://arxiv.org/abs/1705.08741.
"""

from __future__ import annotations

import numbers

import keras
from keras import constraints, initializers, ops, regularizers

from noisy_keras._validation import check_int

# Keys of `keras.layers.BatchNormalization.get_config()` that have no ghost
# counterpart; `from_batch_normalization` accepts them only at their defaults.
_UNSUPPORTED_BATCH_NORM_KEYS = {
    "synchronized": False,
    "renorm": False,
    "renorm_clipping": None,
    "renorm_momentum": 0.99,
}


@keras.saving.register_keras_serializable(package="noisy_keras")
class GhostBatchNormalization(keras.layers.Layer):
    """Batch normalization over ghost batches of `virtual_batch_size` examples.

    **Training** (`training=True` and the layer trainable): the batch of B
    examples this layer sees (per replica under a distribution strategy) is
    split, in order, into G = B / virtual_batch_size consecutive ghost batches.
    Ghost batch g is normalized with its own statistics over its examples and
    every non-channel axis: ``y = gamma * (x - mean_g) / sqrt(var_g + epsilon) +
    beta``, where `var_g` is the biased (divide-by-n) variance, as in
    `keras.layers.BatchNormalization`. B must be a multiple of
    `virtual_batch_size`: a static batch size that is not raises a
    `ValueError`; a traced unknown batch size fails in the reshape at run time.
    Non-batch dimensions must be static.

    **Moving statistics** are updated once per call (once per training step),
    with the mean over the G ghost batches of their means and of their
    variances::

        moving_mean     = momentum * moving_mean     + (1 - momentum) * mean_g(mean_g)
        moving_variance = momentum * moving_variance + (1 - momentum) * mean_g(var_g)

    This is the rule of Keras 2's `virtual_batch_size`. The mean of the ghost
    means is the batch mean; the mean of the ghost variances is the average
    within-ghost variance, which is what the layer normalized with in training
    (it leaves out the spread between ghost means). With `virtual_batch_size`
    equal to the batch size the layer computes exactly what
    `keras.layers.BatchNormalization` computes, outputs and moving statistics.

    **Inference** (`training=False`, or the layer frozen): normalizes with the
    moving statistics, like `BatchNormalization`.

    Computation is in float32 for float16/bfloat16 inputs. Masks are not
    supported (a `mask` other than None raises). The layer is pure `keras.ops`,
    so it runs under `tf.function(jit_compile=True)` and inside
    `model.stateless_call`.

    Args:
        virtual_batch_size: examples per ghost batch, an integer >= 1.
        axis: the channel (feature) axis, an integer other than the batch
            axis 0; default -1.
        momentum: momentum of the moving statistics, in [0, 1].
        epsilon: added to the variance before the square root, > 0.
        center: whether to add the learned offset `beta`.
        scale: whether to multiply by the learned scale `gamma`.
        beta_initializer: as in `keras.layers.BatchNormalization`.
        gamma_initializer: as in `keras.layers.BatchNormalization`.
        moving_mean_initializer: as in `keras.layers.BatchNormalization`.
        moving_variance_initializer: as in `keras.layers.BatchNormalization`.
        beta_regularizer: as in `keras.layers.BatchNormalization`.
        gamma_regularizer: as in `keras.layers.BatchNormalization`.
        beta_constraint: as in `keras.layers.BatchNormalization`.
        gamma_constraint: as in `keras.layers.BatchNormalization`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Its weights are created in the order of `BatchNormalization`'s (gamma,
    beta, moving_mean, moving_variance), so `set_weights(bn.get_weights())`
    carries a trained BatchNormalization over.
    """

    def __init__(
        self,
        virtual_batch_size: int,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_int("virtual_batch_size", virtual_batch_size, 1)
        if not isinstance(axis, numbers.Integral) or isinstance(axis, bool) or axis == 0:
            raise ValueError(
                "axis must be one integer naming the channel axis, not the batch axis 0; "
                f"received axis={axis!r}."
            )
        if not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
            raise ValueError(
                f"momentum must be a number in [0, 1]; received momentum={momentum!r}."
            )
        if not isinstance(epsilon, numbers.Real) or not epsilon > 0:
            raise ValueError(f"epsilon must be a number > 0; received epsilon={epsilon!r}.")
        self.virtual_batch_size = int(virtual_batch_size)
        self.axis = int(axis)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = False

    @classmethod
    def from_batch_normalization(
        cls, layer: keras.layers.BatchNormalization, virtual_batch_size: int
    ) -> GhostBatchNormalization:
        """A ghost version of `layer` with the same configuration (not weights).

        Args:
            layer: a `keras.layers.BatchNormalization`.
            virtual_batch_size: examples per ghost batch.

        Returns:
            A new, unbuilt `GhostBatchNormalization` with `layer`'s name,
            axis, momentum, epsilon, center, scale, initializers, regularizers
            and constraints.

        Raises:
            ValueError: `layer` uses `synchronized` or batch renormalization.
        """
        config = layer.get_config()
        for key, default in _UNSUPPORTED_BATCH_NORM_KEYS.items():
            value = config.pop(key, default)
            if value != default:
                raise ValueError(
                    f"Cannot make a ghost version of layer {layer.name!r}: {key}={value!r} is "
                    f"not supported (allowed: {key}={default!r})."
                )
        axis = config["axis"]
        if isinstance(axis, list | tuple):
            if len(axis) != 1:
                raise ValueError(
                    f"Cannot make a ghost version of layer {layer.name!r}: axis={axis!r}; "
                    "only one channel axis is supported."
                )
            config["axis"] = axis[0]
        return cls(virtual_batch_size=virtual_batch_size, **config)

    def build(self, input_shape):
        ndim = len(input_shape)
        axis = self.axis % ndim if -ndim <= self.axis < ndim else None
        if axis is None or axis == 0:
            raise ValueError(
                f"axis={self.axis} is not a channel axis of an input of shape {input_shape}."
            )
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"The channel axis {self.axis} of the input shape {input_shape} must be known."
            )
        self._channel_axis = axis
        self.input_spec = keras.layers.InputSpec(ndim=ndim, axes={axis: channels})
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape,
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True,
                autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape,
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True,
                autocast=False,
            )
        self.moving_mean = self.add_weight(
            shape=shape,
            name="moving_mean",
            initializer=self.moving_mean_initializer,
            trainable=False,
            autocast=False,
        )
        self.moving_variance = self.add_weight(
            shape=shape,
            name="moving_variance",
            initializer=self.moving_variance_initializer,
            trainable=False,
            autocast=False,
        )

    @staticmethod
    def _broadcast(vector, ndim, channel_axis):
        shape = [1] * ndim
        shape[channel_axis] = -1
        return ops.reshape(vector, shape)

    def _ghost_moments(self, inputs):
        """Per-ghost-batch mean and variance, shaped to broadcast against `inputs`.

        Returns (ghost_inputs, mean, variance) with ghost_inputs of shape
        (G, virtual_batch_size, *inputs.shape[1:]) and statistics of shape
        (G, 1, ...) with the channel axis kept.
        """
        if any(inputs.shape[a] is None for a in range(1, len(inputs.shape))):
            raise ValueError(
                f"Layer {self.name!r} needs every non-batch dimension known; received an "
                f"input of shape {inputs.shape}."
            )
        batch_size = inputs.shape[0]
        if batch_size is not None and batch_size % self.virtual_batch_size:
            raise ValueError(
                f"The batch size {batch_size} seen by layer {self.name!r} (per replica) is not "
                f"a multiple of virtual_batch_size={self.virtual_batch_size}; choose a "
                "per-replica batch size divisible by the ghost batch size."
            )
        # With an unknown (traced) batch size the reshape itself fails at run time
        # when the batch is not a multiple of the ghost size.
        ghost_shape = (-1, self.virtual_batch_size) + tuple(inputs.shape[1:])
        ghost_inputs = ops.reshape(inputs, ghost_shape)
        ghost_channel_axis = self._channel_axis + 1
        reduction_axes = [a for a in range(1, len(ghost_shape)) if a != ghost_channel_axis]
        mean, variance = ops.moments(ghost_inputs, axes=reduction_axes, keepdims=True)
        return ghost_inputs, mean, variance

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise ValueError(
                f"Layer {self.name!r} (GhostBatchNormalization) does not support masks; "
                "received a mask."
            )
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, compute_dtype)
        ndim = len(inputs.shape)
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None

        if training and self.trainable:
            ghost_inputs, mean, variance = self._ghost_moments(inputs)
            channel_mean = ops.reshape(ops.mean(mean, axis=0), (-1,))
            channel_variance = ops.reshape(ops.mean(variance, axis=0), (-1,))
            self.moving_mean.assign(
                ops.cast(self.moving_mean, compute_dtype) * self.momentum
                + channel_mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                ops.cast(self.moving_variance, compute_dtype) * self.momentum
                + channel_variance * (1.0 - self.momentum)
            )
            scale = ops.rsqrt(variance + self.epsilon)
            if gamma is not None:
                scale = scale * self._broadcast(gamma, ndim + 1, self._channel_axis + 1)
            outputs = (ghost_inputs - mean) * scale
            if beta is not None:
                outputs = outputs + self._broadcast(beta, ndim + 1, self._channel_axis + 1)
            outputs = ops.reshape(outputs, ops.shape(inputs))
        else:
            outputs = ops.batch_normalization(
                x=inputs,
                mean=ops.cast(self.moving_mean, compute_dtype),
                variance=ops.cast(self.moving_variance, compute_dtype),
                axis=self._channel_axis,
                offset=beta,
                scale=gamma,
                epsilon=self.epsilon,
            )
        return ops.cast(outputs, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        config = {
            "virtual_batch_size": self.virtual_batch_size,
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        return {**super().get_config(), **config}


@keras.saving.register_keras_serializable(package="noisy_keras")
class ChannelZeroPadding(keras.layers.Layer):
    """Appends zero channels (last axis): the parameter-free shortcut of ResNet option A.

    Args:
        before: zero channels put before the input's channels.
        after: zero channels put after them.
    """

    def __init__(self, before: int, after: int, **kwargs):
        super().__init__(**kwargs)
        self.before = int(before)
        self.after = int(after)

    def call(self, inputs):
        padding = [[0, 0]] * (len(inputs.shape) - 1) + [[self.before, self.after]]
        return keras.ops.pad(inputs, padding)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (input_shape[-1] + self.before + self.after,)

    def get_config(self) -> dict:
        return {**super().get_config(), "before": self.before, "after": self.after}


@keras.saving.register_keras_serializable(package="noisy_keras")
class Subsample2D(keras.layers.Layer):
    """Keeps every `stride`-th row and column (from the first): `x[:, ::stride, ::stride, :]`.

    The stride-s subsampling of ResNet option A's shortcut. Equal to
    `MaxPooling2D(1, strides=s)` in value and gradient, but a strided slice,
    whose gradient XLA computes deterministically (max pooling's it cannot).

    Args:
        stride: the step, an integer >= 1.
    """

    def __init__(self, stride: int, **kwargs):
        super().__init__(**kwargs)
        self.stride = check_int("stride", stride, 1)

    def call(self, inputs):
        return inputs[:, :: self.stride, :: self.stride, :]

    def compute_output_shape(self, input_shape):
        def subsampled(n):
            return None if n is None else -(-n // self.stride)

        return (
            input_shape[0],
            subsampled(input_shape[1]),
            subsampled(input_shape[2]),
            input_shape[3],
        )

    def get_config(self) -> dict:
        return {**super().get_config(), "stride": self.stride}
