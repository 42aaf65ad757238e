"""A run's device policy: its strategy, XLA, op determinism and precision, and setting them.

`resolve_device_policy` turns the config's `--strategy`, `--xla`, `--deterministic`
and `--precision` into a strategy and the resolved choices (printed and saved in
the summary); `run_settings` applies the dtype policy and op determinism for one
run and restores both after it, so runs in one process do not leak into each other.
"""

from __future__ import annotations

import contextlib

from noisy_keras.models.registry import MODELS_WITH_MAX_POOLING
from noisy_keras.run.config import TrainConfig

__all__ = ["resolve_device_policy", "run_settings"]


def resolve_device_policy(config: TrainConfig):
    """The run's strategy and `{"replicas", "xla", "deterministic", "precision"}`, resolved.

    XLA: `distribute.resolve_xla` (`--xla=auto`: on for GPUs); op determinism:
    `distribute.resolve_determinism` (`--deterministic=auto`: on unless XLA is
    on; true with XLA is refused for models with max pooling); precision: the
    Keras dtype policy named by `--precision`.

    Raises:
        ValueError: an impossible combination, naming the flags.
    """
    from noisy_keras.engine import distribute

    strategy = distribute.make_strategy(config.strategy, config.num_devices or None)
    xla = distribute.resolve_xla(
        {"auto": "auto", "true": True, "false": False}[config.xla], strategy
    )
    deterministic = distribute.resolve_determinism(
        config.deterministic,
        xla=xla,
        model_has_max_pooling=config.model in MODELS_WITH_MAX_POOLING,
    )
    policy = {
        "replicas": int(strategy.num_replicas_in_sync),
        "xla": xla,
        "deterministic": deterministic,
        "precision": config.precision,
    }
    return strategy, policy


@contextlib.contextmanager
def run_settings(policy: dict):
    """Sets Keras' dtype policy and TensorFlow's op determinism for one run, then restores both.

    `train()` is called in a loop by the experiment runner and by tests: a
    run's settings must not leak into the next.
    """
    import keras
    import tensorflow as tf

    from noisy_keras import _keras_internals as internals

    previous_policy = keras.config.dtype_policy()
    previously_deterministic = internals.is_op_determinism_enabled()
    keras.config.set_dtype_policy(policy["precision"])
    if policy["deterministic"] and not previously_deterministic:
        tf.config.experimental.enable_op_determinism()
    elif previously_deterministic and not policy["deterministic"]:
        internals.disable_op_determinism()
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if internals.is_op_determinism_enabled() != previously_deterministic:
            if previously_deterministic:
                tf.config.experimental.enable_op_determinism()
            else:
                internals.disable_op_determinism()
