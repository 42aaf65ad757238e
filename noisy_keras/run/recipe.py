"""From a run configuration to the objects a run trains with: data, schedule, optimizer, model.

Each builder reads the fields of `TrainConfig` it needs and finds what to build
by name in a dict (`OPTIMIZER_BUILDERS`); the main job (`noisy_keras.train`),
the experiment runner and notebooks all build runs this way.

The recipe is the paper's (Jaiswal & Taura, Section 4): the learning rate tuned
at `base_batch_size` is scaled to `batch_size` (linear, Goyal et al. 2017; or
sqrt, Hoffer et al. 2017), optionally warmed up, and multiplied by
`lr_decay_factor` at epochs 25, 40 and every 10 epochs after; Gaussian noise of
variance `noise_alpha / (1 + t)^noise_gamma` is added to every gradient by
`NoisyOptimizer`. Other noise kinds (`noise`): none, covariance-matched white
noise (`MatchedNoiseOptimizer`) and multiplicative per-example noise
(`enable_multiplicative_noise`, on the compiled model), both sized by the
temperature deficit s^2 = (B/b)/m - 1 at the learning-rate multiplier m of the
run's scaling rule from b = `noise_batch_size` to B (`noise_lr_multiplier`).

The large-batch ImageNet recipe adds (each a `TrainConfig` field): LARS
(`optimizer="lars"`, You et al. 2017) with `weight_decay` as its L2
coefficient; no weight decay (and, for LARS, no layer adaptation) on
BatchNormalization and bias variables (`weight_decay_exclude_bn_bias`,
`BN_AND_BIAS_PATTERNS`); zero-initialised last BatchNormalization gamma per
residual block; label smoothing; top-5 accuracy; streamed input with the
ResNet preprocessing (`noisy_keras.data.streaming`).

The methods a study compares against: SAM or the gradient-norm penalty
(`method`, on the model's training step: `noisy_keras.engine.methods`) and an
exponential moving average of the weights (`ema_momentum`, Keras' `use_ema` on
the inner optimizer, written into the model when training ends).
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from noisy_keras.data import datasets
from noisy_keras.engine import methods
from noisy_keras.models import zoo as models
from noisy_keras.models.losses import SmoothedSparseCategoricalCrossentropy
from noisy_keras.noise import temperature
from noisy_keras.noise.matched import MatchedNoiseOptimizer
from noisy_keras.noise.multiplicative import enable_multiplicative_noise
from noisy_keras.noise.optimizer import NoisyOptimizer
from noisy_keras.optim import schedule
from noisy_keras.optim.lars import LARS
from noisy_keras.run.config import TrainConfig

__all__ = [
    "BN_AND_BIAS_PATTERNS",
    "NOISE_WRAPPERS",
    "OPTIMIZER_BUILDERS",
    "add_gradient_method",
    "add_model_noise",
    "build_compiled_model",
    "load_data",
    "make_model",
    "make_inner_optimizer",
    "make_optimizer",
    "make_schedule",
    "noise_lr_multiplier",
]

BN_AND_BIAS_PATTERNS = (r"(^|/)(gamma|beta|bias)(:\d+)?$",)
"""Regular expressions (re.search) for BatchNormalization's gamma and beta and every bias.

Matched against `variable.path` ("conv1_bn/gamma") by LARS and, by Keras'
optimizers on the TensorFlow backend, against the name of the underlying
`tf.Variable`, which ends in ":0" ("gamma:0"; a pattern ending in "gamma$" would
silently match nothing). The models' only variables with these names are
BatchNormalization (and ghost BN) scales and offsets and biases."""


def _averaging(config: TrainConfig) -> dict:
    """Keras' exponential moving average of the weights (`use_ema`), if the run asks for it."""
    if not config.ema_momentum:
        return {}
    return {"use_ema": True, "ema_momentum": config.ema_momentum}


def _common(config: TrainConfig, learning_rate) -> dict:
    return {
        "learning_rate": learning_rate,
        "weight_decay": config.weight_decay or None,
        **_averaging(config),
    }


