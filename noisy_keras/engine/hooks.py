"""The engine's side of the noise kinds that need the training step itself.

`noisy_keras.engine.steps` calls these hooks from its train step; they do
nothing (and the step is unchanged, bit for bit) unless a model has
multiplicative noise or a `MatchedNoiseOptimizer` with a deficit s^2 > 0.

Multiplicative noise (`noisy_keras.noise.multiplicative`, Wu et al. 2020) weights
example p of an update's global batch of B by w(seed, t, p). The engine's XLA
core is pure: it reads no variable, so the step reads t (the optimizer's
`iterations`) outside XLA and passes it into the core with the global position
of this replica's first example, o = m B / k + r B / (k R) for replica r of R
in micro-batch m of k (`multiplicative.global_offset`); the core multiplies
the sample weights by `example_weights(n, seed, t, o)`. Any split of the global
batch over replicas and micro-batches therefore weights every example as one
device would. The patched `compute_loss` of `enable_multiplicative_noise`
steps aside under the engine: the weights enter once.

Covariance-matched noise (`noisy_keras.noise.matched`) needs tr(Sigma) at every
update, estimated from G >= 2 gradient groups of that update on each replica:

* with k >= 2 accumulation steps, the replica's k micro-batches: their spread
  sum_j |g_j - g_bar|^2 is folded in one micro-batch at a time by Welford's
  update (`covariance.streaming_spread_update`) from the engine's own
  accumulators and one replica-local scalar, and the estimate is
  n / (k - 1) times it;
* with k = 1, the two halves of the replica's batch of n, computed one after
  the other inside the same XLA core (two forward and backward passes of n/2
  instead of one of n): the batch gradient is (n_1 g_1 + n_2 g_2) / n, which
  is exactly the gradient of the batch's mean loss when no layer couples the
  examples of a batch, and the estimate is `two_group_trace_estimate`.
  BatchNormalization couples them: each half would be normalized with its own
  statistics (a ghost-batch change of the model) and the moving statistics
  would move twice per step. Such models are refused with k = 1; with
  accumulation the micro-batches are the groups and nothing changes.

The core's gradients are those of the loss times the loss scale and divided by
R (Keras' distributed mean loss), so each estimate is multiplied by
(R / loss scale)^2. Each replica's estimate is all-reduced to the replicas'
mean, and `observe_covariance_trace` is called with it once per update, before
`optimizer.apply`.

References:
    J. Wu, W. Hu, H. Xiong, J. Huan, V. Braverman and Z. Zhu, "On the Noisy
    Gradient Descent that Generalizes as SGD", ICML 2020.
    B. P. Welford, "Note on a Method for Calculating Corrected Sums of Squares
    and Products", Technometrics 4(3), 1962.
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.3, Eq. 5-7).
"""

from __future__ import annotations

import dataclasses
import functools

import keras
import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras._structures import batch_size, dense_all, replica_in_sync
from noisy_keras.models.layers import GhostBatchNormalization
from noisy_keras.noise import covariance, multiplicative
from noisy_keras.noise.chain import find_wrapper
from noisy_keras.noise.matched import MatchedNoiseOptimizer

__all__ = [
    "EngineNoise",
    "StepNoise",
    "batch_coupling_layers",
    "check_engine_noise",
    "matched_optimizer",
]


def matched_optimizer(optimizer) -> MatchedNoiseOptimizer | None:
    """The `MatchedNoiseOptimizer` with s^2 > 0 in an optimizer chain, or None.

    Follows `inner_optimizer` through wrappers (e.g. Keras' LossScaleOptimizer).
    """
    matched = find_wrapper(optimizer, MatchedNoiseOptimizer)
    return matched if matched is not None and matched.adds_noise else None


def batch_coupling_layers(model: keras.Model) -> list:
    """The layers of `model` whose training output depends on the rest of the batch (BN)."""
    kinds = (keras.layers.BatchNormalization, GhostBatchNormalization)
    return [layer for layer in internals.flatten_layers(model) if isinstance(layer, kinds)]


def check_engine_noise(model: keras.Model, accumulation_steps: int) -> None:
    """Raises ValueError for noise settings the engine cannot honour (named in the message).

    Multiplicative noise needs B divisible by k R; matched noise with k = 1
    splits each replica's batch in two, which a model with BatchNormalization
    would see as a change of the model (module docstring).
    """
    settings = multiplicative.active_multiplicative_noise(model)
    if settings is not None:
        multiplicative.check_layout(model, settings, accumulation_steps)
    if matched_optimizer(model.optimizer) is not None and accumulation_steps == 1:
        coupled = batch_coupling_layers(model)
        if coupled:
            names = ", ".join(layer.name for layer in coupled[:3])
            raise ValueError(
                "MatchedNoiseOptimizer estimates tr(Sigma) from two halves of each replica's "
                f"batch when accumulation_steps=1, but the model has BatchNormalization ({names}"
                f"{', ...' if len(coupled) > 3 else ''}), which would normalize each half with "
                "its own statistics. Use accumulation_steps >= 2 (the micro-batches are then "
                "the groups), or another noise kind."
            )


