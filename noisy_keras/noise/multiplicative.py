"""Multiplicative (per-example) gradient noise: random weights on the examples' losses.

Wu et al. (ICML 2020) obtain noise with SGD's own covariance at the cost of no
extra backward pass: weight example i's loss by a random factor w_i with mean
1 and variance s^2. The gradient of the weighted mean loss over a batch of B is

    (1/B) sum_i w_i g_i = g_B + (1/B) sum_i (w_i - 1) g_i,

so the added noise has mean 0 and, given the batch, covariance

    s^2 / B^2 * sum_i g_i g_i^T  ~  s^2 (Sigma + g g^T) / B

(only the first two moments of w enter), the shape of the gradient noise that
Jaiswal & Taura's Eq. 6 says a large batch has lost, g_B ~ N(g, Sigma / B). The
extra term g g^T (the weights' sum is random too, which rescales the whole
gradient by a factor of mean 1 and variance s^2 / B) is small next to Sigma
where |g|^2 << tr(Sigma), i.e. where McCandlish et al.'s noise scale
tr(Sigma) / |g|^2 is large, which is where SGD's own noise matters. The size s^2
comes from the learning-rate rule (`noisy_keras.noise.temperature.temperature_deficit`):
s^2 = B/b - 1 at the small batch's learning rate (Wu et al.), 0 under linear
scaling.

The weights are Gaussian, w ~ N(1, s^2), as in Wu et al.: the noise is then a
Gaussian mixture of the g_i whatever the batch, and since only the mean and
variance of w enter the covariance, a non-negative law (e.g. Gamma) would
change no second-order property while making most weights tiny and a few huge
for s^2 >> 1. Weights can be negative; the weighted loss is still an unbiased
estimate of the plain one.

Reproducibility. w(seed, t, p) is a pure function of the seed, the update step t
and the example's position p in the global batch of the update: Philox-4x32 with
counter (p, t) under a key that is the seed salted in its high 32 bits, so it
never equals the white noise's key (`noisy_keras.noise`, seeds < 2**31). Replica
r of R holds positions r n, ..., r n + n - 1 (n = B / R); under gradient
accumulation over k micro-batches, micro-batch m holds m B / k onwards, and
replica r within it r B / (k R) onwards (`global_offset`). Any split of the
global batch therefore draws the same weights.

References:
    J. Wu, W. Hu, H. Xiong, J. Huan, V. Braverman and Z. Zhu, "On the Noisy
    Gradient Descent that Generalizes as SGD", ICML 2020,
    https://arxiv.org/abs/1906.07405.
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.3, Eq. 6-7).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import secrets
import warnings
from collections.abc import Callable

import keras
import tensorflow as tf

from noisy_keras._structures import batch_size, replica_in_sync
from noisy_keras._validation import check_int, check_number, replica_share
from noisy_keras.noise import draw, schedules, temperature
from noisy_keras.noise.chain import optimizer_accumulation_steps

# High 32 bits of the Philox key of the example weights ("mult" in ASCII).
WEIGHTS_KEY_SALT = 0x6D756C74
_ATTRIBUTE = "_noisy_keras_multiplicative_noise"
# Engines that weight the examples in their own training step (`register_engine`).
_ENGINES: list[Callable[[keras.Model], int | None]] = []

__all__ = [
    "MultiplicativeNoise",
    "NOT_SAVED",
    "WEIGHTS_KEY_SALT",
    "active_multiplicative_noise",
    "check_layout",
    "disable_multiplicative_noise",
    "enable_multiplicative_noise",
    "example_weights",
    "global_offset",
    "not_saved_message",
    "register_engine",
    "weighted_sample_weight",
]


def _check_variance(variance) -> float:
    return check_number("variance", variance, "a finite number >= 0", lambda v: v >= 0)


def _check_seed(seed) -> int:
    if seed is None:
        raise ValueError(f"`seed` must be an integer in [0, {schedules.SEED_MAX}]; received None.")
    schedules.validate_noise_parameters(0.0, 0.0, seed)
    return int(seed)


def example_weights(num, *, seed: int, step, offset=0, variance: float) -> tf.Tensor:
    """w_p = 1 + s z(seed, t, p) for positions p = offset, ..., offset + num - 1.

    z(seed, t, p) ~ N(0, 1) is `noise.positional_standard_normal` under the key
    seed + WEIGHTS_KEY_SALT * 2**32, so w has mean 1 and variance s^2 (Wu et al.
    2020) and depends on nothing but (seed, t, p): the weights of positions
    [o, o + n) are the same drawn as one block or in pieces. With variance 0 the
    weights are exactly 1 and nothing is drawn.

    Args:
        num: n, how many positions (Python int or scalar integer tensor).
        seed: integer in [0, 2**31 - 1].
        step: t, the update step (Python int or scalar integer tensor).
        offset: o, the global position of the first example (int or tensor).
        variance: s^2, a finite float >= 0.

    Returns:
        A float32 tensor of shape [num].
    """
    seed = _check_seed(seed)
    variance = _check_variance(variance)
    if variance == 0.0:
        return tf.ones([num], tf.float32)
    key = seed + (WEIGHTS_KEY_SALT << 32)
    z = draw.positional_standard_normal(num, key, step, offset)
    return 1.0 + tf.constant(math.sqrt(variance), tf.float32) * z


def global_offset(
    *, batch_size: int, replica_id=0, num_replicas: int = 1, micro_batch=0, micro_batches: int = 1
):
    """o = m B / k + r B / (k R): where replica r's examples of micro-batch m start.

    The global batch of one update, B examples, is laid out micro-batch by
    micro-batch (k of them, B / k examples each) and, inside one, replica by
    replica (R of them, B / (k R) each), which is how `tf.distribute` splits a
    global batch and how gradient accumulation consumes the data stream.

    Args:
        batch_size: B, examples per update; divisible by k R.
        replica_id: r in [0, R) (int or scalar integer tensor).
        num_replicas: R >= 1.
        micro_batch: m in [0, k) (int or scalar integer tensor).
        micro_batches: k >= 1, accumulation steps per update.

    Returns:
        o, an int64 tensor (or int when r and m are ints).
    """
    batch_size = check_int("batch_size", batch_size, 1)
    num_replicas = check_int("num_replicas", num_replicas, 1)
    micro_batches = check_int("micro_batches", micro_batches, 1)
    per_replica = replica_share(batch_size, num_replicas, micro_batches)
    if per_replica is None:
        raise ValueError(
            f"batch_size must be divisible by micro_batches * num_replicas = "
            f"{micro_batches} * {num_replicas} (every replica's share of every micro-batch "
            f"is the same); received batch_size={batch_size}."
        )
    per_micro_batch = per_replica * num_replicas
    if isinstance(replica_id, numbers.Integral) and isinstance(micro_batch, numbers.Integral):
        return int(micro_batch) * per_micro_batch + int(replica_id) * per_replica
    return tf.cast(micro_batch, tf.int64) * per_micro_batch + (
        tf.cast(replica_id, tf.int64) * per_replica
    )


@dataclasses.dataclass(frozen=True)
class MultiplicativeNoise:
    """The settings of multiplicative noise on a model: w ~ N(1, variance), seeded.

    Attributes:
        variance: s^2, the weights' variance (0: no noise, the model is untouched).
        seed: the seed of the weights, in [0, 2**31 - 1].
        batch_size: B, examples per parameter update (the global batch of an update).
    """

    variance: float
    seed: int
    batch_size: int

    def weights(self, num, step, offset=0) -> tf.Tensor:
        """The weights of positions [offset, offset + num) at update `step` (`example_weights`)."""
        return example_weights(
            num, seed=self.seed, step=step, offset=offset, variance=self.variance
        )


def register_engine(accumulation_steps_of: Callable[[keras.Model], int | None]) -> None:
    """Tells this module of an engine that weights the examples in its own training step.

    The engine (`noisy_keras.engine.steps` registers itself when imported) depends
    on this module, not the other way round. For a model the engine drives,
    `accumulation_steps_of(model)` returns its accumulation steps k (else None):
    `enable_multiplicative_noise` then checks the layout against k, and the
    patched `compute_loss` steps aside, so the weights enter once.
    """
    if accumulation_steps_of not in _ENGINES:
        _ENGINES.append(accumulation_steps_of)


def _engine_accumulation_steps(model) -> int | None:
    """k of the engine that drives `model`, or None when Keras' own `fit` does."""
    for accumulation_steps_of in _ENGINES:
        k = accumulation_steps_of(model)
        if k is not None:
            return k
    return None


