"""The training engine: XLA per replica under tf.distribute, accumulation, resume.

Three pieces, usable separately:

* `enable_replica_xla(model)` makes `model.fit`, `evaluate` and `predict` run
  each replica's forward and backward pass as one XLA computation, with the
  gradient all-reduce and the optimizer update outside it. This is what
  Keras' own `compile(jit_compile=True)` cannot do under `MirroredStrategy`
  (keras-team/keras#19005).
* `split_global_batch(...)` turns a global batch into the per-step batch fed
  to `fit` when the batch is reached with several replicas and gradient
  accumulation.
* `fit(...)` trains with crash-safe, exactly resumable checkpoints and stops
  a diverged run (see `noisy_keras.checkpointing`).

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks".
    P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
    1 Hour", 2017 (global batch = per-replica batch x replicas; mean loss).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import keras
import tensorflow as tf
from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
from keras.src.losses.loss import unscale_loss_for_distribution
from keras.src.trainers.data_adapters import data_adapter_utils

from noisy_keras import checkpointing, data, distribute
from noisy_keras._validation import check_int

__all__ = [
    "BatchSplit",
    "FitResult",
    "accumulation_steps",
    "enable_replica_xla",
    "epoch_batches",
    "fit",
    "replica_xla_functions",
    "resolve_xla",
    "split_global_batch",
]

_ATTRIBUTE = "_noisy_keras_replica_xla"


# ---------------------------------------------------------------------------
# XLA per replica
# ---------------------------------------------------------------------------


def _values(variables) -> list:
    """Current values of `variables`, read on this replica's device."""
    return [tf.convert_to_tensor(v.value) for v in variables]


def _assign(variables, values) -> None:
    """Writes back the values a stateless call changed (None: unchanged)."""
    for variable, value in zip(variables, values, strict=True):
        if value is not None:
            variable.assign(value)


def _changed(old_values, new_values) -> list:
    """New values, with None where the stateless call returned the input unchanged."""
    return [None if new is old else new for old, new in zip(old_values, new_values, strict=True)]


