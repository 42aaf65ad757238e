"""From a run configuration to the objects a run trains with: data, schedule, optimizer, model.

Each builder reads the fields of `TrainConfig` it needs and finds what to build
by name in a dict (`OPTIMIZER_BUILDERS`); the main job (`noisy_keras.train`),
the experiment runner and notebooks all build runs this way.

The recipe is the paper's (Jaiswal & Taura, Section 4): the learning rate tuned
at `base_batch_size` is scaled to `batch_size` (linear, Goyal et al. 2017; or
sqrt, Hoffer et al. 2017), optionally warmed up, and multiplied by
`lr_decay_factor` at epochs 25, 40 and every 10 epochs after; Gaussian noise of
variance `noise_alpha / (1 + t)^noise_gamma` is added to every gradient by
`NoisyOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from noisy_keras import data, datasets, lr, models
from noisy_keras.config import TrainConfig
from noisy_keras.optimizer import NoisyOptimizer

__all__ = [
    "OPTIMIZER_BUILDERS",
    "build_compiled_model",
    "load_data",
    "make_model",
    "make_optimizer",
    "make_schedule",
]


def _common(config: TrainConfig, learning_rate) -> dict:
    return {"learning_rate": learning_rate, "weight_decay": config.weight_decay or None}


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
}
"""Inner optimizers by `--optimizer` name: (config, learning rate or schedule) -> optimizer."""


def make_optimizer(config: TrainConfig, learning_rate) -> NoisyOptimizer:
    """The inner optimizer named by `config.optimizer`, wrapped in the run's noise.

    Args:
        config: uses optimizer, momentum, weight_decay, noise_alpha, noise_gamma, seed.
        learning_rate: a float or a `LearningRateSchedule` (see `make_schedule`).
    """
    inner = OPTIMIZER_BUILDERS[config.optimizer](config, learning_rate)
    return NoisyOptimizer(
        inner, alpha=config.noise_alpha, gamma=config.noise_gamma, seed=config.seed
    )


def make_schedule(config: TrainConfig, updates_per_epoch: int) -> lr.WarmupStepDecay:
    """The run's learning rate per update: scaled, warmed up, step-decayed (`lr.paper_schedule`)."""
    return lr.paper_schedule(
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


def load_data(config: TrainConfig) -> data.ClassificationData:
    """The dataset named by `config.dataset`, split by `config.seed` and `val_fraction`."""
    return datasets.load_dataset(
        config.dataset,
        seed=config.seed,
        val_fraction=config.val_fraction,
        data_dir=config.data_dir or None,
        image_size=config.image_size or None,
    )


def make_model(config: TrainConfig, dataset: data.ClassificationData) -> keras.Model:
    """The model named by `config.model` for `dataset`'s inputs and classes (uncompiled)."""
    return models.build_model(
        config.model,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        ghost_batch_size=config.ghost_batch_size or None,
        seed=config.seed,
    )


def build_compiled_model(
    config: TrainConfig, dataset: data.ClassificationData, learning_rate
) -> keras.Model:
    """`make_model` compiled with `make_optimizer`, sparse cross-entropy on logits and accuracy.

    Call inside the strategy's scope.
    """
    model = make_model(config, dataset)
    model.compile(
        optimizer=make_optimizer(config, learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model
