"""The only module that touches private Keras and TensorFlow APIs.

Each function below wraps one private symbol, says what the package needs it
for, and names the releases it was checked on. A new Keras or TensorFlow
release that moves one of them breaks it here, and `missing_symbols()` (run
by tests/test_keras_internals.py) names it.

Checked on TensorFlow 2.20.0 with Keras 3.13.2 and TensorFlow 2.21.0 with
Keras 3.15.1.
"""

from __future__ import annotations

import contextlib
import importlib
import json

import keras
import tensorflow as tf

CHECKED_ON = ("tensorflow 2.20.0 + keras 3.13.2", "tensorflow 2.21.0 + keras 3.15.1")

# (module, attribute) of every private symbol imported or read below, for `missing_symbols`.
_MODULE_SYMBOLS = (
    ("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer"),
    ("keras.src.losses.loss", "unscale_loss_for_distribution"),
    ("tensorflow.python.ops.control_flow_util", "GraphOrParentsInXlaContext"),
    ("tensorflow.python.framework.config", "is_op_determinism_enabled"),
    ("tensorflow.python.framework.config", "disable_op_determinism"),
)
# Methods of keras.Model (class attributes) read below.
_MODEL_METHODS = ("_make_function", "_symbolic_build", "_maybe_symbolic_build", "_flatten_layers")
# Attributes a compiled keras.Model instance has (set in Model/Trainer __init__ or compile).
_MODEL_INSTANCE_ATTRIBUTES = (
    "_call_has_training_arg",
    "_losses_override",
    "_loss_tracker",
)
# Attributes every keras.layers.Layer instance has.
_LAYER_INSTANCE_ATTRIBUTES = ("_seed_generators",)
# Methods of keras.optimizers.Optimizer read below.
_OPTIMIZER_METHODS = ("_clip_gradients",)

# Methods of tf.data.Dataset read below.
_DATASET_METHODS = ("_as_serialized_graph",)
# Attributes a keras.callbacks.BackupAndRestore instance has.
_BACKUP_INSTANCE_ATTRIBUTES = ("_training_metadata_path",)