def check_layout(model: keras.Model, settings: MultiplicativeNoise, accumulation_steps: int):
    """Raises ValueError unless B divides into k micro-batches of R equal replica shares."""
    replicas = int(model.distribute_strategy.num_replicas_in_sync)
    if replica_share(settings.batch_size, replicas, accumulation_steps) is None:
        raise ValueError(
            f"Multiplicative noise has batch_size={settings.batch_size}, which is not divisible "
            f"by accumulation_steps x replicas = {accumulation_steps} x {replicas}; "
            "batch_size must be the global batch of one update (every replica's share of every "
            "micro-batch the same)."
        )


def _check_loss_reductions(model) -> None:
    losses = [model.loss] if not isinstance(model.loss, (list, tuple, dict)) else model.loss
    if isinstance(losses, dict):
        losses = list(losses.values())
    for loss in losses:
        reduction = getattr(loss, "reduction", None)
        if reduction == "mean_with_sample_weight":
            raise ValueError(
                f"The loss {loss!r} has reduction='mean_with_sample_weight', which divides by "
                "the sum of the weights and so would cancel (and bias) the multiplicative "
                "noise; allowed reductions: 'sum_over_batch_size' (Keras' default), 'mean', "
                "'sum'."
            )


def weighted_sample_weight(sample_weight, weights):
    """The user's sample weights times the example weights (or the example weights alone).

    Each leaf of `sample_weight` (None, or a tensor whose first axis is the
    batch) is multiplied example by example by `weights` (shape [batch]).
    """
    if sample_weight is None:
        return weights

    def multiply(user_weight):
        if user_weight is None:
            return weights
        user_weight = tf.convert_to_tensor(user_weight)
        factor = tf.cast(weights, user_weight.dtype)
        rank = user_weight.shape.rank
        if rank is not None and rank > 1:
            factor = tf.reshape(factor, [-1] + [1] * (rank - 1))
        return user_weight * factor

    return tf.nest.map_structure(multiply, sample_weight)


