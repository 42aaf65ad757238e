"""The run configuration: one frozen dataclass, its flagfile form, and every check.

A run of the main job is described by one `TrainConfig`. The command line
(`noisy_keras.train`), the experiment runner and notebooks all build it here and
all go through the same checks, `validate_config`: each field's range
(`check_field`, which the absl flag validators call too) and the rules that tie
fields together. This module imports neither TensorFlow nor Keras, so the
command line can print its help and refuse bad input before loading them.

Noise kinds (`--noise`): `white` is the default, so a flagfile written before
the other kinds existed, which sets only `--noise_alpha` (0 meaning no noise),
means what it meant. `--noise_alpha` belongs to white noise: left unset with
another kind it is 0 (`default_noise_alpha`), and set to anything else it is
refused.

Flagfiles are absl flagfiles: one `--name=value` per line, `#` comments.
`TrainConfig.to_flagfile()` writes every field; `read_flagfile` and
`config_from_strings` read them back.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Callable, Mapping

OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb", "rmsprop", "lion")
STRATEGY_NAMES = ("default", "mirrored", "multiworker")
XLA_CHOICES = ("auto", "true", "false")
DETERMINISM_CHOICES = ("auto", "true", "false")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")
LR_SCALING_RULES = ("linear", "sqrt", "none")
MODEL_NAMES = ("mlp", "cnn", "cnn1d", "cnn1d_bn", "resnet20", "resnet50")
DATASET_NAMES = ("digits", "mnist1d")
DATASET_PREFIXES = ("tfds:", "folder:")
SEED_MAX = 2**31 - 1
NOISE_KINDS = ("none", "white", "matched", "multiplicative")
# Models with BatchNormalization (noisy_keras.models.MODELS_WITH_BATCH_NORM; a test keeps
# the two equal): matched noise without accumulation would split their batches in halves.
MODELS_WITH_BATCH_NORM = ("cnn1d_bn", "resnet20", "resnet50")
# Data at scale and the ImageNet recipe.
OPTIMIZER_NAMES = (*OPTIMIZER_NAMES, "lars")  # LARS (You et al. 2017) for batches of 8k-32k
STREAMING_CHOICES = ("auto", "true", "false")
PREPROCESSING_NAMES = ("resize", "resnet")
MODELS_WITH_RESIDUAL_BN = ("resnet20", "resnet50")
DEFAULT_LARS_EETA = 0.001

# Fields that may differ when a run is resumed in its work directory: they do not
# change what is trained (more epochs continue the same run; where the data lives
# and how much is printed are not part of the experiment).
RESUMABLE_FIELDS = ("epochs", "verbose", "data_dir")

__all__ = [
    "DATASET_NAMES",
    "DATASET_PREFIXES",
    "DETERMINISM_CHOICES",
    "LR_SCALING_RULES",
    "MODEL_NAMES",
    "NOISE_KINDS",
    "OPTIMIZER_NAMES",
    "PREPROCESSING_NAMES",
    "PRECISION_CHOICES",
    "RESUMABLE_FIELDS",
    "STRATEGY_NAMES",
    "STREAMING_CHOICES",
    "XLA_CHOICES",
    "TrainConfig",
    "check_field",
    "config_from_strings",
    "default_noise_alpha",
    "read_flagfile",
    "validate_config",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to WORKDIR/flags.txt.

    `FIELD_HELP` says what each field means; `check_field` what it allows.
    """

    dataset: str = "digits"
    model: str = "cnn"
    optimizer: str = "momentum"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    base_batch_size: int = 32
    base_learning_rate: float = 0.005
    lr_scaling: str = "linear"
    warmup_epochs: float = 0.0
    lr_decay_factor: float = 0.9
    lr_decay_epochs: tuple[int, ...] = (25, 40)
    lr_decay_every: int = 10
    noise_alpha: float = 1e-5
    noise_gamma: float = 0.55
    epochs: int = 40
    seed: int = 0
    strategy: str = "default"
    num_devices: int = 0
    xla: str = "auto"
    accumulation_steps: int = 1
    ghost_batch_size: int = 0
    val_fraction: float = 0.25
    image_size: int = 0
    augment: bool = False
    deterministic: str = "auto"
    data_dir: str = ""
    verbose: int = 1
    # ---- Noise kinds (added after the fields above; flags.txt files without them
    # meant noise="white", noise_batch_size=0, the defaults). ----
    noise: str = "white"
    noise_batch_size: int = 0
    # Data at scale and the ImageNet recipe: streaming input, ResNet preprocessing, LARS,
    # label smoothing, no weight decay on BatchNormalization and biases, zero-init residuals.
    streaming: str = "auto"
    preprocess: str = "resize"
    updates_per_epoch: int = 0
    label_smoothing: float = 0.0
    weight_decay_exclude_bn_bias: bool = False
    zero_init_residual: bool = False
    lars_eeta: float = DEFAULT_LARS_EETA
    top5_accuracy: bool = False
    # Mixed precision (multi-GPU with XLA)
    precision: str = "float32"

    def flag_strings(self) -> dict:
        """The config as `{flag name: value as written in a flagfile}`, one per field."""
        return {f.name: _to_string(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_flagfile(self) -> str:
        """The config as absl flag lines, one per field."""
        return "".join(f"--{name}={value}\n" for name, value in self.flag_strings().items())

    def default_workdir(self) -> str:
        """`runs/<dataset>-<model>-b<batch>-<noise>-s<seed>`, <noise> as in `noise_name`."""
        return os.path.join(
            "runs",
            f"{self.dataset.replace(':', '_').replace('/', '_')}-{self.model}"
            f"-b{self.batch_size}-{self.noise_name()}-s{self.seed}",
        )

    def noise_name(self) -> str:
        """The noise in names: `a<alpha>` (white), `none`, `<kind>-n<b>` (the other kinds)."""
        if self.noise == "white":
            return f"a{self.noise_alpha:g}"
        if self.noise == "none":
            return "none"
        return f"{self.noise}-n{self.noise_batch_size}"

    def replace(self, **changes) -> TrainConfig:
        """A validated copy with `changes` applied (typed values, not strings)."""
        return validate_config(dataclasses.replace(self, **changes))


FIELD_HELP = {
    "dataset": "digits, mnist1d, tfds:NAME or folder:PATH.",
    "model": "mlp, cnn, cnn1d, resnet20 or resnet50.",
    "optimizer": "Inner optimizer.",
    "momentum": "Momentum of momentum/nesterov/rmsprop.",
    "weight_decay": "Keras' decoupled weight decay (0 = off).",
    "batch_size": "Global batch size per parameter update.",
    "base_batch_size": "Batch size the base learning rate was tuned at.",
    "base_learning_rate": "Learning rate at the base batch size.",
    "lr_scaling": "Scaling rule of the learning rate with the batch size.",
    "warmup_epochs": "Gradual warm-up length in epochs (Goyal et al.).",
    "lr_decay_factor": "Learning-rate multiplier at each decay epoch.",
    "lr_decay_epochs": "Epochs at which the learning rate decays.",
    "lr_decay_every": "Decay period in epochs after the last listed one.",
    "noise_alpha": "White noise variance at t=0 (0 = no noise; --noise=white only).",
    "noise_gamma": "Decay exponent of the white noise variance.",
    "epochs": "Total epochs.",
    "seed": "Seed of split, order, initialisation and noise.",
    "strategy": "tf.distribute strategy.",
    "num_devices": "Devices for mirrored (0 = all).",
    "xla": "XLA per replica (auto: on for GPUs).",
    "accumulation_steps": "Micro-batches per parameter update.",
    "ghost_batch_size": "Ghost BatchNormalization size (0 = plain BatchNormalization).",
    "val_fraction": "Validation fraction (paper: 3:1).",
    "image_size": "Image side for tfds/folder datasets (0 = default).",
    "augment": "Light image augmentation (random crop, flip).",
    "deterministic": "TensorFlow op determinism (auto: on unless XLA is on).",
    "data_dir": "TFDS data directory ('' = TFDS default).",
    "verbose": "0 silent, 1 progress bar, 2 one line per epoch.",
    "noise": (
        "Gradient noise kind. white: the paper's N(0, alpha/(1+t)^gamma I) (--noise_alpha, "
        "--noise_gamma; --noise_alpha=0 is none); none; matched: white noise of trace "
        "s^2 tr(Sigma)/B with tr(Sigma) measured in training; multiplicative: per-example "
        "loss weights w ~ N(1, s^2) (Wu et al.). For matched and multiplicative, "
        "s^2 = (B/b)/m - 1 with b = --noise_batch_size and m the learning-rate multiplier of "
        "--lr_scaling from b to B: none (m=1) s^2 = B/b - 1; sqrt s^2 = sqrt(B/b) - 1; linear "
        "s^2 = 0, nothing to add (refused unless B = b)."
    ),
    "noise_batch_size": (
        "b, the small batch whose noise temperature matched/multiplicative noise restores "
        "(1 <= b <= --batch_size; 0 for none/white)."
    ),
    # Data at scale and the ImageNet recipe.
    "streaming": "Read tfds/folder images from disk every epoch (auto: when over 2 GiB decoded).",
    "preprocess": "Image preprocessing: resize (whole image) or resnet (random-resized crop).",
    "updates_per_epoch": "Parameter updates per epoch (0 = every full batch; fewer: smoke runs).",
    "label_smoothing": "Label smoothing epsilon of the cross-entropy (0 = off).",
    "weight_decay_exclude_bn_bias": "No weight decay (nor LARS adaptation) on BN and biases.",
    "zero_init_residual": "Zero-initialise the last BatchNormalization gamma of each block.",
    "lars_eeta": "LARS trust coefficient eta (optimizer=lars only).",
    "top5_accuracy": "Also report top-5 accuracy.",
    # Mixed precision (multi-GPU with XLA)
    "precision": "Keras dtype policy of the run (mixed: float16/bfloat16 compute, float32 logits).",
}


def _to_string(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


# ---------------------------------------------------------------------------
# Field checks: one table, used by validate_config and by the absl validators
# ---------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_at_least(minimum: int) -> tuple[Callable, str]:
    return (lambda v: _is_int(v) and v >= minimum), f"must be >= {minimum}"


def _finite_at_least_zero() -> tuple[Callable, str]:
    return (lambda v: _is_real(v) and math.isfinite(v) and v >= 0), "must be >= 0"


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
    "momentum": (lambda v: _is_real(v) and 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": _finite_at_least_zero(),
    "batch_size": _int_at_least(1),
    "base_batch_size": _int_at_least(1),
    "base_learning_rate": (lambda v: _is_real(v) and math.isfinite(v) and v > 0, "must be > 0"),
    "lr_scaling": _one_of(LR_SCALING_RULES),
    "warmup_epochs": _finite_at_least_zero(),
    "lr_decay_factor": (lambda v: _is_real(v) and 0 < v <= 1, "must be in (0, 1]"),
    "lr_decay_epochs": (
        lambda v: isinstance(v, tuple) and all(_is_int(e) and e >= 1 for e in v),
        "must be a comma-separated list of epochs >= 1",
    ),
    "lr_decay_every": _int_at_least(1),
    "noise_alpha": _finite_at_least_zero(),
    "noise_gamma": _finite_at_least_zero(),
    "epochs": _int_at_least(1),
    "seed": (lambda v: _is_int(v) and 0 <= v <= SEED_MAX, "must be in [0, 2**31 - 1]"),
    "strategy": _one_of(STRATEGY_NAMES),
    "num_devices": _int_at_least(0),
    "xla": _one_of(XLA_CHOICES),
    "accumulation_steps": _int_at_least(1),
    "ghost_batch_size": _int_at_least(0),
    "val_fraction": (lambda v: _is_real(v) and 0 < v < 1, "must be in (0, 1)"),
    "image_size": _int_at_least(0),
    "augment": (lambda v: isinstance(v, bool), "must be true or false"),
    "deterministic": _one_of(DETERMINISM_CHOICES),
    "data_dir": (lambda v: isinstance(v, str), "must be a path ('' for TFDS' default)"),
    "verbose": (lambda v: _is_int(v) and v in (0, 1, 2), "must be 0, 1 or 2"),
    "noise": _one_of(NOISE_KINDS),
    "noise_batch_size": _int_at_least(0),
    # Data at scale and the ImageNet recipe.
    "streaming": _one_of(STREAMING_CHOICES),
    "preprocess": _one_of(PREPROCESSING_NAMES),
    "updates_per_epoch": _int_at_least(0),
    "label_smoothing": (lambda v: _is_real(v) and 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay_exclude_bn_bias": (lambda v: isinstance(v, bool), "must be true or false"),
    "zero_init_residual": (lambda v: isinstance(v, bool), "must be true or false"),
    "lars_eeta": (lambda v: _is_real(v) and math.isfinite(v) and v > 0, "must be > 0"),
    "top5_accuracy": (lambda v: isinstance(v, bool), "must be true or false"),
    # Mixed precision (multi-GPU with XLA)
    "precision": _one_of(PRECISION_CHOICES),
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


def validate_config(config: TrainConfig) -> TrainConfig:
    """Checks every field's range and the rules between fields; returns `config`.

    Raises:
        ValueError: naming the field (or fields), the value received and what is allowed.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig; received {type(config).__name__}.")
    for name in ("model", "optimizer", "dataset"):
        value = getattr(config, name)
        if not _FIELD_RULES[name][0](value):
            valid = {
                "model": ", ".join(MODEL_NAMES),
                "optimizer": ", ".join(OPTIMIZER_NAMES),
                "dataset": ", ".join(DATASET_NAMES) + ", tfds:NAME (e.g. tfds:cifar10) or "
                "folder:PATH",
            }[name]
            raise ValueError(f"Unknown {name}={value!r}; valid: {valid}.")
    for field in dataclasses.fields(TrainConfig):
        check_field(field.name, getattr(config, field.name))
    if config.batch_size % config.accumulation_steps:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by "
            f"accumulation_steps={config.accumulation_steps}."
        )
    if config.ghost_batch_size and config.ghost_batch_size > config.batch_size:
        raise ValueError(
            f"ghost_batch_size={config.ghost_batch_size} exceeds batch_size={config.batch_size}."
        )
    _validate_noise(config)
    _check_scale_fields(config)
    return config


def _validate_noise(config: TrainConfig) -> None:
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


def _check_scale_fields(config: TrainConfig) -> None:
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


# ---------------------------------------------------------------------------
# Flagfiles
# ---------------------------------------------------------------------------


def read_flagfile(path: str) -> dict:
    """The `--name=value` lines of an absl flagfile (comments and blank lines skipped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line that is neither a comment nor `--name=value`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"flagfile {path!r} does not exist.")
    values = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not line.startswith("--") or "=" not in line:
                raise ValueError(f"{path}:{number}: expected '--name=value', received {line!r}.")
            key, value = line[2:].split("=", 1)
            values[key] = value
    return values


def _from_string(key: str, text: str, default):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(int(s) for s in text.split(",") if s.strip())
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def config_from_strings(values: Mapping[str, str]) -> TrainConfig:
    """A validated `TrainConfig` from `{field: string}` (flagfile values).

    Raises:
        ValueError: an unknown field, or a value of the wrong type or range, naming both.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    converted = {}
    for key, text in values.items():
        if key not in fields:
            raise ValueError(f"Unknown flag --{key}; valid: {', '.join(sorted(fields))}.")
        default = getattr(defaults, key)
        try:
            converted[key] = _from_string(key, text, default)
        except ValueError:
            raise ValueError(f"--{key}={text!r} is not a valid {type(default).__name__}.") from None
    if "noise_alpha" not in converted:
        converted["noise_alpha"] = default_noise_alpha(converted.get("noise", defaults.noise))
    return validate_config(TrainConfig(**converted))


def default_noise_alpha(noise: str) -> float:
    """--noise_alpha when it is not given: the paper's 1e-5 for white noise, else 0 (unused)."""
    return TrainConfig.noise_alpha if noise == "white" else 0.0
