"""What a run's configuration may hold: the names, each field's range, the rules between fields.

`noisy_keras.run.config` builds and validates `TrainConfig` with these (and
re-exports the names). The names come from the registries of the packages that
own them (`models.registry`, `data.registry`, ...), so a new model, dataset or
noise kind is added in one place. It imports neither TensorFlow nor Keras, nor
`noisy_keras.run.config` (the rules take any object with the config's fields).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# The names live with what they name (each package's registry, importing no TensorFlow).
from noisy_keras._validation import is_finite_number, is_int, is_number
from noisy_keras.data.registry import (
    DATASET_NAMES,
    DATASET_PREFIXES,
    PREPROCESSING_NAMES,
    STREAMING_CHOICES,
)
from noisy_keras.engine.registry import (
    DETERMINISM_CHOICES,
    PRECISION_CHOICES,
    STRATEGY_NAMES,
    XLA_CHOICES,
)
from noisy_keras.models.registry import (
    MODEL_NAMES,
    MODELS_WITH_BATCH_NORM,
    MODELS_WITH_RESIDUAL_BN,
)
from noisy_keras.noise.registry import NOISE_KINDS, SEED_MAX
from noisy_keras.optim.registry import (
    DEFAULT_LARS_EETA,
    DEFAULT_SAM_RHO,
    GRADIENT_METHOD_NAMES,
    LR_SCALING_RULES,
    OPTIMIZER_NAMES,
    PENALTY_GRADIENTS,
)

# ---------------------------------------------------------------------------
# Field checks: one table, used by validate_config and by the absl validators
# ---------------------------------------------------------------------------


def _int_at_least(minimum: int) -> tuple[Callable, str]:
    return (lambda v: is_int(v) and v >= minimum), f"must be >= {minimum}"


def _finite_at_least_zero() -> tuple[Callable, str]:
    return (lambda v: is_finite_number(v) and v >= 0), "must be >= 0"


def _one_of(names: tuple[str, ...]) -> tuple[Callable, str]:
    return (lambda v: v in names), f"must be one of {', '.join(names)}"


def _dataset_ok(value) -> bool:
    if not isinstance(value, str):
        return False
    if value in DATASET_NAMES:
        return True
    return any(value.startswith(p) and len(value) > len(p) for p in DATASET_PREFIXES)


_FIELD_RULES: dict[str, tuple[Callable, str]] = {
    "dataset": (_dataset_ok, "must be one of digits, mnist1d, tfds:NAME or folder:PATH"),
    "model": _one_of(MODEL_NAMES),
    "optimizer": _one_of(OPTIMIZER_NAMES),
    "momentum": (lambda v: is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": _finite_at_least_zero(),
    "batch_size": _int_at_least(1),
    "base_batch_size": _int_at_least(1),
    "base_learning_rate": (lambda v: is_finite_number(v) and v > 0, "must be > 0"),
    "lr_scaling": _one_of(LR_SCALING_RULES),
    "warmup_epochs": _finite_at_least_zero(),
    "lr_decay_factor": (lambda v: is_number(v) and 0 < v <= 1, "must be in (0, 1]"),
    "lr_decay_epochs": (
        lambda v: isinstance(v, tuple) and all(is_int(e) and e >= 1 for e in v),
        "must be a comma-separated list of epochs >= 1",
    ),
    "lr_decay_every": _int_at_least(1),
    "noise_alpha": _finite_at_least_zero(),
    "noise_gamma": _finite_at_least_zero(),
    "epochs": _int_at_least(1),
    "seed": (lambda v: is_int(v) and 0 <= v <= SEED_MAX, "must be in [0, 2**31 - 1]"),
    "strategy": _one_of(STRATEGY_NAMES),
    "num_devices": _int_at_least(0),
    "xla": _one_of(XLA_CHOICES),
    "accumulation_steps": _int_at_least(1),
    "ghost_batch_size": _int_at_least(0),
    "val_fraction": (lambda v: is_number(v) and 0 < v < 1, "must be in (0, 1)"),
    "image_size": _int_at_least(0),
    "augment": (lambda v: isinstance(v, bool), "must be true or false"),
    "deterministic": _one_of(DETERMINISM_CHOICES),
    "data_dir": (lambda v: isinstance(v, str), "must be a path ('' for TFDS' default)"),
    "verbose": (lambda v: is_int(v) and v in (0, 1, 2), "must be 0, 1 or 2"),
    "noise": _one_of(NOISE_KINDS),
    "noise_batch_size": _int_at_least(0),
    # Data at scale and the ImageNet recipe.
    "streaming": _one_of(STREAMING_CHOICES),
    "preprocess": _one_of(PREPROCESSING_NAMES),
    "updates_per_epoch": _int_at_least(0),
    "label_smoothing": (lambda v: is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay_exclude_bn_bias": (lambda v: isinstance(v, bool), "must be true or false"),
    "zero_init_residual": (lambda v: isinstance(v, bool), "must be true or false"),
    "lars_eeta": (lambda v: is_finite_number(v) and v > 0, "must be > 0"),
    "top5_accuracy": (lambda v: isinstance(v, bool), "must be true or false"),
    "noise_log_every": _int_at_least(0),
    # Mixed precision (multi-GPU with XLA)
    "precision": _one_of(PRECISION_CHOICES),
    # The compared methods
    "method": _one_of(GRADIENT_METHOD_NAMES),
    "sam_rho": (lambda v: is_finite_number(v) and v > 0, "must be > 0"),
    "sam_adaptive": (lambda v: isinstance(v, bool), "must be true or false"),
    "penalty_strength": _finite_at_least_zero(),
    "penalty_gradient": _one_of(PENALTY_GRADIENTS),
    "ema_momentum": (lambda v: is_number(v) and 0 <= v < 1, "must be in [0, 1)"),
}


def field_rule(name: str) -> tuple[Callable, str]:
    """`(predicate, "must be ...")` of field `name` (for flag validators)."""
    return _FIELD_RULES[name]


def check_field(name: str, value) -> None:
    """Raises ValueError unless `value` is allowed for field `name`.

    Raises:
        ValueError: "<name> must be ...; received <name>=<value>."
    """
    ok, allowed = _FIELD_RULES[name]
    if not ok(value):
        raise ValueError(f"{name} {allowed}; received {name}={value!r}.")


def validate_noise(config: Any) -> None:
    """The rules that tie --noise to --noise_alpha, --noise_batch_size and the recipe."""
    kind, alpha, small = config.noise, config.noise_alpha, config.noise_batch_size
    if kind != "white" and alpha != 0:
        raise ValueError(
            f"--noise_alpha={alpha!r} sets the white noise's size; with --noise={kind} it must "
            "be 0 (leave it unset). Use --noise=white for the paper's noise."
        )
    if kind in ("none", "white"):
        if small:
            raise ValueError(
                f"--noise_batch_size={small} is for --noise=matched or multiplicative; with "
                f"--noise={kind} it must be 0."
            )
        return
    if not small:
        raise ValueError(
            f"--noise={kind} needs --noise_batch_size=b, the small batch whose gradient noise "
            "it restores (1 <= b <= --batch_size); received --noise_batch_size=0."
        )
    if small > config.batch_size:
        raise ValueError(
            f"--noise_batch_size={small} exceeds --batch_size={config.batch_size}; added noise "
            "can only make a batch noisier: allowed 1 <= b <= --batch_size."
        )
    if config.lr_scaling == "linear" and small != config.batch_size:
        raise ValueError(
            f"--noise={kind} with --lr_scaling=linear adds nothing: the learning rate already "
            f"grows B/b = {config.batch_size}/{small} times, which restores the small batch's "
            "noise temperature (s^2 = (B/b)/m - 1 = 0). Use --lr_scaling=none (the small "
            "batch's learning rate) or sqrt, or --noise=white / none."
        )
    if (
        kind == "matched"
        and config.accumulation_steps == 1
        and config.model in MODELS_WITH_BATCH_NORM
    ):
        raise ValueError(
            f"--noise=matched with --model={config.model} (BatchNormalization) needs "
            "--accumulation_steps >= 2: without accumulation tr(Sigma) is estimated from two "
            "halves of each replica's batch, which BatchNormalization would normalize apart."
        )


def check_scale_fields(config: Any) -> None:
    """Rules between the fields of streaming input and the ImageNet recipe (no silent no-ops)."""
    is_image_files = config.dataset.startswith(DATASET_PREFIXES)
    if config.streaming == "true" and not is_image_files:
        raise ValueError(
            f"streaming=true reads image files; dataset={config.dataset!r} is held in memory. "
            "Allowed with streaming=true: tfds:NAME and folder:PATH."
        )
    if config.preprocess == "resnet":
        if not is_image_files or config.streaming == "false":
            raise ValueError(
                f"preprocess='resnet' crops each decoded image and needs a streamed tfds:NAME or "
                f"folder:PATH dataset; received dataset={config.dataset!r}, "
                f"streaming={config.streaming!r}."
            )
        if config.augment:
            raise ValueError(
                "augment=true adds the translation of preprocess='resize'; preprocess='resnet' "
                "has its own random-resized crop and flip. Use augment=false."
            )
    if config.weight_decay_exclude_bn_bias and not (
        config.weight_decay > 0 or config.optimizer == "lars"
    ):
        raise ValueError(
            "weight_decay_exclude_bn_bias=true has no effect with weight_decay=0 (it also "
            f"excludes them from LARS' adaptation); received weight_decay={config.weight_decay!r}, "
            f"optimizer={config.optimizer!r}."
        )
    if config.lars_eeta != DEFAULT_LARS_EETA and config.optimizer != "lars":
        raise ValueError(
            f"lars_eeta={config.lars_eeta!r} is used by optimizer='lars' only; received "
            f"optimizer={config.optimizer!r}."
        )
    if config.zero_init_residual and config.model not in MODELS_WITH_RESIDUAL_BN:
        raise ValueError(
            f"zero_init_residual=true needs a model with residual blocks ending in "
            f"BatchNormalization ({', '.join(MODELS_WITH_RESIDUAL_BN)}); received "
            f"model={config.model!r}."
        )


def validate_method(config: Any) -> None:
    """The rules that tie --method to its settings: each setting only with its method."""
    method = config.method
    settings = {  # (field, default, the method that uses it)
        "sam_rho": (DEFAULT_SAM_RHO, "sam"),
        "sam_adaptive": (False, "sam"),
        "penalty_strength": (0.0, "gradient_norm_penalty"),
        "penalty_gradient": ("finite_difference", "gradient_norm_penalty"),
    }
    for name, (default, owner) in settings.items():
        value = getattr(config, name)
        if method != owner and value != default:
            text = str(value).lower() if isinstance(value, bool) else repr(value)  # as a flag
            raise ValueError(
                f"--{name}={text} is used by --method={owner} only; received "
                f"--method={method}. Set --method={owner}, or leave --{name} unset."
            )
    if method == "gradient_norm_penalty" and config.penalty_strength == 0:
        raise ValueError(
            "--method=gradient_norm_penalty needs --penalty_strength=lambda > 0 (0 adds no "
            "penalty); received --penalty_strength=0.0."
        )
