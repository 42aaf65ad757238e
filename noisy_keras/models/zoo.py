"""Models from a small registry, by name.

Every model maps inputs to **logits** (no softmax): train with
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``.

| name       | for                     | BatchNormalization |
|------------|-------------------------|--------------------|
| `mlp`      | any input (flattened)   | no                 |
| `cnn`      | small images (digits)   | no                 |
| `cnn1d`    | 1-D signals (mnist1d)   | no                 |
| `cnn1d_bn` | 1-D signals (mnist1d)   | yes                |
| `resnet20` | CIFAR-size images       | yes                |
| `resnet50` | images, side >= 32      | yes                |

With `ghost_batch_size`, every `BatchNormalization` is replaced by a
`GhostBatchNormalization` of that ghost size with the same configuration
(Hoffer et al. 2017). With `zero_init_residual`, the last BatchNormalization
of every residual block starts with gamma = 0 (`RESIDUAL_LAST_BATCH_NORM`), so
each block starts as its shortcut (Goyal et al. 2017, Sec. 5.1).

Weights are initialized from `seed`: each layer's initializers get their own
seed derived from (seed, layer index), so the same seed gives the same weights
without touching global random state.

Under a mixed-precision dtype policy (`keras.config.set_dtype_policy(
"mixed_float16")` or `"mixed_bfloat16"`) every model ends in a float32 linear
activation, so its logits, and the loss, are float32 (Keras' advice for mixed
precision). `cnn` and `resnet50` have max pooling (`registry.MODELS_WITH_MAX_POOLING`),
whose gradient XLA cannot compute deterministically.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable

import keras
import numpy as np
from keras import layers

from noisy_keras._validation import check_int, is_int
from noisy_keras.models.layers import ChannelZeroPadding, GhostBatchNormalization, Subsample2D
from noisy_keras.models.registry import (
    MODEL_NAMES,
    MODELS_WITH_BATCH_NORM,
)

RESIDUAL_LAST_BATCH_NORM = {
    "resnet20": r"^stage\d+_block\d+_2_bn$",
    "resnet50": r"^conv\d+_block\d+_3_bn$",
}
"""Per model, the names of the BatchNormalization layers that end a residual block (re.match)."""
_INITIALIZER_KEYS = (
    "kernel_initializer",
    "bias_initializer",
    "depthwise_initializer",
    "pointwise_initializer",
    "embeddings_initializer",
)


def _mlp(input_shape, num_classes):
    """Two hidden ReLU layers of 256 units on the flattened input."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dense(256, activation="relu"),
            layers.Dense(num_classes),
        ],
        name="mlp",
    )


def _cnn(input_shape, num_classes):
    """Three 3x3 ReLU convolutions (32, 64, 128), two 2x2 max-pools, dense 128.

    On 8x8x1 digits: 159,626 parameters. Needs a spatial side >= 4.
    """
    if len(input_shape) != 3 or min(input_shape[:2]) < 4:
        raise ValueError(
            f"model 'cnn' needs image inputs (height, width, channels) with sides >= 4; "
            f"received input_shape={tuple(input_shape)}."
        )
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(128, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(num_classes),
        ],
        name="cnn",
    )


def _check_signal_input(name: str, input_shape) -> None:
    if len(input_shape) != 2:
        raise ValueError(
            f"model {name!r} needs 1-D signal inputs (length, channels); received "
            f"input_shape={tuple(input_shape)}."
        )


def _cnn1d(input_shape, num_classes):
    """Three 1-D ReLU convolutions (32 channels, width 5, stride 2), then linear.

    Close to MNIST-1D's reference CNN (Greydanus 2020); on (40, 1) signals:
    12,106 parameters.
    """
    _check_signal_input("cnn1d", input_shape)
    return keras.Sequential(
        [
            keras.Input(input_shape),
            layers.Conv1D(32, 5, strides=2, padding="same", activation="relu"),
            layers.Conv1D(32, 5, strides=2, padding="same", activation="relu"),
            layers.Conv1D(32, 5, strides=2, padding="same", activation="relu"),
            layers.Flatten(),
            layers.Dense(num_classes),
        ],
        name="cnn1d",
    )


def _cnn1d_bn(input_shape, num_classes):
    """`cnn1d` with BatchNormalization: each convolution (no bias) -> BN -> ReLU.

    The model of the study's Ghost BatchNorm arm (Hoffer et al. 2017), which
    needs BatchNormalization to act on; 12,394 parameters on (40, 1) signals,
    of which 192 are BN moving statistics.
    """
    _check_signal_input("cnn1d_bn", input_shape)
    inputs = keras.Input(input_shape)
    x = inputs
    for index in range(3):
        x = layers.Conv1D(32, 5, strides=2, padding="same", use_bias=False, name=f"conv{index}")(x)
        x = layers.BatchNormalization(name=f"bn{index}")(x)
        x = layers.ReLU(name=f"relu{index}")(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, layers.Dense(num_classes)(x), name="cnn1d_bn")