def _mean_over_replicas(values) -> list:
    """Averages the changed floating-point values over the replicas in sync.

    A replica updates BatchNormalization's moving statistics from its own
    batch; Keras 3 creates them with aggregation "none", so each replica's
    copy would drift apart (and a checkpoint would keep only the first). The
    moving average is linear in the batch statistics, so averaging the new
    values over replicas at each step gives every replica the moving average
    of the replica-mean statistics (what tf.keras' MEAN aggregation did).
    Integer state (RNG seeds) advances identically on every replica and is
    left as is.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    positions = [i for i, v in enumerate(values) if v is not None and v.dtype.is_floating]
    if not positions:
        return values
    reduced = context.all_reduce(tf.distribute.ReduceOp.MEAN, [values[i] for i in positions])
    values = list(values)
    for i, v in zip(positions, reduced, strict=True):
        values[i] = v
    return values


def _batch_size(x):
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]


class _ReplicaXLASteps:
    """The train, test and predict steps of one model, with a pure XLA core.

    Each step splits in two. The core is a `tf.function(jit_compile=True)`
    that is pure: it receives the values of the model's trainable,
    non-trainable and metric variables as tensors, runs `model.stateless_call`
    and the compiled loss (under a `GradientTape` when training), and returns
    the loss, the gradients, the predictions and the new values of the
    non-trainable and metric variables (BatchNormalization statistics, RNG
    state, per-output loss trackers). Because it captures no variable, each
    replica compiles and runs it on its own device. Around the core, in the
    replica context but outside XLA, the step writes those new values back,
    updates the metrics and calls `optimizer.apply`, whose SUM all-reduce of
    the gradients is thereby left to `tf.distribute` (NCCL on GPUs).

    Loss semantics follow Keras' TensorFlow trainer: the compiled loss of a
    replica's batch is multiplied by 1 / num_replicas before the SUM
    all-reduce, so the applied gradient is the gradient of the mean loss over
    the global batch (Keras' TensorFlow trainer scales `add_loss` and
    regularizer terms the same way), and `optimizer.scale_loss` is applied to
    it (mixed precision).

    Gradient accumulation over k steps (Keras' own `gradient_accumulation_steps`
    calls `merge_call` inside a `tf.cond` and fails under MirroredStrategy)
    is done here: k-1 "accumulate" steps add each replica's gradients to
    replica-local accumulators, and every k-th "update" step applies the
    average (accumulated + current) / k with `optimizer.apply`, which
    all-reduces it. Which of the two compiled steps runs is decided on the
    host, so no synchronisation point sits inside control flow.
    """

    def __init__(self, model: keras.Model, jit_compile: bool = True, accumulation_steps: int = 1):
        self.model = model
        self.jit_compile = jit_compile
        self.accumulation_steps = accumulation_steps
        self.accumulators = None
        if accumulation_steps > 1:
            # Replica-local (ON_READ) accumulators: each replica sums its own gradients.
            with model.distribute_strategy.scope():
                self.accumulators = [
                    tf.Variable(
                        tf.zeros(v.shape, v.dtype),
                        trainable=False,
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.SUM,
                        name="gradient_accumulator",
                    )
                    for v in model.trainable_variables
                ]
        self._call_kwargs = {"training": True} if model._call_has_training_arg else {}
        self._eval_kwargs = {"training": False} if model._call_has_training_arg else {}

        def compiled(fn):
            return tf.function(fn, jit_compile=jit_compile, reduce_retracing=True)

        self.loss_and_gradients = compiled(self._loss_and_gradients)
        self.loss_and_predictions = compiled(self._loss_and_predictions)
        self.predictions = compiled(self._predictions)

    # ---- pure cores (compiled) ----------------------------------------------

    def _forward_and_loss(self, trainable, non_trainable, metrics, x, y, sample_weight, kwargs):
        model = self.model
        old_non_trainable, old_metrics = list(non_trainable), list(metrics)
        y_pred, non_trainable, extra_losses = model.stateless_call(
            trainable, non_trainable, x, return_losses=True, **kwargs
        )
        if extra_losses:
            # compute_loss reads model.losses: hand it the forward pass' ones.
            model._losses_override = list(extra_losses)
        try:
            loss, (_, non_trainable, metrics) = model.stateless_compute_loss(
                trainable,
                non_trainable,
                metrics,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
                training=kwargs.get("training", True),
            )
        finally:
            if extra_losses:
                model._losses_override = []
        non_trainable = _changed(old_non_trainable, non_trainable)
        metrics = _changed(old_metrics, metrics)
        return loss, y_pred, non_trainable, metrics

    def _loss_and_gradients(self, trainable, non_trainable, metrics, loss_scale, x, y, sw):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            loss, y_pred, non_trainable, metrics = self._forward_and_loss(
                trainable, non_trainable, metrics, x, y, sw, self._call_kwargs
            )
            scaled_loss = loss * tf.cast(loss_scale, loss.dtype)
        gradients = tape.gradient(scaled_loss, trainable)
        return loss, gradients, y_pred, non_trainable, metrics

    def _loss_and_predictions(self, trainable, non_trainable, metrics, x, y, sw):
        loss, y_pred, non_trainable, metrics = self._forward_and_loss(
            trainable, non_trainable, metrics, x, y, sw, self._eval_kwargs
        )
        return loss, y_pred, non_trainable, metrics

    def _predictions(self, trainable, non_trainable, x):
        y_pred, _ = self.model.stateless_call(trainable, non_trainable, x, **self._eval_kwargs)
        return y_pred

    # ---- steps (replica context, outside XLA) ---------------------------------

    def _update_metrics(self, loss, x, y, y_pred, sample_weight):
        model = self.model
        model._loss_tracker.update_state(
            unscale_loss_for_distribution(loss), sample_weight=_batch_size(x)
        )
        logs = model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if isinstance(model.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras reduces multi-worker logs with strategy.reduce(MEAN, axis=0),
            # which needs an axis: give each scalar one of length 1.
            logs = tf.nest.map_structure(
                lambda t: tf.reshape(t, [1]) if t.shape.rank == 0 else t, logs
            )
        return logs

    def train_step(self, data):
        """One step with an optimizer update (the k-th of k when accumulating)."""
        return self._train_step(data, update=True)

    def accumulate_step(self, data):
        """One of the first k-1 steps of k: gradients go to the accumulators."""
        return self._train_step(data, update=False)

    def _train_step(self, data, update):
        model = self.model
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        if not model.trainable_variables:
            raise ValueError("The model has no trainable variables; there is nothing to train.")
        optimizer = model.optimizer
        # Keras' optimizers scale linearly (loss * factor); read the factor here,
        # outside XLA, since a LossScaleOptimizer keeps it in a variable.
        loss_scale = tf.convert_to_tensor(optimizer.scale_loss(tf.constant(1.0, tf.float32)))
        loss, gradients, y_pred, non_trainable, metrics = self.loss_and_gradients(
            _values(model.trainable_variables),
            _values(model.non_trainable_variables),
            _values(model.metrics_variables),
            loss_scale,
            x,
            y,
            sample_weight,
        )
        _assign(model.non_trainable_variables, _mean_over_replicas(non_trainable))
        _assign(model.metrics_variables, metrics)
        gradients = [
            tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in gradients
        ]
        if self.accumulators is None:
            optimizer.apply(gradients, model.trainable_variables)
        elif not update:
            for accumulator, g in zip(self.accumulators, gradients, strict=True):
                if g is not None:
                    accumulator.assign_add(g)
        else:
            k = float(self.accumulation_steps)
            averaged = []
            for accumulator, g in zip(self.accumulators, gradients, strict=True):
                averaged.append(None if g is None else (accumulator.read_value() + g) / k)
            with tf.control_dependencies([a for a in averaged if a is not None]):
                for accumulator in self.accumulators:
                    accumulator.assign(tf.zeros_like(accumulator))
            optimizer.apply(averaged, model.trainable_variables)
        return self._update_metrics(loss, x, y, y_pred, sample_weight)

    def make_train_function(self, force=False):
        """Keras' train function; with accumulation, k-1 accumulate steps then an update."""
        model = self.model
        if model.train_function is not None and not force:
            return model.train_function
        if self.accumulators is None:
            TensorFlowTrainer.make_train_function(model, force=True)
            return model.train_function
        accumulate = model._make_function(self.accumulate_step)
        apply_update = model._make_function(self.train_step)
        k = self.accumulation_steps
        steps_taken = [0]

        def train_function(iterator):
            steps_taken[0] += 1
            step = apply_update if steps_taken[0] % k == 0 else accumulate
            return step(iterator)

        model.train_function = train_function
        return train_function

    def test_step(self, data):
        model = self.model
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        loss, y_pred, non_trainable, metrics = self.loss_and_predictions(
            _values(model.trainable_variables),
            _values(model.non_trainable_variables),
            _values(model.metrics_variables),
            x,
            y,
            sample_weight,
        )
        _assign(model.non_trainable_variables, _mean_over_replicas(non_trainable))
        _assign(model.metrics_variables, metrics)
        return self._update_metrics(loss, x, y, y_pred, sample_weight)

    def predict_step(self, data):
        model = self.model
        x, _, _ = data_adapter_utils.unpack_x_y_sample_weight(data)
        return self.predictions(
            _values(model.trainable_variables), _values(model.non_trainable_variables), x
        )