def enable_multiplicative_noise(
    model: keras.Model,
    *,
    batch_size: int,
    small_batch_size: int | None = None,
    lr_multiplier: float = 1.0,
    variance: float | None = None,
    seed: int | None = None,
) -> MultiplicativeNoise:
    """Makes `model.fit` weight each example's loss by w ~ N(1, s^2) (Wu et al. 2020).

    Patches the compiled model's `compute_loss` so that, when training, the
    sample weights are multiplied by `example_weights` of the update step t
    (`model.optimizer.iterations`) and of the examples' global positions
    (`global_offset` of the replica, `tf.distribute`'s `replica_id_in_sync_group`).
    The same holds under the engine (`noisy_keras.engine.steps.enable_replica_xla`,
    `noisy_keras.engine.fit.fit`), applied before or after this call: there the
    pure XLA core multiplies the weights in itself, given t and the offset of
    replica r's share of micro-batch m (`noisy_keras.engine.hooks`), and the
    patched `compute_loss` steps aside, so the weights enter once.
    Evaluation and validation losses are the plain ones; the training loss that
    `fit` logs is the weighted one. A user's `sample_weight` is multiplied, not
    replaced. Keras' "sum_over_batch_size" reduction divides the weighted sum
    by the number of losses, not by the sum of the weights, so the weighted loss
    and its gradient are unbiased. Nothing extra is computed but n Philox
    blocks and a multiply: no second backward pass. The patch is not saved with
    the model: saving it (`model.save`, `to_json`) warns with the call that
    continues the same weights after loading (the settings returned here; the
    step counter is the optimizer's, which is saved).

    The size is either given (`variance`) or set by the learning-rate rule
    (`small_batch_size` and `lr_multiplier`): s^2 = max(0, (B/b)/m - 1)
    (`temperature.temperature_deficit`). With s^2 = 0 the model is not touched,
    so training is bit-identical to training without noise.

    Args:
        model: a compiled `keras.Model` whose `compute_loss` takes `training`.
        batch_size: B, examples per parameter update (the global batch: `fit`'s
            batch size, times the engine's accumulation steps k); divisible by the
            number of replicas times k.
        small_batch_size: b, the batch whose noise temperature is the target.
        lr_multiplier: m, the learning rate's multiplier at B relative to b (see
            `temperature.lr_multiplier_for_rule`).
        variance: s^2 given directly, instead of `small_batch_size`.
        seed: integer in [0, 2**31 - 1]; None draws one (returned).

    Returns:
        The `MultiplicativeNoise` settings (variance, seed, batch_size) in force.

    Example:
        >>> model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
        >>> noise = enable_multiplicative_noise(model, batch_size=512, small_batch_size=32)
        >>> noise.variance  # at the small batch's learning rate: B/b - 1
        15.0
    """
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model; received {type(model).__name__}.")
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise ValueError(
            "model must be compiled with an optimizer before enable_multiplicative_noise "
            "(call model.compile(optimizer=..., loss=...))."
        )
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise ValueError(
            "enable_multiplicative_noise was already applied to this model; applying it "
            "twice would multiply two sets of weights. Call disable_multiplicative_noise first."
        )
    batch_size = check_int("batch_size", batch_size, 1)
    if variance is None:
        if small_batch_size is None:
            raise ValueError(
                "Give either small_batch_size (with lr_multiplier), to set the variance by the "
                "temperature deficit, or variance; received neither."
            )
        variance = temperature.temperature_deficit(batch_size, small_batch_size, lr_multiplier)
    else:
        if small_batch_size is not None or lr_multiplier != 1.0:
            raise ValueError(
                "Give either variance or small_batch_size (with lr_multiplier), not both; "
                f"received variance={variance!r}, small_batch_size={small_batch_size!r}, "
                f"lr_multiplier={lr_multiplier!r}."
            )
        variance = _check_variance(variance)
    seed = secrets.randbelow(schedules.SEED_MAX + 1) if seed is None else _check_seed(seed)
    settings = MultiplicativeNoise(variance=variance, seed=seed, batch_size=batch_size)
    if variance == 0.0:
        return settings
    if "training" not in inspect.signature(model.compute_loss).parameters:
        raise ValueError(
            f"{type(model).__name__}.compute_loss takes no `training` argument, so the noise "
            "could not be kept out of evaluation; add `training=True` to its signature."
        )
    _check_loss_reductions(model)
    k = optimizer_accumulation_steps(model.optimizer)
    if k:
        raise ValueError(
            f"The optimizer has gradient_accumulation_steps={k}; gradient accumulation belongs "
            "to the engine (noisy_keras.engine.fit.fit(..., accumulation_steps=k)), where each "
            "micro-batch draws the weights of its positions in the global batch."
        )

    engine_k = _engine_accumulation_steps(model)
    if engine_k is not None:
        check_layout(model, settings, engine_k)

    plain_compute_loss = model.compute_loss

    def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, training=True):
        # Under the engine its pure XLA core weights the examples itself, with the
        # step and offset it is given (noisy_keras.engine.hooks): one owner, weighted once.
        if training and _engine_accumulation_steps(model) is None:
            weights = _training_weights(model, settings, y_pred)
            sample_weight = weighted_sample_weight(sample_weight, weights)
        return plain_compute_loss(x, y, y_pred, sample_weight, training=training)

    plain_compile_config = model.get_compile_config

    def get_compile_config():
        # Called by `model.save`, `keras.saving.save_model`, `to_json`: say what they leave out.
        warnings.warn(not_saved_message(settings), UserWarning, stacklevel=3)
        return plain_compile_config()

    model.compute_loss = compute_loss
    model.get_compile_config = get_compile_config
    setattr(model, _ATTRIBUTE, settings)
    model.train_function = None  # a train function traced before would not weight the examples
    return settings