def _private(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def missing_symbols() -> list[str]:
    """The private symbols this module relies on that the installed releases lack."""
    missing = []
    for module, name in _MODULE_SYMBOLS:
        try:
            _private(module, name)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{name}")
    for name in _MODEL_METHODS:
        if not hasattr(keras.Model, name):
            missing.append(f"keras.Model.{name}")
    for name in _OPTIMIZER_METHODS:
        if not hasattr(keras.optimizers.Optimizer, name):
            missing.append(f"keras.optimizers.Optimizer.{name}")
    layer = keras.layers.Dropout(0.5, seed=1)
    for name in _LAYER_INSTANCE_ATTRIBUTES:
        if not hasattr(layer, name):
            missing.append(f"keras.layers.Layer()..{name}")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    for name in _MODEL_INSTANCE_ATTRIBUTES:
        if not hasattr(model, name):
            missing.append(f"keras.Model()..{name}")
    missing += [f"tf.data.Dataset.{n}" for n in _DATASET_METHODS if not hasattr(tf.data.Dataset, n)]
    backup = keras.callbacks.BackupAndRestore("never-created")  # writes nothing until it saves
    for name in _BACKUP_INSTANCE_ATTRIBUTES:
        if not hasattr(backup, name):
            missing.append(f"keras.callbacks.BackupAndRestore()..{name}")
    return missing


# ---------------------------------------------------------------------------
# Keras' TensorFlow trainer (used by noisy_keras.engine.steps)
# ---------------------------------------------------------------------------


def default_make_train_function(model: keras.Model, force: bool = False):
    """Keras' own `make_train_function`, bypassing the one patched onto the instance.

    replica_xla replaces `model.make_train_function` to interleave accumulation
    steps; without accumulation it calls Keras' own, which wraps `train_step` in
    `strategy.run` inside a `tf.function`
    (`keras.src.backend.tensorflow.trainer.TensorFlowTrainer`).
    """
    trainer = _private("keras.src.backend.tensorflow.trainer", "TensorFlowTrainer")
    return trainer.make_train_function(model, force=force)


def make_step_function(model: keras.Model, step_function):
    """Keras' wrapping of one step into the `tf.function` that `fit` calls per iteration.

    `TensorFlowTrainer._make_function(step)`: distribution (`strategy.run` and
    the reduction of the logs) and `steps_per_execution` handling, for the
    accumulate and update steps of replica_xla.
    """
    return model._make_function(step_function)


def unscale_loss_for_distribution(loss):
    """The replica's loss times num_replicas, for the loss tracker (Keras logs the mean loss).

    `keras.src.losses.loss.unscale_loss_for_distribution`; Keras' compiled
    loss divides each replica's loss by the number of replicas.
    """
    return _private("keras.src.losses.loss", "unscale_loss_for_distribution")(loss)


def call_has_training_arg(model: keras.Model) -> bool:
    """Whether `model.call` takes a `training` argument (`Layer._call_has_training_arg`)."""
    return bool(model._call_has_training_arg)


@contextlib.contextmanager
def losses_override(model: keras.Model, losses: list):
    """Makes `model.losses` return `losses` while the block runs (`Layer._losses_override`).

    `model.stateless_call(..., return_losses=True)` returns the `add_loss` terms
    of a forward pass, but `model.compute_loss` reads `model.losses`; Keras' own
    `stateless_compute_loss` hands them over the same way.
    """
    if not losses:
        yield
        return
    model._losses_override = list(losses)
    try:
        yield
    finally:
        model._losses_override = []


def loss_tracker(model: keras.Model):
    """The compiled model's mean-loss metric (`Trainer._loss_tracker`), updated per step."""
    return model._loss_tracker


def symbolic_build(model: keras.Model, data_batch) -> None:
    """Keras' build of metrics and optimizer from one batch (`Trainer._symbolic_build`)."""
    model._symbolic_build(data_batch=data_batch)


def replace_symbolic_build(model: keras.Model, function) -> None:
    """Replaces the instance's `Trainer._maybe_symbolic_build(iterator, data_batch)`.

    Keras calls it at the start of fit/evaluate to build metrics from the
    first batch; under MultiWorkerMirroredStrategy its eager MEAN reduce of a
    distributed batch fails, so replica_xla supplies one that reads the local
    replica's batch.
    """
    object.__setattr__(model, "_maybe_symbolic_build", function)


def flatten_layers(model: keras.Model) -> list:
    """Every layer nested in `model`, depth first, without the model (`Layer._flatten_layers`)."""
    return list(model._flatten_layers(include_self=False))


def seed_generator_states(model: keras.Model) -> list:
    """The state variables of every `keras.random.SeedGenerator` the model's layers own.

    `Layer._seed_generators` (the model's own and its nested layers'), each
    generator's public `state`. replica_xla shifts these seeds per replica, so
    that dropout masks differ across replicas; Keras offers no public list of
    a layer's seed generators.
    """
    states, seen = [], set()
    for layer in model._flatten_layers(include_self=True):
        for generator in layer._seed_generators:
            if id(generator.state) not in seen:
                seen.add(id(generator.state))
                states.append(generator.state)
    return states


# ---------------------------------------------------------------------------
# Keras' optimizers (used by noisy_keras.noise.optimizer)
# ---------------------------------------------------------------------------


def clip_gradients(optimizer: keras.optimizers.Optimizer, grads: list) -> list:
    """Keras' own clipping of `grads` by `optimizer`'s clipnorm, global_clipnorm or clipvalue.

    `BaseOptimizer._clip_gradients`: clipnorm clips each tensor to that L2
    norm, global_clipnorm all of them jointly, clipvalue each element.
    NoisyOptimizer takes clipping over from the optimizer it wraps and calls
    this on the global-batch gradient, so the arithmetic is Keras' own (alpha=0
    on one device stays bit-identical to the inner optimizer alone).
    """
    return optimizer._clip_gradients(list(grads))


# ---------------------------------------------------------------------------
# TensorFlow
# ---------------------------------------------------------------------------


def in_xla_context() -> bool:
    """Whether ops created now are compiled by XLA (inside a `jit_compile=True` function).

    `tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext`, the
    marker `tf.while_loop` itself reads. noisy_keras.noise uses it to pick the
    faster of two bit-identical Philox implementations; should it ever be
    missing, the answer is False and the kernel path is taken (same numbers).
    """
    try:
        check = _private("tensorflow.python.ops.control_flow_util", "GraphOrParentsInXlaContext")
    except (ImportError, AttributeError):  # pragma: no cover - depends on TensorFlow's internals
        return False
    return bool(check(tf.compat.v1.get_default_graph()))


def is_op_determinism_enabled() -> bool:
    """Whether `tf.config.experimental.enable_op_determinism()` is in effect.

    `tensorflow.python.framework.config.is_op_determinism_enabled`; TensorFlow
    has no public getter.
    """
    return bool(_private("tensorflow.python.framework.config", "is_op_determinism_enabled")())


def disable_op_determinism() -> None:
    """Undoes `enable_op_determinism()` (tests isolate global state with it).

    `tensorflow.python.framework.config.disable_op_determinism`; TensorFlow has
    no public one.
    """
    _private("tensorflow.python.framework.config", "disable_op_determinism")()


def dataset_graph_def(dataset: tf.data.Dataset):
    """The GraphDef of `dataset`'s pipeline: its ops, functions and constants.

    `tf.data.Dataset._as_serialized_graph`, the serialization tf.data uses to
    send a pipeline to the tf.data service; TensorFlow has no public one. The
    tests use it to check what a pipeline holds (a streamed dataset carries
    file paths, never images).
    """
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(dataset._as_serialized_graph().numpy())
    return graph_def


# ---------------------------------------------------------------------------
# Keras' BackupAndRestore callback (used by noisy_keras.engine.fit)
# ---------------------------------------------------------------------------


def backup_and_restore_epoch(callback: keras.callbacks.BackupAndRestore) -> int | None:
    """The epoch `callback` will restart training at, or None when it holds no backup.

    `BackupAndRestore` writes {"epoch": e, "batch": b} to its private
    `_training_metadata_path` when it saves, and in `on_train_begin` loads the
    weights and sets the model's private `_initial_epoch` to e. The engine must
    know e before `fit` starts, to start its data stream at epoch e. (If the
    latest weights are unreadable Keras falls back to the previous backup; this
    reads the metadata of the latest.)
    """
    path = callback._training_metadata_path
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return int(json.load(f)["epoch"])
