"""XLA per replica under tf.distribute: the train, test and predict steps of `model.fit`.

`enable_replica_xla(model)` makes `model.fit`, `evaluate` and `predict` run
each replica's forward and backward pass as one XLA computation, with the
gradient all-reduce and the optimizer update outside it. This is what Keras'
own `compile(jit_compile=True)` cannot do under `MirroredStrategy`
(keras-team/keras#19005). The engine also owns gradient accumulation: k
micro-batches per parameter update, which Keras' own
`gradient_accumulation_steps` cannot do under `MirroredStrategy`.

References:
    P. Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in
    1 Hour", 2017 (global batch = per-replica batch x replicas; mean loss).
"""

from __future__ import annotations

import functools
import warnings

import keras
import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras._structures import batch_size, dense_all
from noisy_keras._validation import check_int
from noisy_keras.engine import accumulation
from noisy_keras.engine import hooks as noise_hooks
from noisy_keras.engine.cores import StatelessCores
from noisy_keras.engine.state import (
    assign,
    mean_over_replicas,
    seed_state_positions,
    shift_seeds,
    skip_non_finite_on_all_replicas,
    symbolic_build_hook,
    values,
)
from noisy_keras.noise import multiplicative
from noisy_keras.noise.chain import optimizer_accumulation_steps

__all__ = [
    "ATTRIBUTE",
    "enable_replica_xla",
    "replica_steps",
    "replica_xla_functions",
]

ATTRIBUTE = "_noisy_keras_replica_xla"
"""Name of the model attribute holding its per-replica steps."""