def _local_value(value):
    if isinstance(value, tf.distribute.DistributedValues):
        return value._values[0]
    return value


def _symbolic_build_hook(model: keras.Model):
    """Keras' `_maybe_symbolic_build`, taking shapes from this worker's first replica.

    Keras reduces a distributed batch with MEAN only to learn its shapes and
    dtypes; under `MultiWorkerMirroredStrategy` that eager reduce fails
    ("Attempt to convert a value (PerReplica...) to a Tensor"). The local
    first replica's batch has the same shapes and dtypes.
    """

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if model._distribute_strategy is None:
            return
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(_local_value, next(it))
                break
        with model.distribute_strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    return maybe_symbolic_build


def _overridden(model: keras.Model, name: str) -> bool:
    """Whether the model's class replaces Keras' own `name` method."""
    own = getattr(type(model), name)
    return own is not getattr(keras.Model, name)


def _take_over_accumulation(optimizer, requested) -> int:
    """Moves `gradient_accumulation_steps` from the optimizer chain to the engine.

    Returns:
        The accumulation steps k (1 for none).
    """
    if requested is not None:
        _positive_int("accumulation_steps", requested)
    found = None
    current = optimizer
    while current is not None:
        k = getattr(current, "gradient_accumulation_steps", None)
        if k:
            if getattr(current, "_accumulated_gradients", None):
                raise ValueError(
                    f"optimizer {current.name!r} was already built with "
                    f"gradient_accumulation_steps={k}; enable_replica_xla must take over "
                    "accumulation before the optimizer is built (before the first fit)."
                )
            if requested is not None and requested != k:
                raise ValueError(
                    f"accumulation_steps={requested} conflicts with the optimizer's "
                    f"gradient_accumulation_steps={k}; set one of them."
                )
            current.gradient_accumulation_steps = None
            found = int(k)
        current = getattr(current, "inner_optimizer", None)
    return requested or found or 1