def _resnet20(input_shape, num_classes):
    """CIFAR ResNet-20 (He et al. 2016, Sec. 4.2): 6n+2 layers with n = 3.

    A 3x3 convolution with 16 filters, then three stages of three basic blocks
    (two 3x3 convolutions each) with 16, 32 and 64 filters; the first block of
    stages 2 and 3 halves the resolution. Shortcuts that change shape are
    identity with stride-2 subsampling and zero-padded channels (option A), so
    the model has 0.27M parameters (for 10 classes 269,722 trainable, 271,098 with
    the moving statistics). BatchNormalization
    (momentum 0.9, epsilon 1e-5) after every convolution; global average
    pooling; a dense layer to logits.
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"model 'resnet20' needs image inputs (height, width, channels); received "
            f"input_shape={tuple(input_shape)}."
        )

    def conv_bn(x, filters, strides, name):
        x = layers.Conv2D(
            filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
        )(x)
        return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)

    inputs = keras.Input(input_shape)
    x = layers.ReLU()(conv_bn(inputs, 16, 1, "stem"))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            strides = 2 if stage > 0 and block == 0 else 1
            name = f"stage{stage + 1}_block{block + 1}"
            y = layers.ReLU()(conv_bn(x, filters, strides, f"{name}_1"))
            y = conv_bn(y, filters, 1, f"{name}_2")
            residual = x
            if strides != 1 or x.shape[-1] != filters:
                residual = Subsample2D(strides, name=f"{name}_subsample")(x)
                extra = filters - x.shape[-1]
                residual = ChannelZeroPadding(extra // 2, extra - extra // 2, name=f"{name}_pad")(
                    residual
                )
            x = layers.ReLU()(layers.Add()([y, residual]))
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="resnet20")


def _resnet50(input_shape, num_classes):
    """ResNet-50 (He et al. 2016) from `keras.applications`, untrained, logits out.

    `keras.applications.ResNet50(weights=None, classes=num_classes,
    classifier_activation=None)`: 23,608,202 parameters for 10 classes at any
    input size; BatchNormalization with epsilon 1.001e-5 after every
    convolution. Needs a spatial side >= 32 and 3 channels.
    """
    if len(input_shape) != 3 or min(input_shape[:2]) < 32 or input_shape[2] != 3:
        raise ValueError(
            "model 'resnet50' needs RGB images with sides >= 32 (height, width, 3); "
            f"received input_shape={tuple(input_shape)}."
        )
    return keras.applications.ResNet50(
        weights=None,
        include_top=True,
        input_shape=tuple(input_shape),
        classes=num_classes,
        classifier_activation=None,
    )


_BUILDERS: dict[str, Callable[..., keras.Model]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "cnn1d": _cnn1d,
    "cnn1d_bn": _cnn1d_bn,
    "resnet20": _resnet20,
    "resnet50": _resnet50,
}


def _layer_seed(seed: int, layer_index: int, key_index: int) -> int:
    return int(np.random.SeedSequence([seed, layer_index, key_index]).generate_state(1)[0])


def _seeded_clone(
    model: keras.Model, seed: int, ghost_batch_size: int | None, zero_gamma: str | None = None
) -> keras.Model:
    """Rebuilds `model` with seeded initializers, optionally ghost BN and zero gammas.

    `zero_gamma`: BatchNormalization layers whose name matches it get gamma_initializer zeros.
    """
    layer_index = {id(layer): index for index, layer in enumerate(model.layers)}

    def clone_layer(layer):
        if (
            zero_gamma is not None
            and isinstance(layer, layers.BatchNormalization)
            and re.match(zero_gamma, layer.name)
        ):
            layer = layer.__class__.from_config(
                {**layer.get_config(), "gamma_initializer": "zeros"}
            )
        if ghost_batch_size is not None and isinstance(layer, layers.BatchNormalization):
            return GhostBatchNormalization.from_batch_normalization(layer, ghost_batch_size)
        config = layer.get_config()
        for key_index, key in enumerate(_INITIALIZER_KEYS):
            initializer = config.get(key)
            if isinstance(initializer, dict) and "seed" in initializer.get("config", {}):
                initializer = {**initializer, "config": dict(initializer["config"])}
                initializer["config"]["seed"] = _layer_seed(seed, layer_index[id(layer)], key_index)
                config[key] = initializer
        return layer.__class__.from_config(config)

    return keras.models.clone_model(model, clone_function=clone_layer)


def build_model(
    name: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    ghost_batch_size: int | None = None,
    seed: int = 0,
    zero_init_residual: bool = False,
) -> keras.Model:
    """Builds a model by name; its outputs are logits.

    Models: `mlp` (2x256 ReLU), `cnn` (small conv net for 8x8 digits, ~160k
    parameters), `cnn1d` (for MNIST-1D), `resnet20` (CIFAR ResNet, He et al.
    2016) and `resnet50` (`keras.applications`, untrained). Only `resnet20`
    and `resnet50` have BatchNormalization. Train with
    `SparseCategoricalCrossentropy(from_logits=True)`.

    Args:
        name: one of `MODEL_NAMES`.
        input_shape: shape of one example without the batch axis.
        num_classes: number of classes (logits), >= 2.
        ghost_batch_size: if set, every BatchNormalization becomes a
            `GhostBatchNormalization(virtual_batch_size=ghost_batch_size)` with
            the same configuration; only for models that have
            BatchNormalization. The per-replica batch size must be a multiple
            of it.
        seed: seed of the weight initialization, integer >= 0.
        zero_init_residual: start the last BatchNormalization of every residual
            block with gamma = 0 (`RESIDUAL_LAST_BATCH_NORM`; resnet20 and
            resnet50), so every block starts as its shortcut (Goyal et al.
            2017, "zero gamma").

    Returns:
        An uncompiled, built `keras.Model`.

    Raises:
        ValueError: unknown name, bad arguments, an input shape the model
            cannot take, or `ghost_batch_size` for a model without
            BatchNormalization.
    """
    if name not in _BUILDERS:
        raise ValueError(f"Unknown model name={name!r}; valid names are {', '.join(MODEL_NAMES)}.")
    if (
        not isinstance(input_shape, tuple | list)
        or not input_shape
        or not all(isinstance(d, numbers.Integral) and d >= 1 for d in input_shape)
    ):
        raise ValueError(
            "input_shape must be a non-empty tuple of positive integers; received "
            f"input_shape={input_shape!r}."
        )
    check_int("num_classes", num_classes, 2)
    check_int("seed", seed, 0)
    if ghost_batch_size is not None:
        if not is_int(ghost_batch_size) or ghost_batch_size < 1:
            raise ValueError(
                "ghost_batch_size must be an integer >= 1 or None; received "
                f"ghost_batch_size={ghost_batch_size!r}."
            )
        if name not in MODELS_WITH_BATCH_NORM:
            raise ValueError(
                f"ghost_batch_size={ghost_batch_size} has no effect on model {name!r}, which "
                "has no BatchNormalization; models with it: "
                f"{', '.join(MODELS_WITH_BATCH_NORM)}."
            )
    if zero_init_residual is not False and (
        zero_init_residual is not True or name not in RESIDUAL_LAST_BATCH_NORM
    ):
        raise ValueError(
            f"zero_init_residual must be True or False, True only for models with residual "
            f"blocks ({', '.join(RESIDUAL_LAST_BATCH_NORM)}); received "
            f"zero_init_residual={zero_init_residual!r} for model {name!r}."
        )
    model = _BUILDERS[name](tuple(int(d) for d in input_shape), int(num_classes))
    zero_gamma = RESIDUAL_LAST_BATCH_NORM[name] if zero_init_residual else None
    return _float32_logits(_seeded_clone(model, int(seed), ghost_batch_size, zero_gamma))


def _float32_logits(model: keras.Model) -> keras.Model:
    """`model` with a float32 linear activation after its logits, under a mixed dtype policy."""
    if keras.config.dtype_policy().compute_dtype == "float32":
        return model
    logits = layers.Activation("linear", dtype="float32", name="logits_float32")(model.outputs[0])
    return keras.Model(model.inputs, logits, name=model.name)


def has_max_pooling(model: keras.Model) -> bool:
    """Whether any layer of `model`, nested ones included, is a max-pooling layer (1-D/2-D/3-D).

    XLA has no deterministic gradient for max pooling: see
    `noisy_keras.engine.distribute.resolve_determinism`.
    """
    pooling = (layers.MaxPooling1D, layers.MaxPooling2D, layers.MaxPooling3D)
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        if isinstance(layer, pooling):
            return True
        stack.extend(getattr(layer, "layers", []))
    return False