# ---------------------------------------------------------------------------
# XLA per replica
# ---------------------------------------------------------------------------


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
    the gradients is thereby left to `tf.distribute` (NCCL on GPUs). There,
    too, each replica shifts the layers' seed states by its replica id for the
    core (`shift_seeds`: dropout masks differ across replicas), and under a
    `LossScaleOptimizer` all replicas agree on whether the step's gradients
    are finite (`skip_non_finite_on_all_replicas`). A model without trainable
    weights gets Keras' warning and no update, as in Keras' own `fit`.

    Loss semantics follow Keras' TensorFlow trainer: the compiled loss of a
    replica's batch is multiplied by 1 / num_replicas before the SUM
    all-reduce, so the applied gradient is the gradient of the mean loss over
    the global batch (Keras' TensorFlow trainer scales `add_loss` and
    regularizer terms the same way), and `optimizer.scale_loss` is applied to
    it (mixed precision).

    Gradient accumulation over k steps (`noisy_keras.engine.accumulation`):
    k-1 "accumulate" steps add each replica's gradients to replica-local
    accumulators, and every k-th "update" step applies their average with
    `optimizer.apply`; the host picks which compiled step runs.
    """

    def __init__(self, model: keras.Model, jit_compile: bool = True, accumulation_steps: int = 1):
        self.model = model
        self.jit_compile = jit_compile
        self.accumulation_steps = accumulation_steps
        # The engine's gradient accumulation (engine.accumulation), for k > 1.
        self.accumulator = (
            accumulation.GradientAccumulator(model, accumulation_steps)
            if accumulation_steps > 1
            else None
        )
        # The pure, compiled functions of each replica (engine.cores).
        cores = StatelessCores(model, jit_compile)
        self.cores = cores
        self.loss_and_predictions = cores.loss_and_predictions
        self.predictions = cores.predictions
        # Noise kinds that need the step (multiplicative weights, matched trace): noise_hooks.
        self.noise = noise_hooks.EngineNoise(self, cores)

    # ---- steps (replica context, outside XLA) ---------------------------------

    def _state_in(self):
        """This replica's non-trainable values for a core, seeds shifted (`shift_seeds`)."""
        seeds = seed_state_positions(self.model)
        return seeds, shift_seeds(values(self.model.non_trainable_variables), seeds, +1)

    def _state_out(self, seeds, non_trainable) -> None:
        """Writes back what a core changed: seeds unshifted, floats averaged over replicas."""
        non_trainable = shift_seeds(non_trainable, seeds, -1)
        assign(self.model.non_trainable_variables, mean_over_replicas(non_trainable))

    def _update_metrics(self, loss, x, y, y_pred, sample_weight):
        model = self.model
        internals.loss_tracker(model).update_state(
            internals.unscale_loss_for_distribution(loss), sample_weight=batch_size(x)[1]
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

    def _train_step(self, data, update, micro_batch=0):
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        optimizer = model.optimizer
        # Keras' optimizers scale linearly (loss * factor); read the factor here,
        # outside XLA, since a LossScaleOptimizer keeps it in a variable.
        loss_scale = tf.convert_to_tensor(optimizer.scale_loss(tf.constant(1.0, tf.float32)))
        seeds, non_trainable = self._state_in()
        core_inputs = (
            values(model.trainable_variables),
            non_trainable,
            values(model.metrics_variables),
            loss_scale,
            x,
            y,
            sample_weight,
        )
        # ---- gradient methods (engine.methods: SAM, ...) and noise kinds (noise_hooks):
        # the plain core unless one is on ----
        noise = self.noise.step(micro_batch, x)
        if noise is None:
            core = self.cores.train_core(*self.cores.method_in_force())
            loss, gradients, y_pred, non_trainable, metrics = core(*core_inputs)
        else:
            outputs = self.noise.loss_and_gradients(noise, core_inputs)
            loss, gradients, y_pred, non_trainable, metrics = outputs
        # ---- end noise kinds ----
        self._state_out(seeds, non_trainable)
        assign(model.metrics_variables, metrics)
        if not model.trainable_variables:
            # Keras' own train_step: warn, update no weights, keep metrics and RNG state.
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
            return self._update_metrics(loss, x, y, y_pred, sample_weight)
        gradients = dense_all(gradients)
        self.noise.observe(noise, gradients, update, loss_scale)  # matched: once per update
        if self.accumulator is not None and not update:
            self.accumulator.add(gradients)
        else:
            if self.accumulator is not None:
                gradients = self.accumulator.average(gradients)
            optimizer.apply(
                skip_non_finite_on_all_replicas(gradients, optimizer), model.trainable_variables
            )
        return self._update_metrics(loss, x, y, y_pred, sample_weight)

    def make_train_function(self, force=False):
        """Keras' train function; with accumulation, k-1 accumulate steps then an update."""
        model = self.model
        if model.train_function is not None and not force:
            return model.train_function
        if self.accumulator is None:
            internals.default_make_train_function(model, force=True)
            return model.train_function
        k = self.accumulation_steps
        # ---- noise kinds: micro-batch m's offset and count enter the step: one function per m.
        if self.noise.needs_micro_batch_index():
            functions = [
                internals.make_step_function(
                    model, functools.partial(self._train_step, update=m == k - 1, micro_batch=m)
                )
                for m in range(k)
            ]
        else:
            accumulate = internals.make_step_function(model, self.accumulate_step)
            apply_update = internals.make_step_function(model, self.train_step)
            functions = [accumulate] * (k - 1) + [apply_update]
        model.train_function = accumulation.cycle(functions)
        return model.train_function

    def test_step(self, data):
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        seeds, non_trainable = self._state_in()
        loss, y_pred, non_trainable, metrics = self.loss_and_predictions(
            values(model.trainable_variables),
            non_trainable,
            values(model.metrics_variables),
            x,
            y,
            sample_weight,
        )
        self._state_out(seeds, non_trainable)
        assign(model.metrics_variables, metrics)
        return self._update_metrics(loss, x, y, y_pred, sample_weight)

    def predict_step(self, data):
        model = self.model
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        seeds, non_trainable = self._state_in()
        y_pred, non_trainable = self.predictions(
            values(model.trainable_variables), non_trainable, x
        )
        self._state_out(seeds, non_trainable)
        return y_pred


def _overridden(model: keras.Model, name: str) -> bool:
    """Whether the model's class replaces Keras' own `name` method."""
    own = getattr(type(model), name)
    return own is not getattr(keras.Model, name)


def _refuse_optimizer_accumulation(optimizer) -> None:
    k = optimizer_accumulation_steps(optimizer)
    if k:
        raise ValueError(
            f"The optimizer has gradient_accumulation_steps={k}; the engine accumulates "
            "gradients itself (Keras' own accumulation fails under MirroredStrategy and feeds a "
            "learning-rate schedule the micro-batch count). Remove it from the optimizer and pass "
            f"accumulation_steps={k} to enable_replica_xla or noisy_keras.engine.fit.fit."
        )


def enable_replica_xla(
    model: keras.Model, *, jit_compile: bool = True, accumulation_steps: int = 1
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
            into one update (1: none). The engine is the one owner of
            accumulation: an optimizer with Keras' own
            `gradient_accumulation_steps` is refused. With k > 1,
            `optimizer.iterations` (the noise step and the learning-rate
            schedule's position) counts updates, and the model must use
            `steps_per_execution=1`.

    Noise kinds that need the step itself are applied here
    (`noisy_keras.engine.hooks`): multiplicative noise
    (`enable_multiplicative_noise`, before or after this call) weights each
    example inside the XLA core by its position in the global batch, and a
    `MatchedNoiseOptimizer` gets tr(Sigma) estimated from the micro-batches
    (k >= 2) or from two halves of each replica's batch (k = 1; refused for
    models with BatchNormalization), once per update. A gradient method
    (`noisy_keras.engine.methods`: SAM, the gradient-norm penalty; before or
    after this call) runs its two passes in the same compiled core.

    Returns:
        `model` itself, patched in place.

    Raises:
        ValueError: the model is not compiled or not built, its class
            overrides a step method, its optimizer accumulates gradients, or
            its noise kind does not fit the layout (`noise_hooks.check_engine_noise`).

    Example:
        >>> strategy = noisy_keras.engine.distribute.make_strategy("mirrored")
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
                "replaces the step methods and would silently drop it. Instead, move what it "
                "does into `call`, `compute_loss` or `compute_metrics` (which the engine runs), "
                "or train this model with Keras' own `fit` without enable_replica_xla."
            )
    if jit_compile not in (True, False):
        raise ValueError(f"jit_compile must be True or False; received {jit_compile!r}.")
    k = check_int("accumulation_steps", accumulation_steps, 1)
    _refuse_optimizer_accumulation(model.optimizer)
    if k > 1 and model.steps_per_execution != 1:
        raise ValueError(
            f"gradient accumulation (k={k}) needs steps_per_execution=1; the model was compiled "
            f"with steps_per_execution={model.steps_per_execution}."
        )
    noise_hooks.check_engine_noise(model, k)  # noise kinds the engine must honour
    steps = _ReplicaXLASteps(model, jit_compile=jit_compile, accumulation_steps=k)
    object.__setattr__(model, ATTRIBUTE, steps)
    object.__setattr__(model, "make_train_function", steps.make_train_function)
    internals.replace_symbolic_build(model, symbolic_build_hook(model))
    object.__setattr__(model, "train_step", steps.train_step)
    object.__setattr__(model, "test_step", steps.test_step)
    object.__setattr__(model, "predict_step", steps.predict_step)
    model.jit_compile = False
    model.train_function = None
    model.test_function = None
    model.predict_function = None
    return model


def replica_steps(model: keras.Model):
    """The per-replica steps `enable_replica_xla` attached to `model`, or None."""
    return getattr(model, ATTRIBUTE, None)


def _accumulation_steps_of(model: keras.Model) -> int | None:
    steps = replica_steps(model)
    return None if steps is None else steps.accumulation_steps


# The engine weights the examples of multiplicative noise in its own XLA core: it
# tells noise.multiplicative which models it drives, so their compute_loss steps aside.
multiplicative.register_engine(_accumulation_steps_of)


def replica_xla_functions(model: keras.Model) -> dict:
    """The compiled per-replica functions of a model patched by `enable_replica_xla`.

    Returns:
        `{"train": ..., "test": ..., "predict": ...}`, each a `tf.function`
        with `jit_compile=True` (inspect it with
        `experimental_get_tracing_count` or `experimental_get_compiler_ir`).
        "train" is the plain train core; a gradient method's cores are
        `replica_steps(model).cores.method_cores()`.

    Raises:
        ValueError: `enable_replica_xla` was not applied to `model`.
    """
    steps = getattr(model, ATTRIBUTE, None)
    if steps is None:
        raise ValueError(
            f"`model` {model.name!r} has no per-replica XLA steps; call "
            "enable_replica_xla(model) first."
        )
    return {
        "train": steps.cores.loss_and_gradients,
        "test": steps.loss_and_predictions,
        "predict": steps.predictions,
    }