def enable_replica_xla(
    model: keras.Model, *, jit_compile: bool = True, accumulation_steps: int | None = None
) -> keras.Model:
    """Makes `model.fit/evaluate/predict` XLA-compile each replica's step.

    Rule: under a `tf.distribute` strategy with R replicas, each replica runs
    `y_pred, loss, grads = XLA(forward + backward)(its variable values, its
    batch)`; then, outside XLA, `optimizer.apply(grads)` SUM-all-reduces the
    gradients over the R replicas and updates every copy of the variables
    identically. With one device (the default strategy) the same step runs
    with R = 1. The outer `tf.function` that `fit` builds around
    `strategy.run` is left uncompiled, which is why this works where Keras'
    `compile(jit_compile=True)` fails (keras-team/keras#19005): Keras
    compiles the whole multi-device step, including the other replicas'
    variables, as one XLA computation on one device.

    Call it after `model.compile(...)` (a later `compile` is fine too: the
    steps are attached to the model instance, and `jit_compile` is set to
    False for the outer function). The model must have been built and
    compiled inside the strategy's scope, as always with tf.distribute. The
    model's class must not override `train_step`, `test_step` or
    `predict_step` (their replacement is the point); `compute_loss` and
    `compute_metrics` overrides are honoured.

    Args:
        model: a built, compiled `keras.Model` (functional, Sequential or
            subclassed).
        jit_compile: False keeps the same step semantics without XLA (to
            measure XLA's effect, or for ops XLA cannot compile).
        accumulation_steps: k, gradients of k consecutive steps are averaged
            into one update (None: take it from the optimizer's, or its inner
            optimizer's, `gradient_accumulation_steps`, which is then set to
            None because the engine does the accumulating; 1: none). With
            k > 1, `optimizer.iterations` counts updates, and the model must
            use `steps_per_execution=1`.

    Returns:
        `model` itself, patched in place.

    Raises:
        ValueError: the model is not compiled or not built, or its class
            overrides a step method.

    Example:
        >>> strategy = noisy_keras.distribute.make_strategy("mirrored")
        >>> with strategy.scope():
        ...     model = build_model()
        ...     model.compile(optimizer=NoisyOptimizer(keras.optimizers.SGD(0.1)),
        ...                   loss="sparse_categorical_crossentropy")
        >>> enable_replica_xla(model)
        >>> model.fit(dataset, epochs=3)
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model` must be a keras.Model; received {model!r} of type {type(model).__name__}."
        )
    if not model.compiled:
        raise ValueError(
            "`model` must be compiled before enable_replica_xla (call model.compile(optimizer=..., "
            "loss=...) first); received an uncompiled model."
        )
    if not model.built:
        raise ValueError(
            "`model` must be built before enable_replica_xla (call it on a batch, or give it an "
            "Input); received an unbuilt model."
        )
    for name in ("train_step", "test_step", "predict_step"):
        if _overridden(model, name):
            raise ValueError(
                f"`model`'s class {type(model).__name__} overrides `{name}`; enable_replica_xla "
                "replaces the step methods and would silently drop it. Allowed: models whose "
                "class overrides only `call`, `compute_loss` or `compute_metrics`."
            )
    if jit_compile not in (True, False):
        raise ValueError(f"jit_compile must be True or False; received {jit_compile!r}.")
    k = _take_over_accumulation(model.optimizer, accumulation_steps)
    if k > 1 and model.steps_per_execution != 1:
        raise ValueError(
            f"gradient accumulation (k={k}) needs steps_per_execution=1; the model was compiled "
            f"with steps_per_execution={model.steps_per_execution}."
        )
    steps = _ReplicaXLASteps(model, jit_compile=jit_compile, accumulation_steps=k)
    object.__setattr__(model, _ATTRIBUTE, steps)
    object.__setattr__(model, "make_train_function", steps.make_train_function)
    object.__setattr__(model, "_maybe_symbolic_build", _symbolic_build_hook(model))
    object.__setattr__(model, "train_step", steps.train_step)
    object.__setattr__(model, "test_step", steps.test_step)
    object.__setattr__(model, "predict_step", steps.predict_step)
    model.jit_compile = False
    model.train_function = None
    model.test_function = None
    model.predict_function = None
    return model


def replica_xla_functions(model: keras.Model) -> dict:
    """The compiled per-replica functions of a model patched by `enable_replica_xla`.

    Returns:
        `{"train": ..., "test": ..., "predict": ...}`, each a `tf.function`
        with `jit_compile=True` (inspect it with
        `experimental_get_tracing_count` or `experimental_get_compiler_ir`).

    Raises:
        ValueError: `enable_replica_xla` was not applied to `model`.
    """
    steps = getattr(model, _ATTRIBUTE, None)
    if steps is None:
        raise ValueError(
            f"`model` {model.name!r} has no per-replica XLA steps; call "
            "enable_replica_xla(model) first."
        )
    return {
        "train": steps.loss_and_gradients,
        "test": steps.loss_and_predictions,
        "predict": steps.predictions,
    }


# ---------------------------------------------------------------------------
# Batch arithmetic
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchSplit:
    """How a global batch is reached: step batch x accumulation steps.

    Attributes:
        global_batch_size: examples per parameter update.
        num_replicas: replicas in sync (devices x workers).
        accumulation_steps: micro-batches accumulated per update (k).
        step_batch_size: the batch each `fit` step takes, over all replicas
            (global_batch_size / k): batch the dataset with this.
        per_replica_batch_size: what one device computes per step
            (step_batch_size / num_replicas).
    """

    global_batch_size: int
    num_replicas: int
    accumulation_steps: int
    step_batch_size: int
    per_replica_batch_size: int


def _positive_int(name: str, value) -> int:
    return check_int(name, value, 1)


def split_global_batch(
    global_batch_size: int, num_replicas: int = 1, accumulation_steps: int = 1
) -> BatchSplit:
    """Splits a global batch over replicas and accumulated micro-batches.

    Rule: global_batch_size = per_replica_batch_size x num_replicas x
    accumulation_steps. With the inner optimizer's
    `gradient_accumulation_steps=k`, Keras averages k consecutive step
    gradients before one update, each of which is already the mean over the
    replicas' step batch, so the update is the mean gradient over the global
    batch; `NoisyOptimizer` adds its noise once per update.

    Args:
        global_batch_size: examples per parameter update.
        num_replicas: `strategy.num_replicas_in_sync`.
        accumulation_steps: micro-batches per update (1 for none).

    Returns:
        A `BatchSplit`.

    Raises:
        ValueError: a non-positive argument, or a global batch that is not a
            multiple of num_replicas x accumulation_steps (the message names
            the nearest allowed sizes).

    Example:
        >>> split_global_batch(4096, num_replicas=8, accumulation_steps=4)
        BatchSplit(global_batch_size=4096, num_replicas=8, accumulation_steps=4,
                   step_batch_size=1024, per_replica_batch_size=128)
    """
    _positive_int("global_batch_size", global_batch_size)
    _positive_int("num_replicas", num_replicas)
    _positive_int("accumulation_steps", accumulation_steps)
    unit = num_replicas * accumulation_steps
    if global_batch_size % unit:
        lower = (global_batch_size // unit) * unit
        nearest = [n for n in (lower, lower + unit) if n > 0]
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by num_replicas x "
            f"accumulation_steps = {num_replicas} x {accumulation_steps} = {unit}; allowed: "
            f"multiples of {unit}, e.g. {' or '.join(map(str, nearest))}."
        )
    step = global_batch_size // accumulation_steps
    return BatchSplit(
        global_batch_size=global_batch_size,
        num_replicas=num_replicas,
        accumulation_steps=accumulation_steps,
        step_batch_size=step,
        per_replica_batch_size=step // num_replicas,
    )


def accumulation_steps(optimizer) -> int:
    """The gradient accumulation steps k of `optimizer` or of the optimizer it wraps (1: none)."""
    while optimizer is not None:
        k = getattr(optimizer, "gradient_accumulation_steps", None)
        if k:
            return int(k)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return 1


# ---------------------------------------------------------------------------
# Data: epoch-keyed order
# ---------------------------------------------------------------------------


def epoch_batches(arrays, *, batch_size: int, seed: int, drop_remainder: bool = True):
    """Returns `make_epoch(epoch) -> tf.data.Dataset` whose order depends only on (seed, epoch).

    Epoch e visits the examples of `arrays` in the permutation
    `tf.random.experimental.stateless_shuffle(range(n), seed=(seed, e))`,
    batched. Since nothing depends on earlier epochs, a run resumed at epoch e
    sees exactly the batches an uninterrupted run sees. Pass the result to
    `fit` as `train_data`.

    Args:
        arrays: an array or a tuple/dict of arrays with the same first dimension
            (e.g. `(x, y)`).
        batch_size: the step batch (over all replicas), see `split_global_batch`.
        seed: integer seed of the order.
        drop_remainder: drop the last partial batch (keeps every step's batch,
            and hence the per-replica split, the same shape).

    Returns:
        A function of a scalar int64 epoch tensor.
    """
    _positive_int("batch_size", batch_size)
    arrays = tf.nest.map_structure(tf.convert_to_tensor, arrays)
    n = int(tf.nest.flatten(arrays)[0].shape[0])

    def make_epoch(epoch):
        order = data.epoch_order(n, seed, epoch)
        return (
            tf.data.Dataset.from_tensor_slices(order)
            .batch(batch_size, drop_remainder=drop_remainder)
            .map(lambda idx: tf.nest.map_structure(lambda a: tf.gather(a, idx), arrays))
        )

    return make_epoch


def _training_stream(train_data, first_epoch: int, epochs: int, steps_per_epoch: int):
    """One dataset with the batches of epochs first_epoch..epochs-1, in order."""
    if isinstance(train_data, tf.data.Dataset):
        # Deterministic pipelines replay identically; skip what was already trained on.
        return train_data.repeat().skip(first_epoch * steps_per_epoch)
    if callable(train_data):
        return (
            tf.data.Dataset.range(first_epoch, epochs)
            .flat_map(lambda e: train_data(e).take(steps_per_epoch))
            .prefetch(tf.data.AUTOTUNE)
        )
    raise ValueError(
        "train_data must be a tf.data.Dataset or a function epoch -> tf.data.Dataset "
        f"(see epoch_batches); received {type(train_data).__name__}."
    )


# ---------------------------------------------------------------------------
# XLA default
# ---------------------------------------------------------------------------


def resolve_xla(xla, strategy=None) -> bool:
    """Resolves `xla` ("auto", True or False) for the devices of `strategy`.

    Rule for "auto": XLA on when the strategy's replicas run on GPUs (or
    TPUs), off on CPU, where XLA's per-replica compilation was measured
    slower for small models (see the README's "Multi-GPU with XLA").

    Raises:
        ValueError: `xla` is not "auto", True or False.
    """
    if xla is True or xla is False:
        return xla
    if xla != "auto":
        raise ValueError(f"xla must be 'auto', True or False; received {xla!r}.")
    strategy = strategy or tf.distribute.get_strategy()
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy has no device list
        devices = ()
    if devices:
        return any(tf.DeviceSpec.from_string(d).device_type in ("GPU", "TPU") for d in devices)
    return bool(tf.config.list_logical_devices("GPU"))


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        model: the trained model (built by `fit` when given a function).
        status: "done" or "diverged".
        history: Keras' `History.history` of this invocation (metric -> list).
        initial_epoch: the epoch training (re)started at (> 0 after a resume).
        epochs_completed: epochs completed when `fit` returned.
        message: why a run diverged ("" otherwise).
        diverged_at: {"step", "epoch", "batch"} of the first non-finite loss, or None.
        checkpoint: path of the latest checkpoint, or None.
    """

    model: keras.Model
    status: str
    history: dict
    initial_epoch: int
    epochs_completed: int
    message: str = ""
    diverged_at: dict | None = None
    checkpoint: str | None = None


def _build_model(model, strategy):
    if isinstance(model, keras.Model):
        if strategy is not None and model.distribute_strategy is not strategy:
            raise ValueError(
                "`model` was built under a different strategy than `strategy`; build it inside "
                "`strategy.scope()`, or pass a function that builds and compiles it."
            )
        return model, model.distribute_strategy
    if callable(model):
        strategy = strategy or tf.distribute.get_strategy()
        with strategy.scope():
            built = model()
        if not isinstance(built, keras.Model):
            raise ValueError(
                "`model` as a function must return a compiled keras.Model; it returned "
                f"{type(built).__name__}."
            )
        return built, strategy
    raise ValueError(
        "`model` must be a compiled keras.Model or a function returning one; received "
        f"{type(model).__name__}."
    )


def fit(
    model,
    train_data,
    *,
    epochs: int,
    steps_per_epoch: int,
    workdir: str | None = None,
    validation_data=None,
    validation_steps: int | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    strategy=None,
    xla="auto",
    checkpoint_every_epochs: int = 1,
    max_checkpoints: int = 2,
    verbose="auto",
) -> FitResult:
    """Trains `model` with per-replica XLA, exact resume and divergence stop.

    Rule: epochs `initial_epoch..epochs-1` are trained with `model.fit`, where
    `initial_epoch` is the number of epochs the latest checkpoint in
    `workdir/checkpoints` had completed (0 without one). After each epoch (or
    every `checkpoint_every_epochs`) model, optimizer (slots, iterations =
    noise step and learning-rate schedule position, accumulators) and epoch
    count are checkpointed; see `noisy_keras.checkpointing`. A NaN/Inf loss
    stops the run at that step with status "diverged", and nothing is saved
    after it. `workdir/status.json` holds "running", "done" or "diverged".

    Exact resume needs the epoch-e batches to be a function of e: pass
    `train_data` as a function `epoch -> tf.data.Dataset` (e.g.
    `epoch_batches(...)` or `noisy_keras.data.ClassificationData.train_epochs`),
    or a deterministic `tf.data.Dataset`, which is repeated and fast-forwarded
    by `initial_epoch * steps_per_epoch` batches on resume. For bit-identical results also call
    `tf.config.experimental.enable_op_determinism()` and seed the model
    (`keras.utils.set_random_seed`) before building it.

    Args:
        model: a compiled `keras.Model` built inside `strategy.scope()`, or a
            function with no arguments that builds and compiles one (`fit`
            calls it inside the scope).
        train_data: batches of the step batch size (see
            `split_global_batch`), as a function of the epoch or a dataset.
        epochs: total epochs of the run (not "more epochs").
        steps_per_epoch: steps per epoch; must be a multiple of the
            optimizer's gradient accumulation steps, so that checkpoints fall
            between updates.
        workdir: directory for checkpoints and status; None trains without
            either (no resume).
        validation_data, validation_steps: as in `keras.Model.fit`.
        callbacks: Keras callbacks, run as in `model.fit`.
        strategy: the strategy; defaults to the model's (or the current one
            when `model` is a function).
        xla: "auto" (see `resolve_xla`), True or False. Both True and False
            use the same per-replica step semantics (`enable_replica_xla`).
        checkpoint_every_epochs: checkpoint period in epochs (the last epoch
            is always saved).
        max_checkpoints: newest checkpoints kept.
        verbose: as in `keras.Model.fit`.

    Returns:
        A `FitResult`.

    Raises:
        ValueError: bad arguments (each message names the argument).

    Example:
        >>> strategy = make_strategy("mirrored")
        >>> result = fit(build_and_compile, epoch_batches((x, y), batch_size=256, seed=0),
        ...              epochs=30, steps_per_epoch=len(x) // 256, workdir="runs/a",
        ...              strategy=strategy)
        >>> result.status
        'done'
    """
    _positive_int("epochs", epochs)
    _positive_int("steps_per_epoch", steps_per_epoch)
    _positive_int("checkpoint_every_epochs", checkpoint_every_epochs)
    model, strategy = _build_model(model, strategy)
    if not model.compiled:
        raise ValueError("`model` must be compiled (model.compile(optimizer=..., loss=...)).")
    steps = getattr(model, _ATTRIBUTE, None)
    k = steps.accumulation_steps if steps is not None else accumulation_steps(model.optimizer)
    if steps_per_epoch % k:
        raise ValueError(
            f"steps_per_epoch={steps_per_epoch} is not a multiple of the optimizer's "
            f"gradient_accumulation_steps={k}; allowed: multiples of {k}, so that every epoch "
            "ends on a parameter update."
        )
    use_xla = resolve_xla(xla, strategy)
    if steps is None or steps.jit_compile != use_xla:
        enable_replica_xla(model, jit_compile=use_xla, accumulation_steps=k)
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)

    initial_epoch = 0
    checkpointer = None
    chief = distribute.is_chief(strategy)
    if workdir is not None:
        checkpointer = checkpointing.Checkpointer(
            model,
            os.path.join(workdir, "checkpoints"),
            max_to_keep=max_checkpoints,
            strategy=strategy,
        )
        initial_epoch = checkpointer.restore_latest()
    guard = checkpointing.DivergenceGuard(steps_per_epoch)
    run_callbacks = [guard, *callbacks]
    if checkpointer is not None:
        run_callbacks.append(
            checkpointing.EpochCheckpoint(
                checkpointer, every_epochs=checkpoint_every_epochs, last_epoch=epochs, guard=guard
            )
        )
    if initial_epoch >= epochs:
        return FitResult(
            model=model,
            status="done",
            history={},
            initial_epoch=initial_epoch,
            epochs_completed=initial_epoch,
            checkpoint=checkpointer.latest if checkpointer else None,
        )
    if workdir is not None and chief:
        checkpointing.write_status(workdir, "running", initial_epoch=initial_epoch)

    stream = _training_stream(train_data, initial_epoch, epochs, steps_per_epoch)
    history = model.fit(
        stream,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        shuffle=False,  # the order is train_data's, a function of (seed, epoch)
        validation_data=validation_data,
        validation_steps=validation_steps,
        callbacks=run_callbacks,
        verbose=verbose,
    )
    completed = initial_epoch + len(history.epoch)
    status = "done"
    if guard.diverged_at is not None:
        status = "diverged"
        completed = guard.diverged_at["epoch"]
    result = FitResult(
        model=model,
        status=status,
        history=dict(history.history),
        initial_epoch=initial_epoch,
        epochs_completed=completed,
        message=guard.message,
        diverged_at=guard.diverged_at,
        checkpoint=checkpointer.latest if checkpointer else None,
    )
    if workdir is not None and chief:
        checkpointing.write_status(
            workdir,
            status,
            epochs_completed=completed,
            message=result.message,
            diverged_at=result.diverged_at,
            checkpoint=result.checkpoint,
        )
    if status == "diverged":
        print(f"noisy_keras.training.fit: {result.message}")
    return result