@dataclasses.dataclass
class StepNoise:
    """What one train step of one replica needs for its noise kinds (built while tracing).

    Attributes:
        micro_batch: m, the step's index in its accumulation cycle (0 without one).
        batch_size: n, this replica's examples in this step (scalar tensor).
        weights: the `MultiplicativeNoise` settings, or None.
        matched: the `MatchedNoiseOptimizer` to observe, or None.
        step: t, the update step (int64 scalar tensor).
        offset: o, the global position of this replica's first example (int64).
        group_trace: the core's two-halves estimate (raw gradient units), once computed.
    """

    micro_batch: int
    batch_size: tf.Tensor
    weights: multiplicative.MultiplicativeNoise | None
    matched: MatchedNoiseOptimizer | None
    step: tf.Tensor
    offset: tf.Tensor
    group_trace: tf.Tensor | None = None


def _slice(structure, start, stop):
    return tf.nest.map_structure(lambda t: None if t is None else t[start:stop], structure)


def _merged(old_values, changed) -> list:
    """Full values after a stateless call: the changed ones, else the old."""
    return [old if new is None else new for old, new in zip(old_values, changed, strict=True)]


def _halves_loss_and_gradients(core, trainable, non_trainable, metrics, loss_scale, x, y, sw):
    """The plain core (`core`) run on the two halves of the batch, one after the other, combined.

    Returns the plain core's outputs for the whole batch (loss and gradients
    weighted n_i / n, predictions concatenated, state threaded from the first
    half into the second) and the two-group trace estimate in raw units.
    """
    _, n = batch_size(x)
    n_1 = n // 2
    outputs = []
    state = (list(non_trainable), list(metrics))
    changed = None
    for start, stop in ((0, n_1), (n_1, n)):
        loss, gradients, y_pred, new_non_trainable, new_metrics = core(
            trainable,
            state[0],
            state[1],
            loss_scale,
            _slice(x, start, stop),
            _slice(y, start, stop),
            _slice(sw, start, stop),
        )
        outputs.append((loss, dense_all(gradients), y_pred))
        if changed is None:
            changed = (new_non_trainable, new_metrics)
        else:  # changed by either half: the second half's value, else the first's
            changed = tuple(
                [a if b is None else b for a, b in zip(first, second, strict=True)]
                for first, second in zip(changed, (new_non_trainable, new_metrics))
            )
        state = (_merged(state[0], new_non_trainable), _merged(state[1], new_metrics))
    (loss_1, grads_1, pred_1), (loss_2, grads_2, pred_2) = outputs
    fraction = tf.cast(n_1, loss_1.dtype) / tf.cast(n, loss_1.dtype)
    loss = fraction * loss_1 + (1.0 - fraction) * loss_2
    gradients = [
        None if a is None else tf.cast(fraction, a.dtype) * a + tf.cast(1.0 - fraction, a.dtype) * b
        for a, b in zip(grads_1, grads_2, strict=True)
    ]
    y_pred = tf.nest.map_structure(lambda a, b: tf.concat([a, b], axis=0), pred_1, pred_2)
    pairs = [(a, b) for a, b in zip(grads_1, grads_2, strict=True) if a is not None]
    trace = covariance.two_group_trace_estimate(
        [tf.cast(a, tf.float32) for a, _ in pairs],
        [tf.cast(b, tf.float32) for _, b in pairs],
        n_1,
        n - n_1,
    )
    return (loss, gradients, y_pred, changed[0], changed[1]), trace


def _noisy_loss_and_gradients(
    core, settings, halves, trainable, non_trainable, metrics, loss_scale, x, y, sw, t, offset
):
    """The engine's pure core (`core`, uncompiled) with the noise kinds: weights, halves."""
    if settings is not None:
        _, n = batch_size(x)
        sw = multiplicative.weighted_sample_weight(sw, settings.weights(n, t, offset))
    if halves:
        return _halves_loss_and_gradients(
            core, trainable, non_trainable, metrics, loss_scale, x, y, sw
        )
    outputs = core(trainable, non_trainable, metrics, loss_scale, x, y, sw)
    return outputs, tf.zeros([], tf.float32)