NOT_SAVED = "Multiplicative noise is not saved with the model"


def not_saved_message(settings: MultiplicativeNoise) -> str:
    """The warning a save of a model with multiplicative noise gives: how to continue it."""
    return (
        f"{NOT_SAVED} (it is a patch of this model object, not part of its config or "
        "variables). After loading, call enable_multiplicative_noise(model, "
        f"batch_size={settings.batch_size}, variance={settings.variance!r}, "
        f"seed={settings.seed}) to continue the same weights: they are a function of the seed "
        "and the optimizer's step counter, which is saved."
    )


def active_multiplicative_noise(model) -> MultiplicativeNoise | None:
    """The settings `enable_multiplicative_noise` put in force on `model` (None: none, s^2 = 0)."""
    return getattr(model, _ATTRIBUTE, None)


def _training_weights(model, settings: MultiplicativeNoise, y_pred) -> tf.Tensor:
    """The weights of this replica's examples in a step of Keras' own `fit` (traced once)."""
    step = tf.convert_to_tensor(model.optimizer.iterations)
    micro_batch, micro_batches = 0, 1
    replica_id, num_replicas = replica_in_sync()
    offset = global_offset(  # refuses a batch_size that does not divide into replica shares
        batch_size=settings.batch_size,
        replica_id=replica_id,
        num_replicas=num_replicas,
        micro_batch=micro_batch,
        micro_batches=micro_batches,
    )
    share = replica_share(settings.batch_size, num_replicas, micro_batches)
    static, n = batch_size(y_pred)
    if static is not None and static > share:
        raise ValueError(
            f"A replica's batch has {static} examples, more than batch_size / (accumulation "
            f"steps * replicas) = {settings.batch_size} / ({micro_batches} * {num_replicas}) = "
            f"{share}; batch_size must be the examples of one update (received "
            f"batch_size={settings.batch_size})."
        )
    return settings.weights(n, step, offset)


def disable_multiplicative_noise(model: keras.Model) -> None:
    """Undoes `enable_multiplicative_noise`: the model's own `compute_loss` is used again.

    Traced train functions keep the weights until Keras rebuilds them; this
    resets `model.train_function` so that the next `fit` traces a plain step.
    """
    if getattr(model, _ATTRIBUTE, None) is None:
        raise ValueError("enable_multiplicative_noise was not applied to this model.")
    for patched in ("compute_loss", "get_compile_config"):
        if patched in vars(model):
            delattr(model, patched)
    setattr(model, _ATTRIBUTE, None)
    model.train_function = None
