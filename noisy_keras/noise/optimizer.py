"""NoisyOptimizer: wraps any Keras 3 optimizer and adds annealed Gaussian noise to its gradients.

The wrapper owns the noise and the gradient clipping: it clips the data
gradient of the global batch (taking clipnorm / global_clipnorm / clipvalue over
from the optimizer it wraps), adds n_t ~ N(0, sigma_t^2 I), sigma_t^2 = alpha /
(1 + t)^gamma, and hands the result to the inner optimizer, which then decays,
all-reduces and updates exactly as it would without the wrapper.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.1).
"""

from __future__ import annotations

import secrets

import keras
import tensorflow as tf

from noisy_keras import _keras_internals as internals
from noisy_keras._structures import dense, replica_in_sync
from noisy_keras.noise import draw, schedules

CLIPPING_ARGUMENTS = ("clipnorm", "global_clipnorm", "clipvalue")
"""The inner optimizer's clipping settings, which the wrapper takes over."""

# Base-optimizer keyword arguments the wrapper refuses, with their defaults
# (a serialized config may carry the defaults; anything else is an error).
_INNER_ONLY_ARGUMENTS = {
    "learning_rate": None,
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": 0.99,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


def _replicas_summing_gradients() -> int:
    """How many replicas' gradients the inner optimizer will SUM after this call.

    Under a `tf.distribute` strategy, Keras' TensorFlow optimizer all-reduces the
    gradients with SUM inside `apply`, when called in a replica context. In a
    cross-replica context (or with no strategy) nothing is summed.
    """
    return replica_in_sync()[1]


@keras.saving.register_keras_serializable(package="noisy_keras")
class NoisyOptimizer(keras.optimizers.Optimizer):
    """Adds annealed Gaussian noise to the gradients of a wrapped Keras optimizer.

    At parameter update t (t = 0 for the first) every gradient coordinate gets
    independent noise n_t ~ N(0, sigma_t^2), sigma_t^2 = alpha / (1 + t)^gamma,
    before the inner optimizer sees it (Jaiswal & Taura, Section 3.1; alpha=1e-5,
    gamma=0.55 in their experiments). Combine it with linear learning-rate
    scaling (`noisy_keras.optim.lr.scale_learning_rate`) for the paper's method.

    Semantics:
        * t is `optimizer.iterations`: parameter updates applied. Gradient
          accumulation belongs to the engine (`noisy_keras.engine.steps`,
          `noisy_keras.engine.fit.fit(accumulation_steps=k)`), which calls the
          wrapper once per update, so noise enters once per update. An inner
          optimizer with Keras' own `gradient_accumulation_steps` is refused:
          the wrapper would add noise to every micro-batch, and Keras feeds its
          learning-rate schedule the micro-batch count.
        * The noise is a function of (seed, t) only (stateless Philox), so a run
          is reproducible and a restored checkpoint continues the same sequence.
        * Under a `tf.distribute` strategy with R replicas every replica adds the
          same noise divided by R; the inner optimizer's SUM all-reduce then adds
          exactly one n_t, whatever R is.
        * `tf.IndexedSlices` gradients (e.g. from `Embedding`) are made dense:
          white noise touches every coordinate, rows outside the batch included.
        * Clipping belongs to the wrapper. It takes `clipnorm`,
          `global_clipnorm` or `clipvalue` over from the wrapped optimizer
          (setting them to None there, and keeping them in its own config), and
          applies Keras' rule to the data gradient of the global batch: under R
          replicas it SUM-all-reduces the replicas' gradients first (one extra
          all-reduce per update, only when clipping is set), clips, and hands
          clip(g) / R back, which the inner optimizer's all-reduce sums to
          clip(g). So 1 and R replicas give the same update (exactly when R is a
          power of two; otherwise up to float rounding of / R). The noise is
          added after clipping and is never clipped. Clipping with a
          `loss_scale_factor` on the wrapped optimizer is refused (it would clip
          scaled gradients).
        * Noise is added before the inner optimizer's weight decay and momentum;
          if the inner optimizer has `loss_scale_factor` the noise is scaled
          with it so that it is the right size after unscaling. Under
          `mixed_float16`, `compile` wraps this optimizer in a
          `LossScaleOptimizer`, which unscales before calling it.
        * alpha = 0 adds nothing: updates are bit-identical to the inner optimizer.

    Args:
        optimizer: the `keras.optimizers.Optimizer` instance to wrap (SGD, Adam,
            AdamW, RMSprop, Lion, ...). Set learning rate, clipping and weight
            decay on it, not on the wrapper (the wrapper takes the clipping
            over, see above); gradient accumulation on the engine.
        alpha: noise variance at t = 0 (0 turns noise off).
        gamma: decay exponent of the variance.
        seed: integer in [0, 2**31 - 1]; None draws one at construction, which
            is stored in the config so the run can be reproduced.
        name: optimizer name.

    Example:
        >>> inner = keras.optimizers.SGD(learning_rate=0.04, momentum=0.9)
        >>> optimizer = NoisyOptimizer(inner, alpha=1e-5, gamma=0.55, seed=1)
        >>> model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")

    References:
        S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
        Mini-Batch Training of Deep Neural Networks".
    """

    # The constructor's arguments, as the error for an unexpected one lists them
    # (a subclass with other arguments overrides this).
    _ARGUMENT_NAMES = ("optimizer", "alpha", "gamma", "seed", "name")

    def __init__(
        self,
        optimizer,
        alpha=schedules.PAPER_ALPHA,
        gamma=schedules.PAPER_GAMMA,
        seed=None,
        name=None,
        **kwargs,
    ):
        for arg_name, default in _INNER_ONLY_ARGUMENTS.items():
            if arg_name in kwargs:
                value = kwargs.pop(arg_name)
                if value != default:
                    raise ValueError(
                        f"{type(self).__name__} does not take `{arg_name}` (received "
                        f"{arg_name}={value!r}); set `{arg_name}` on the wrapped "
                        f"optimizer instead, e.g. {type(self).__name__}(keras.optimizers.SGD("
                        f"{arg_name}=...))."
                    )
        if kwargs:
            raise ValueError(
                f"{type(self).__name__} got unexpected argument(s) {sorted(kwargs)}; allowed: "
                f"{', '.join(self._ARGUMENT_NAMES)}."
            )
        _check_inner_optimizer(optimizer)
        schedules.validate_noise_parameters(alpha, gamma, seed)
        clipping = {arg: getattr(optimizer, arg) for arg in CLIPPING_ARGUMENTS}
        _check_clipping(optimizer, clipping)
        super().__init__(learning_rate=0.0, name=name, **clipping)
        self.inner_optimizer = optimizer
        # Clipping is the wrapper's: the inner optimizer would clip each replica's
        # share of the gradient before its all-reduce, and the noise with it.
        for arg in CLIPPING_ARGUMENTS:
            setattr(optimizer, arg, None)
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.seed = int(seed) if seed is not None else secrets.randbelow(schedules.SEED_MAX + 1)

    # ---- Delegation to the inner optimizer ------------------------------------

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    @property
    def iterations(self):
        """Parameter updates applied so far: the inner optimizer's counter."""
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @property
    def clipping(self) -> dict:
        """The clipping settings the wrapper took over, e.g. {"clipnorm": 1.0} ({} if none)."""
        return {arg: getattr(self, arg) for arg in CLIPPING_ARGUMENTS if getattr(self, arg)}

    @property
    def noise_stddev(self):
        """sigma_t for the next update t = `iterations`, as a float32 tensor (for logging)."""
        return self._noise_stddev_at(tf.convert_to_tensor(self.iterations))

    # ---- The noise size (subclasses with another rule override these two) ------

    @property
    def adds_noise(self) -> bool:
        """Whether any noise is added (False: updates are bit-identical to the inner optimizer)."""
        return self.alpha > 0

    def _noise_stddev_at(self, step):
        """sigma_t at update `step` (a scalar integer tensor), as a float32 tensor."""
        return schedules.noise_stddev(step, self.alpha, self.gamma)

    # ---- The update ------------------------------------------------------------

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self.iterations

    def apply(self, grads, trainable_variables=None):
        """Adds the noise of update t to `grads`, then applies them with the inner optimizer."""
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "NoisyOptimizer.apply got no `trainable_variables` and is not built; "
                    "pass the variables or call `optimizer.build(variables)` first."
                )
            trainable_variables = self._trainable_variables
        else:
            trainable_variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(trainable_variables)
                self.built = True
        if len(grads) != len(trainable_variables):
            raise ValueError(
                f"Got {len(grads)} gradients for {len(trainable_variables)} variables; "
                "they must correspond one to one."
            )
        if self.clipping:
            grads = self._clip_global_batch(grads, trainable_variables)
        if self.adds_noise:
            grads = self._add_noise(grads, trainable_variables)
        self.inner_optimizer.apply(grads, trainable_variables)

    def _clip_global_batch(self, grads, trainable_variables):
        """clip(g) / R on each of R replicas, g the global batch's gradient (see the class)."""
        targets = [
            i
            for i, (g, v) in enumerate(zip(grads, trainable_variables))
            if g is not None and not getattr(v, "overwrite_with_gradient", False)
        ]
        if not targets:
            return grads
        parts = [dense(grads[i]) for i in targets]
        replicas = _replicas_summing_gradients()
        if replicas > 1:
            context = tf.distribute.get_replica_context()
            parts = context.all_reduce(tf.distribute.ReduceOp.SUM, parts)
        parts = internals.clip_gradients(self, parts)
        if replicas > 1:
            parts = [p / tf.cast(replicas, p.dtype) for p in parts]
        clipped = list(grads)
        for i, p in zip(targets, parts, strict=True):
            clipped[i] = p
        return clipped

    def _add_noise(self, grads, trainable_variables):
        inner = self.inner_optimizer
        step = tf.convert_to_tensor(inner.iterations)
        scale = self._noise_stddev_at(step)
        if inner.loss_scale_factor is not None:
            scale = scale * float(inner.loss_scale_factor)
        replicas = _replicas_summing_gradients()
        if replicas > 1:
            scale = scale / float(replicas)

        targets = [
            i
            for i, (g, v) in enumerate(zip(grads, trainable_variables))
            if g is not None and not getattr(v, "overwrite_with_gradient", False)
        ]
        shapes = [trainable_variables[i].shape for i in targets]
        # One multiply by sigma_t over the whole draw, then one add per variable.
        noise = draw.unit_noise(shapes, self.seed, step, scale=scale)
        noisy = list(grads)
        for i, n in zip(targets, noise):
            g = dense(grads[i])
            noisy[i] = g + tf.cast(n, g.dtype)
        return noisy

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError(
            "NoisyOptimizer supports the TensorFlow backend's stateful `apply` only."
        )

    # ---- Serialization -----------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "alpha": self.alpha,
            "gamma": self.gamma,
            "seed": self.seed,
            **self.clipping,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Rebuilds the wrapper; clipping settings go back on the inner optimizer, then are taken
        over again, as when the wrapper was first built."""
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects
        )
        for arg in CLIPPING_ARGUMENTS:
            value = config.pop(arg, None)
            if value is not None:
                setattr(inner, arg, value)
        return cls(inner, **config)


def _check_clipping(optimizer, clipping: dict) -> None:
    """Raises ValueError for clipping the wrapper cannot take over correctly."""
    chosen = {arg: value for arg, value in clipping.items() if value is not None}
    if chosen and getattr(optimizer, "loss_scale_factor", None) is not None:
        arg, value = next(iter(chosen.items()))
        raise ValueError(
            f"`optimizer` has {arg}={value!r} and loss_scale_factor="
            f"{optimizer.loss_scale_factor!r}; NoisyOptimizer clips the global-batch gradient "
            "before the wrapped optimizer unscales it, so it would clip scaled gradients. "
            f"Allowed: {arg} without loss_scale_factor (for mixed precision use the "
            "'mixed_float16' dtype policy, whose LossScaleOptimizer unscales before "
            "NoisyOptimizer), or loss_scale_factor without clipping."
        )


def _check_inner_optimizer(optimizer) -> None:
    """Raises ValueError unless `optimizer` is a Keras 3 optimizer the wrapper can take."""
    if isinstance(optimizer, NoisyOptimizer):
        raise ValueError(
            "`optimizer` is already a NoisyOptimizer; wrapping it again would add noise "
            "twice. Pass its inner optimizer instead."
        )
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError(
            "`optimizer` is a LossScaleOptimizer; its scaled gradients would carry the "
            "noise. Wrap the other way round: LossScaleOptimizer(NoisyOptimizer(...)), "
            "which `model.compile` does by itself under the 'mixed_float16' policy."
        )
    if isinstance(optimizer, keras.optimizers.Optimizer) and optimizer.gradient_accumulation_steps:
        k = optimizer.gradient_accumulation_steps
        raise ValueError(
            f"`optimizer` has gradient_accumulation_steps={k}; NoisyOptimizer would add noise to "
            "every micro-batch, and Keras feeds the learning-rate schedule the micro-batch "
            "count. Remove it and let the engine accumulate: "
            f"noisy_keras.engine.fit.fit(..., accumulation_steps={k}) or "
            f"noisy_keras.engine.steps.enable_replica_xla(model, accumulation_steps={k})."
        )
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        hint = ""
        if isinstance(optimizer, str):
            hint = f" Use e.g. NoisyOptimizer(keras.optimizers.get({optimizer!r}))."
        raise ValueError(
            "`optimizer` must be a Keras 3 optimizer instance (keras.optimizers.Optimizer, "
            f"e.g. keras.optimizers.SGD(...)); received {optimizer!r} of type "
            f"{type(optimizer).__name__}.{hint}"
        )


# ---- Reaching the wrapper through other wrappers ---------------------------------


def find_noisy_optimizer(optimizer) -> NoisyOptimizer | None:
    """The `NoisyOptimizer` in `optimizer`, following `inner_optimizer` through wrappers.

    Under the 'mixed_float16' policy `model.compile` wraps the optimizer in Keras'
    `LossScaleOptimizer`, so `model.optimizer` is not the `NoisyOptimizer` itself;
    this follows the chain of `inner_optimizer` attributes to it.

    Args:
        optimizer: a Keras optimizer, e.g. `model.optimizer`.

    Returns:
        The first `NoisyOptimizer` in the chain, or None when there is none.

    Raises:
        ValueError: `optimizer` is not a Keras optimizer.
    """
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise ValueError(
            "optimizer must be a Keras optimizer (e.g. model.optimizer); received "
            f"{type(optimizer).__name__}."
        )
    return find_wrapper(optimizer, NoisyOptimizer)


def optimizer_chain(optimizer):
    """`optimizer`, then each `inner_optimizer` below it (LossScaleOptimizer, NoisyOptimizer, ...).

    The one walk of a wrapped optimizer: Keras' and this package's wrappers all
    name the optimizer they wrap `inner_optimizer`.
    """
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def find_wrapper(optimizer, kind: type):
    """The first optimizer of class `kind` (or a subclass) in `optimizer`'s chain, or None."""
    return next((o for o in optimizer_chain(optimizer) if isinstance(o, kind)), None)