class EngineNoise:
    """The noise kinds' state and compiled cores for one `_ReplicaXLASteps` (its `noise`).

    Owns one replica-local scalar, the running spread of the micro-batch
    gradients (with accumulation), and one compiled core per (multiplicative
    settings, halves) in force, traced when first used.
    """

    def __init__(self, steps, cores):
        """`steps`: the engine's `_ReplicaXLASteps`; `cores`: its `StatelessCores`."""
        self._steps = steps
        self._cores_of_model = cores
        self._cores = {}
        self.spread = None
        if steps.accumulation_steps > 1:
            with steps.model.distribute_strategy.scope():
                self.spread = tf.Variable(
                    0.0,
                    trainable=False,
                    synchronization=tf.VariableSynchronization.ON_READ,
                    aggregation=tf.VariableAggregation.MEAN,
                    name="gradient_group_spread",
                )

    def _kinds(self):
        model = self._steps.model
        return multiplicative.active_multiplicative_noise(model), matched_optimizer(model.optimizer)

    def needs_micro_batch_index(self) -> bool:
        """Whether a noise kind is on, so each accumulation step must know its index m."""
        settings, matched = self._kinds()
        return settings is not None or matched is not None

    def step(self, micro_batch: int, x) -> StepNoise | None:
        """This replica's noise inputs for a train step, or None when no noise kind is on.

        Reads t and the replica's id outside XLA and checks the settings
        against the engine's layout (ValueError, at trace time).
        """
        settings, matched = self._kinds()
        if settings is None and matched is None:
            return None
        model, k = self._steps.model, self._steps.accumulation_steps
        check_engine_noise(model, k)
        replica_id, num_replicas = replica_in_sync()
        static, n = batch_size(x)
        for name, batch in (
            ("multiplicative noise", None if settings is None else settings.batch_size),
            ("MatchedNoiseOptimizer", None if matched is None else matched.batch_size),
        ):
            if batch is not None and static is not None and static * k * num_replicas > batch:
                raise ValueError(
                    f"A replica's batch has {static} examples, so an update sees {static} x "
                    f"{k} (accumulation steps) x {num_replicas} (replicas) = "
                    f"{static * k * num_replicas}, more than the batch_size={batch} given to "
                    f"{name}; it must be the global batch of one update."
                )
        if matched is not None and k == 1 and static is not None and static < 2:
            raise ValueError(
                f"MatchedNoiseOptimizer splits each replica's batch in two halves, but a replica "
                f"has {static} example(s); allowed: at least 2 per replica."
            )
        offset = tf.zeros([], tf.int64)
        if settings is not None:
            offset = multiplicative.global_offset(
                batch_size=settings.batch_size,
                replica_id=tf.convert_to_tensor(replica_id),
                num_replicas=num_replicas,
                micro_batch=micro_batch,
                micro_batches=k,
            )
        return StepNoise(
            micro_batch=micro_batch,
            batch_size=n,
            weights=settings,
            matched=matched,
            step=tf.cast(tf.convert_to_tensor(model.optimizer.iterations), tf.int64),
            offset=tf.cast(offset, tf.int64),
        )

    def _core(self, settings, halves: bool):
        # The train core of the model's gradient method (SAM, ...; engine.methods), per key.
        method, num_replicas = self._cores_of_model.method_in_force()
        key = (settings, halves, method, num_replicas)
        if key not in self._cores:
            core = self._cores_of_model.uncompiled_train_core(method, num_replicas)
            function = functools.partial(_noisy_loss_and_gradients, core, settings, halves)
            self._cores[key] = tf.function(
                function, jit_compile=self._steps.jit_compile, reduce_retracing=True
            )
        return self._cores[key]

    def compiled_cores(self) -> list:
        """The compiled cores traced so far (to inspect, e.g. for XLA)."""
        return list(self._cores.values())

    def loss_and_gradients(self, noise: StepNoise, core_inputs):
        """The core's outputs for this step with the noise kinds applied.

        `core_inputs` are the plain core's arguments (variable values, loss
        scale, x, y, sample weight). Keeps the two-halves estimate in `noise`.
        """
        halves = noise.matched is not None and self._steps.accumulation_steps == 1
        if noise.weights is None and not halves:
            cores = self._cores_of_model
            return cores.train_core(*cores.method_in_force())(*core_inputs)
        outputs, noise.group_trace = self._core(noise.weights, halves)(
            *core_inputs, noise.step, noise.offset
        )
        return outputs

    def observe(self, noise: StepNoise | None, gradients, update: bool, loss_scale) -> None:
        """Folds this step's groups into the trace estimate; observes it once per update.

        Call after the core and before the engine's accumulate / apply branch
        (it reads the accumulators as they were before this step).
        """
        if noise is None or noise.matched is None:
            return
        model = self._steps.model
        if not model.optimizer.built:  # as `apply` would, on the first trace (no strategy)
            with keras.name_scope(model.optimizer.name, caller=model.optimizer):
                model.optimizer.build(model.trainable_variables)
        num_replicas = replica_in_sync()[1]
        unscale = tf.square(float(num_replicas) / tf.cast(loss_scale, tf.float32))
        k = self._steps.accumulation_steps
        if k == 1:
            estimate = noise.group_trace
        else:
            m = noise.micro_batch
            previous = None
            if m > 0:
                previous = [a.read_value() for a in self._steps.accumulator.variables]
            spread = covariance.streaming_spread_update(
                self.spread.read_value() if m > 0 else 0.0,
                None if previous is None else [tf.cast(p, tf.float32) for p in previous],
                [None if g is None else tf.cast(g, tf.float32) for g in gradients],
                m,
            )
            if not update:
                self.spread.assign(spread)
                return
            self.spread.assign(tf.zeros_like(spread))
            size = tf.cast(noise.batch_size, tf.float32)
            estimate = size / float(k - 1) * spread
        estimate = tf.cast(estimate, tf.float32) * unscale
        if num_replicas > 1:
            estimate = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.MEAN, estimate
            )
        noise.matched.observe_covariance_trace(estimate)
