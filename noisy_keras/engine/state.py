"""What each replica's step reads and writes back, and what all replicas must agree on.

The engine (`noisy_keras.engine.steps`) runs a pure per-replica core on the
values of the model's variables; around it, in the replica context:

* `values` / `assign` / `changed`: read the variables, write back only what
  the core changed;
* `mean_over_replicas`: BatchNormalization's moving statistics averaged over
  the replicas each step (Keras 3 creates them with aggregation "none");
* `shift_seeds`: seeded layer randomness (dropout) drawn per replica, as
  across the examples of one device's batch, while every replica writes back
  the same seed state;
* `skip_non_finite_on_all_replicas`: a step whose gradients are non-finite on
  any replica is skipped on all of them (loss scaling under mixed_float16);
* `symbolic_build_hook`: Keras builds metrics and optimizer from this worker's
  first replica's batch (an eager MEAN of a distributed batch fails under
  MultiWorkerMirroredStrategy).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from noisy_keras import _keras_internals as internals

__all__ = [
    "REPLICA_SEED_STRIDE",
    "assign",
    "changed",
    "mean_over_replicas",
    "seed_state_positions",
    "shift_seeds",
    "skip_non_finite_on_all_replicas",
    "symbolic_build_hook",
    "values",
]


def values(variables) -> list:
    """Current values of `variables`, read on this replica's device."""
    return [tf.convert_to_tensor(v.value) for v in variables]


def assign(variables, values) -> None:
    """Writes back the values a stateless call changed (None: unchanged)."""
    for variable, value in zip(variables, values, strict=True):
        if value is not None:
            variable.assign(value)


def changed(old_values, new_values) -> list:
    """New values, with None where the stateless call returned the input unchanged."""
    return [None if new is old else new for old, new in zip(old_values, new_values, strict=True)]


def check_state_unchanged_in_length(name: str, old_values, new_values) -> None:
    """Raises ValueError if the traced step created state variables (it must only update them)."""
    if len(new_values) != len(old_values):
        raise ValueError(
            f"The model's {name} went from {len(old_values)} to {len(new_values)} while the "
            "per-replica step was traced: the compiled loss or metrics were built lazily inside "
            "it. `model.fit` and `evaluate` build them from their first batch before tracing; "
            "when calling the per-replica functions directly, run `model.evaluate` on one "
            "batch first."
        )


def mean_over_replicas(values) -> list:
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


# ---------------------------------------------------------------------------
# Seeded layer randomness per replica
# ---------------------------------------------------------------------------

REPLICA_SEED_STRIDE = 0x9E3779B9
"""Replica r adds r * REPLICA_SEED_STRIDE to the first word of every seed state."""


def seed_state_positions(model: keras.Model) -> list[int]:
    """Positions in `model.non_trainable_variables` of its layers' `SeedGenerator` states."""
    states = {id(state) for state in internals.seed_generator_states(model)}
    return [i for i, v in enumerate(model.non_trainable_variables) if id(v) in states]


def _replica_seed_offset(dtype):
    """[r * REPLICA_SEED_STRIDE, 0] for replica r in sync, or None with one replica.

    Integer arithmetic wraps around, so adding and later subtracting it is exact
    for every integer seed dtype.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    replica = tf.cast(context.replica_id_in_sync_group, dtype)
    stride = tf.constant(REPLICA_SEED_STRIDE, dtype)
    return tf.stack([replica * stride, tf.zeros((), dtype)])


def shift_seeds(values, positions, sign: int) -> list:
    """Adds (sign=1) or removes (sign=-1) this replica's offset to the seed states at `positions`.

    Rule: a layer's `SeedGenerator` state s = [seed, counter] is mirrored, so
    without this every replica draws the same dropout mask from its share of
    the global batch. Replica r runs its step with s + [r * stride, 0] and
    writes back s' - [r * stride, 0], where s' is what the step returned: the
    draws differ across replicas as across the examples of one device's
    global batch, every replica stores the same state, and replica 0 (and
    one device) draws exactly what Keras' own step draws.
    """
    if not positions:
        return values
    values = list(values)
    for i in positions:
        if values[i] is None:
            continue
        offset = _replica_seed_offset(values[i].dtype)
        if offset is None:
            return values
        values[i] = values[i] + offset if sign > 0 else values[i] - offset
    return values


# ---------------------------------------------------------------------------
# Mixed precision: one decision per step for all replicas
# ---------------------------------------------------------------------------


def skip_non_finite_on_all_replicas(gradients, optimizer) -> list:
    """Gives every replica non-finite gradients when any replica's are non-finite.

    Rule: Keras' `LossScaleOptimizer` under `tf.distribute` checks the
    gradients of the first replica only, before they are all-reduced, so an
    overflow on replica 1 alone would be applied (as inf) and the loss scale
    raised. Here each replica counts its non-finite flag into one scalar SUM
    all-reduce; if it is > 0 every replica's gradients are multiplied by NaN,
    so the loss-scale optimizer skips the update on all replicas, lowers the
    scale once and leaves `iterations` (the noise step) unchanged, as on one
    device. No-op for other optimizers and for one replica.
    """
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return gradients
    context = tf.distribute.get_replica_context()
    present = [g for g in gradients if g is not None]
    if context is None or context.num_replicas_in_sync == 1 or not present:
        return gradients
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in present]))
    bad = tf.cast(tf.logical_not(finite), tf.float32)
    bad = context.all_reduce(tf.distribute.ReduceOp.SUM, bad)
    factor = tf.where(bad > 0.0, float("nan"), 1.0)
    return [None if g is None else g * tf.cast(factor, g.dtype) for g in gradients]


def _local_value(strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def symbolic_build_hook(model: keras.Model):
    """Keras' `_maybe_symbolic_build`, taking shapes from this worker's first replica.

    Keras reduces a distributed batch with MEAN only to learn its shapes and
    dtypes; under `MultiWorkerMirroredStrategy` that eager reduce fails
    ("Attempt to convert a value (PerReplica...) to a Tensor"). The local
    first replica's batch has the same shapes and dtypes.
    """

    def maybe_symbolic_build(iterator=None, data_batch=None):
        # Unlike Keras, build also without a strategy (under the default one): the
        # compiled loss and metrics must exist before the pure core is traced, or
        # they would create their variables inside it (see _forward_and_loss).
        strategy = model.distribute_strategy
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(
                    lambda value: _local_value(strategy, value), next(it)
                )
                break
        with strategy.scope():
            internals.symbolic_build(model, data_batch)

    return maybe_symbolic_build