OPTIMIZER_BUILDERS: dict[str, Callable[[TrainConfig, object], keras.optimizers.Optimizer]] = {
    "sgd": lambda c, rate: keras.optimizers.SGD(**_common(c, rate)),
    "momentum": lambda c, rate: keras.optimizers.SGD(momentum=c.momentum, **_common(c, rate)),
    "nesterov": lambda c, rate: keras.optimizers.SGD(
        momentum=c.momentum, nesterov=True, **_common(c, rate)
    ),
    "adam": lambda c, rate: keras.optimizers.Adam(**_common(c, rate)),
    "adamw": lambda c, rate: keras.optimizers.AdamW(
        **{**_common(c, rate), "weight_decay": c.weight_decay}
    ),
    "lamb": lambda c, rate: keras.optimizers.Lamb(**_common(c, rate)),
    "rmsprop": lambda c, rate: keras.optimizers.RMSprop(momentum=c.momentum, **_common(c, rate)),
    "lion": lambda c, rate: keras.optimizers.Lion(**_common(c, rate)),
    # weight_decay is LARS' L2 coefficient: g + weight_decay * w enters the trust ratio.
    "lars": lambda c, rate: LARS(
        rate,
        momentum=c.momentum,
        weight_decay_rate=c.weight_decay,
        eeta=c.lars_eeta,
        exclude_from_weight_decay=(
            list(BN_AND_BIAS_PATTERNS) if c.weight_decay_exclude_bn_bias else None
        ),
        **_averaging(c),
    ),
}
"""Inner optimizers by `--optimizer` name: (config, learning rate or schedule) -> optimizer."""


def make_inner_optimizer(config: TrainConfig, learning_rate) -> keras.optimizers.Optimizer:
    """`OPTIMIZER_BUILDERS[config.optimizer]`, with BN and bias kept out of weight decay if asked.

    For Keras' optimizers `weight_decay_exclude_bn_bias` calls
    `exclude_from_weight_decay(var_names=BN_AND_BIAS_PATTERNS)`; LARS takes
    the patterns in its constructor (for weight decay and layer adaptation).
    """
    inner = OPTIMIZER_BUILDERS[config.optimizer](config, learning_rate)
    if config.weight_decay_exclude_bn_bias and config.optimizer != "lars":
        inner.exclude_from_weight_decay(var_names=list(BN_AND_BIAS_PATTERNS))
    return inner


def noise_lr_multiplier(config: TrainConfig) -> float:
    """m = eta_B / eta_b of the run's scaling rule, b = `noise_batch_size` (1 if unset)."""
    return temperature.lr_multiplier_for_rule(
        config.lr_scaling, config.batch_size, config.noise_batch_size or config.batch_size
    )


def _plain(config: TrainConfig, inner) -> NoisyOptimizer:
    # alpha = 0: updates bit-identical to the inner optimizer's, same class as the others.
    return NoisyOptimizer(inner, alpha=0.0, gamma=config.noise_gamma, seed=config.seed)


NOISE_WRAPPERS: dict[str, Callable[[TrainConfig, keras.optimizers.Optimizer], NoisyOptimizer]] = {
    "none": _plain,
    "white": lambda c, inner: NoisyOptimizer(
        inner, alpha=c.noise_alpha, gamma=c.noise_gamma, seed=c.seed
    ),
    "matched": lambda c, inner: MatchedNoiseOptimizer(
        inner,
        batch_size=c.batch_size,
        small_batch_size=c.noise_batch_size,
        lr_multiplier=noise_lr_multiplier(c),
        seed=c.seed,
    ),
    "multiplicative": _plain,  # the noise is in the model's loss: add_model_noise
}
"""The optimizer wrapper of each `--noise` kind: (config, inner optimizer) -> wrapper."""