def current_noise_stddev(optimizer) -> float:
    """sigma_t of the next update, however the `NoisyOptimizer` is wrapped.

    sigma_t = sqrt(alpha / (1 + t)^gamma) at t = `iterations` (Jaiswal & Taura,
    Section 3.1), or the rule of a `NoisyOptimizer` subclass; the wrapper is
    found with `find_noisy_optimizer` (so `model.optimizer` works under
    'mixed_float16', where it is a `LossScaleOptimizer`).

    Args:
        optimizer: a Keras optimizer, e.g. `model.optimizer`.

    Returns:
        sigma_t as a Python float; 0.0 when the chain holds no `NoisyOptimizer`
        (no noise is added).

    Raises:
        ValueError: `optimizer` is not a Keras optimizer.

    Example:
        >>> keras.config.set_dtype_policy("mixed_float16")
        >>> model.compile(optimizer=NoisyOptimizer(keras.optimizers.SGD(0.1)), loss=...)
        >>> current_noise_stddev(model.optimizer)   # model.optimizer is a LossScaleOptimizer
        0.0031622776
    """
    noisy = find_noisy_optimizer(optimizer)
    return 0.0 if noisy is None else float(noisy.noise_stddev)


def optimizer_accumulation_steps(optimizer) -> int | None:
    """Keras' `gradient_accumulation_steps` set anywhere in an optimizer chain (None: none).

    Follows `inner_optimizer` through wrappers (LossScaleOptimizer, NoisyOptimizer).
    """
    for link in optimizer_chain(optimizer):
        k = getattr(link, "gradient_accumulation_steps", None)
        if k:
            return int(k)
    return None
