"""The noise wrappers: any Keras 3 optimizer, with Gaussian noise added to its gradients.

`GradientNoiseWrapper` is what every kind shares, in the shape of Keras'
`LossScaleOptimizer`: it wraps an inner optimizer, delegates learning rate,
iterations, variables and loss scaling to it, clips the global batch's data
gradient (`noisy_keras.noise.clipping`), adds n_t ~ sigma_t N(0, I) drawn as a
function of (seed, t) (`noisy_keras.noise.draw`), and hands the result to the
inner optimizer, which then decays, all-reduces and updates exactly as it would
without the wrapper. A kind says only how large sigma_t is:

* `NoisyOptimizer`: sigma_t^2 = alpha / (1 + t)^gamma (Jaiswal & Taura, Section 3.1);
* `noisy_keras.noise.matched.MatchedNoiseOptimizer`: sigma_t^2 from the measured
  tr(Sigma) and the temperature the large batch lacks.

Reaching a wrapper inside others (`LossScaleOptimizer` around it, ...) is
`noisy_keras.noise.chain`.

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Section 3.1).
"""

from __future__ import annotations

import secrets

import keras
import tensorflow as tf

from noisy_keras._structures import dense, replica_in_sync
from noisy_keras.noise import clipping as clipping_lib
from noisy_keras.noise import draw, schedules
from noisy_keras.noise.clipping import CLIPPING_ARGUMENTS

__all__ = ["CLIPPING_ARGUMENTS", "GradientNoiseWrapper", "NoisyOptimizer"]

# Base-optimizer keyword arguments the wrappers refuse, with their defaults
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


class GradientNoiseWrapper(keras.optimizers.Optimizer):
    """Wraps a Keras optimizer and adds sigma_t N(0, I) to every gradient before it.

    The part every noise kind shares (see the module doc and `NoisyOptimizer`
    for the semantics: updates counted by the inner optimizer's `iterations`,
    noise a function of (seed, t), divided by R on each of R replicas, dense
    for `IndexedSlices`, scaled with the inner optimizer's `loss_scale_factor`,
    clipping taken over). A kind implements `adds_noise`, `_noise_stddev_at`,
    and `_kind_config` (its constructor's arguments besides optimizer, seed and
    name), and lists its constructor's arguments in `_ARGUMENT_NAMES`.

    Args:
        optimizer: the `keras.optimizers.Optimizer` instance to wrap.
        seed: integer in [0, 2**31 - 1]; None draws one at construction, which
            is stored in the config so the run can be reproduced.
        name: optimizer name.
    """

    _ARGUMENT_NAMES = ("optimizer", "seed", "name")

    def __init__(self, optimizer, *, seed=None, name=None, **kwargs):
        kind = type(self).__name__
        for arg_name, default in _INNER_ONLY_ARGUMENTS.items():
            if arg_name in kwargs:
                value = kwargs.pop(arg_name)
                if value != default:
                    raise ValueError(
                        f"{kind} does not take `{arg_name}` (received {arg_name}={value!r}); "
                        f"set `{arg_name}` on the wrapped optimizer instead, e.g. "
                        f"{kind}(keras.optimizers.SGD({arg_name}=...))."
                    )
        if kwargs:
            raise ValueError(
                f"{kind} got unexpected argument(s) {sorted(kwargs)}; allowed: "
                f"{', '.join(self._ARGUMENT_NAMES)}."
            )
        _check_inner_optimizer(optimizer)
        schedules.validate_noise_parameters(0.0, 0.0, seed)
        clipping = clipping_lib.clipping_settings(optimizer, kind)
        super().__init__(learning_rate=0.0, name=name, **clipping)
        self.inner_optimizer = optimizer
        clipping_lib.disable_clipping(optimizer)
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
        return self.noise_stddev_at(self.iterations)

    def noise_stddev_at(self, step):
        """sigma_t at update `step` (0 for the first), as a float32 tensor; 0 without noise.

        For kinds whose size follows a measurement (`MatchedNoiseOptimizer`), the
        size the current measurement gives, whatever `step` is.
        """
        if not self.adds_noise:
            return tf.zeros([], tf.float32)
        return self._noise_stddev_at(tf.convert_to_tensor(step))

    # ---- The noise size: each kind's ----------------------------------------------

    @property
    def adds_noise(self) -> bool:
        """Whether any noise is added (False: updates are bit-identical to the inner optimizer)."""
        raise NotImplementedError

    def _noise_stddev_at(self, step):
        """sigma_t at update `step` (a scalar integer tensor), as a float32 tensor."""
        raise NotImplementedError

    def _kind_config(self) -> dict:
        """The kind's own constructor arguments, for `get_config`."""
        raise NotImplementedError

    # ---- The update ------------------------------------------------------------

    def apply_gradients(self, grads_and_vars):
        grads, trainable_variables = zip(*grads_and_vars)
        self.apply(grads, trainable_variables)
        return self.iterations

    def apply(self, grads, trainable_variables=None):
        """Clips, adds the noise of update t, then applies `grads` with the inner optimizer."""
        grads = list(grads)
        if not grads:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    f"{type(self).__name__}.apply got no `trainable_variables` and is not "
                    "built; pass the variables or call `optimizer.build(variables)` first."
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
            grads = clipping_lib.clip_global_batch(self, grads, trainable_variables)
        if self.adds_noise:
            grads = self._add_noise(grads, trainable_variables)
        self.inner_optimizer.apply(grads, trainable_variables)

    def _add_noise(self, grads, trainable_variables):
        inner = self.inner_optimizer
        step = tf.convert_to_tensor(inner.iterations)
        scale = self._noise_stddev_at(step)
        if inner.loss_scale_factor is not None:
            scale = scale * float(inner.loss_scale_factor)
        # Each of R replicas adds n_t / R; the inner optimizer's SUM all-reduce adds one n_t.
        replicas = replica_in_sync()[1]
        if replicas > 1:
            scale = scale / float(replicas)
        targets = clipping_lib.noise_targets(grads, trainable_variables)
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
            f"{type(self).__name__} supports the TensorFlow backend's stateful `apply` only."
        )

    # ---- Serialization -----------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            **self._kind_config(),
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


@keras.saving.register_keras_serializable(package="noisy_keras")
class NoisyOptimizer(GradientNoiseWrapper):
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
          applies Keras' rule to the data gradient of the global batch, so 1
          and R replicas give the same update; the noise is added after
          clipping and is never clipped (`noisy_keras.noise.clipping` says why
          it lives here). Clipping with a `loss_scale_factor` on the wrapped
          optimizer is refused (it would clip scaled gradients).
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
        schedules.validate_noise_parameters(alpha, gamma)  # the seed: the wrapper checks it
        super().__init__(optimizer, seed=seed, name=name, **kwargs)
        self.alpha = float(alpha)
        self.gamma = float(gamma)

    @property
    def adds_noise(self) -> bool:
        return self.alpha > 0

    def _noise_stddev_at(self, step):
        return schedules.noise_stddev(step, self.alpha, self.gamma)

    def _kind_config(self) -> dict:
        return {"alpha": self.alpha, "gamma": self.gamma}


def _check_inner_optimizer(optimizer) -> None:
    """Raises ValueError unless `optimizer` is a Keras 3 optimizer the wrapper can take."""
    if isinstance(optimizer, GradientNoiseWrapper):
        raise ValueError(
            f"`optimizer` is already a {type(optimizer).__name__}; wrapping it again would add "
            "noise twice. Pass its inner optimizer instead."
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