def make_optimizer(config: TrainConfig, learning_rate) -> NoisyOptimizer:
    """The inner optimizer named by `config.optimizer`, wrapped in the run's noise.

    Args:
        config: uses optimizer, momentum, weight_decay, noise, noise_alpha,
            noise_gamma, noise_batch_size, batch_size, lr_scaling, seed.
        learning_rate: a float or a `LearningRateSchedule` (see `make_schedule`).
    """
    inner = make_inner_optimizer(config, learning_rate)
    return NOISE_WRAPPERS[config.noise](config, inner)


def add_model_noise(config: TrainConfig, model: keras.Model) -> keras.Model:
    """Puts the run's multiplicative noise on the compiled `model` (other kinds: unchanged).

    w ~ N(1, s^2) per example, s^2 = max(0, (B/b)/m - 1), seeded by `config.seed`
    (its key is salted apart from the white noise's).
    """
    if config.noise == "multiplicative":
        enable_multiplicative_noise(
            model,
            batch_size=config.batch_size,
            small_batch_size=config.noise_batch_size,
            lr_multiplier=noise_lr_multiplier(config),
            seed=config.seed,
        )
    return model


def add_gradient_method(config: TrainConfig, model: keras.Model) -> keras.Model:
    """Puts the run's gradient method (SAM, the gradient-norm penalty) on the compiled `model`."""
    if config.method == "sam":
        methods.enable_sam(model, rho=config.sam_rho, adaptive=config.sam_adaptive)
    elif config.method == "gradient_norm_penalty":
        methods.enable_gradient_norm_penalty(
            model, strength=config.penalty_strength, gradient=config.penalty_gradient
        )
    return model


def make_schedule(config: TrainConfig, updates_per_epoch: int) -> schedule.WarmupStepDecay:
    """The run's learning rate per update: scaled, warmed up, step-decayed (`paper_schedule`)."""
    return schedule.paper_schedule(
        base_learning_rate=config.base_learning_rate,
        batch_size=config.batch_size,
        base_batch_size=config.base_batch_size,
        steps_per_epoch=updates_per_epoch,
        rule=config.lr_scaling,
        warmup_epochs=config.warmup_epochs,
        decay_factor=config.lr_decay_factor,
        decay_epochs=config.lr_decay_epochs,
        decay_every=config.lr_decay_every,
    )


def load_data(config: TrainConfig):
    """The dataset named by `config.dataset`, split by `config.seed` and `val_fraction`.

    A `noisy_keras.data.pipeline.ClassificationData` in memory, or a
    `noisy_keras.data.streaming.StreamedImageData` (`config.streaming`, `config.preprocess`).
    """
    return datasets.load_dataset(
        config.dataset,
        seed=config.seed,
        val_fraction=config.val_fraction,
        data_dir=config.data_dir or None,
        image_size=config.image_size or None,
        streaming=config.streaming,
        preprocess=config.preprocess,
    )


def make_model(config: TrainConfig, dataset) -> keras.Model:
    """The model named by `config.model` for `dataset`'s inputs and classes (uncompiled)."""
    return models.build_model(
        config.model,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        ghost_batch_size=config.ghost_batch_size or None,
        seed=config.seed,
        zero_init_residual=config.zero_init_residual,
    )


def build_compiled_model(config: TrainConfig, dataset, learning_rate) -> keras.Model:
    """`make_model` compiled with `make_optimizer`, sparse cross-entropy on logits and accuracy.

    Then the run's multiplicative noise (`add_model_noise`) and gradient method
    (`add_gradient_method`) are put on the compiled model.

    With `label_smoothing` > 0 the loss is `SmoothedSparseCategoricalCrossentropy`;
    with `top5_accuracy` the metrics add "top5_accuracy". Call inside the
    strategy's scope.
    """
    model = make_model(config, dataset)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if config.label_smoothing:
        loss = SmoothedSparseCategoricalCrossentropy(config.label_smoothing)
    metrics = ["accuracy"]
    if config.top5_accuracy:
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    model.compile(optimizer=make_optimizer(config, learning_rate), loss=loss, metrics=metrics)
    return add_gradient_method(config, add_model_noise(config, model))
