"""The run configuration: one frozen dataclass, its flagfile form, and its validation.

A run of the main job is described by one `TrainConfig`. The command line
(`noisy_keras.train`), the experiment runner and notebooks all build it here and
all go through the same checks, `validate_config`: each field's range
(`check_field`, which the absl flag validators call too) and the rules that tie
fields together. The allowed values (names, ranges, rules) are in
`noisy_keras.run.config_rules`; this module re-exports the names. Neither imports
TensorFlow or Keras, so the command line can print its help and refuse bad
input before loading them.

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
import os
from collections.abc import Mapping

from noisy_keras._validation import replica_share
from noisy_keras.noise.registry import PAPER_ALPHA
from noisy_keras.run import config_rules
from noisy_keras.run.config_rules import (  # the allowed values, re-exported where callers look
    DATASET_NAMES,
    DATASET_PREFIXES,
    DEFAULT_LARS_EETA,
    DEFAULT_SAM_RHO,
    DETERMINISM_CHOICES,
    GRADIENT_METHOD_NAMES,
    LR_SCALING_RULES,
    MODEL_NAMES,
    MODELS_WITH_BATCH_NORM,
    MODELS_WITH_RESIDUAL_BN,
    NOISE_KINDS,
    OPTIMIZER_NAMES,
    PENALTY_GRADIENTS,
    PRECISION_CHOICES,
    PREPROCESSING_NAMES,
    SEED_MAX,
    STRATEGY_NAMES,
    STREAMING_CHOICES,
    XLA_CHOICES,
    check_field,
    field_rule,
)

# Fields that may differ when a run is resumed in its work directory: they do not
# change what is trained (more epochs continue the same run; where the data lives
# and how much is printed or logged are not part of the experiment).
RESUMABLE_FIELDS = ("epochs", "verbose", "data_dir", "noise_log_every")

__all__ = [
    "DATASET_NAMES",
    "DATASET_PREFIXES",
    "DEFAULT_LARS_EETA",
    "DEFAULT_SAM_RHO",
    "DETERMINISM_CHOICES",
    "GRADIENT_METHOD_NAMES",
    "LR_SCALING_RULES",
    "MODEL_NAMES",
    "MODELS_WITH_BATCH_NORM",
    "MODELS_WITH_RESIDUAL_BN",
    "NOISE_KINDS",
    "OPTIMIZER_NAMES",
    "PENALTY_GRADIENTS",
    "PREPROCESSING_NAMES",
    "PRECISION_CHOICES",
    "RESUMABLE_FIELDS",
    "SEED_MAX",
    "STRATEGY_NAMES",
    "STREAMING_CHOICES",
    "XLA_CHOICES",
    "TrainConfig",
    "check_field",
    "config_from_strings",
    "config_from_values",
    "default_noise_alpha",
    "field_rule",
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
    noise_alpha: float = PAPER_ALPHA
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
    # TensorBoard: the noise every N updates (logging only; may change on a resume)
    noise_log_every: int = 0
    # The compared methods: SAM or the gradient-norm penalty on the training step
    # (engine.methods), and an exponential moving average of the weights evaluated at the end.
    method: str = "none"
    sam_rho: float = DEFAULT_SAM_RHO
    sam_adaptive: bool = False
    penalty_strength: float = 0.0
    penalty_gradient: str = "finite_difference"
    ema_momentum: float = 0.0

    def flag_strings(self) -> dict:
        """The config as `{flag name: value as written in a flagfile}`, one per field."""
        return {f.name: _to_string(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_flagfile(self) -> str:
        """The config as absl flag lines, one per field."""
        return "".join(f"--{name}={value}\n" for name, value in self.flag_strings().items())

    def default_workdir(self) -> str:
        """`runs/<dataset>-<model>-b<batch>-<noise><method>-s<seed>`.

        <noise> as in `noise_name`, <method> as in `method_name`.
        """
        return os.path.join(
            "runs",
            f"{self.dataset.replace(':', '_').replace('/', '_')}-{self.model}"
            f"-b{self.batch_size}-{self.noise_name()}{self.method_name()}-s{self.seed}",
        )

    def method_name(self) -> str:
        """The method in names: '' (none), `-sam<rho>`, `-asam<rho>`, `-gnp<lambda>` (finite
        difference) or `-gnpdb<lambda>` (double backprop), then `-ema<momentum>` if averaging."""
        name = {
            "none": "",
            "sam": f"-{'a' if self.sam_adaptive else ''}sam{self.sam_rho:g}",
            "gradient_norm_penalty": (
                f"-gnp{'db' if self.penalty_gradient == 'double_backprop' else ''}"
                f"{self.penalty_strength:g}"
            ),
        }[self.method]
        return name + (f"-ema{self.ema_momentum:g}" if self.ema_momentum else "")

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
    "dataset": f"{', '.join(DATASET_NAMES)}, tfds:NAME or folder:PATH.",
    "model": f"{', '.join(MODEL_NAMES[:-1])} or {MODEL_NAMES[-1]}.",
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
    "verbose": (
        "0 silent, 1 progress bar (one line per epoch when output is redirected), 2 one "
        "line per epoch."
    ),
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
    "noise_log_every": (
        "Also write sigma_t (and tr(Sigma) for matched noise) to TensorBoard every N parameter "
        "updates, tags update_noise_stddev and update_noise_covariance_trace (0 = once per "
        "epoch only)."
    ),
    # Mixed precision (multi-GPU with XLA)
    "precision": "Keras dtype policy of the run (mixed: float16/bfloat16 compute, float32 logits).",
    # The compared methods
    "method": (
        "Gradient method of the training step: none; sam, sharpness-aware minimization "
        "(Foret et al. 2021; --sam_rho, --sam_adaptive), the gradient at w + rho g/|g| with each "
        "replica perturbing by its own batch; gradient_norm_penalty, train on "
        "L + lambda |grad L|^2 (--penalty_strength, --penalty_gradient). Both cost a second "
        "forward and backward pass per step; noise is added to the method's gradient."
    ),
    "sam_rho": f"SAM's radius rho > 0 (--method=sam only; default {DEFAULT_SAM_RHO}).",
    "sam_adaptive": "Adaptive SAM, rho |w|-relative (Kwon et al. 2021; --method=sam only).",
    "penalty_strength": "lambda > 0 of the gradient-norm penalty (--method=gradient_norm_penalty).",
    "penalty_gradient": (
        "How the penalty's gradient 2 lambda H g is computed: finite_difference (Geiping et al. "
        "2022, two first-order passes) or double_backprop (exact, second-order graph)."
    ),
    "ema_momentum": (
        "Exponential moving average of the weights, kept by the optimizer (Keras' use_ema) and "
        "written into the model when training ends, so the final evaluation and the saved model "
        "use it; per-epoch validation sees the raw weights (0 = off; e.g. 0.99). It remembers "
        "about 1/(1-m) updates from the first update's weights: a shorter run gets a notice."
    ),
}


def _to_string(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def validate_config(config: TrainConfig) -> TrainConfig:
    """Checks every field's range and the rules between fields; returns `config`.

    Raises:
        ValueError: naming the field (or fields), the value received and what is allowed.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig; received {type(config).__name__}.")
    for name in ("model", "optimizer", "dataset"):
        value = getattr(config, name)
        if not config_rules.field_rule(name)[0](value):
            valid = {
                "model": ", ".join(MODEL_NAMES),
                "optimizer": ", ".join(OPTIMIZER_NAMES),
                "dataset": ", ".join(DATASET_NAMES) + ", tfds:NAME (e.g. tfds:cifar10) or "
                "folder:PATH",
            }[name]
            raise ValueError(f"Unknown {name}={value!r}; valid: {valid}.")
    for field in dataclasses.fields(TrainConfig):
        check_field(field.name, getattr(config, field.name))
    if replica_share(config.batch_size, micro_batches=config.accumulation_steps) is None:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by "
            f"accumulation_steps={config.accumulation_steps}."
        )
    if config.ghost_batch_size and config.ghost_batch_size > config.batch_size:
        raise ValueError(
            f"ghost_batch_size={config.ghost_batch_size} exceeds batch_size={config.batch_size}."
        )
    config_rules.validate_noise(config)
    config_rules.check_scale_fields(config)
    config_rules.validate_method(config)
    return config


# ---------------------------------------------------------------------------
# Flagfiles
# ---------------------------------------------------------------------------


def read_flagfile(path: str) -> dict:
    """`{name: value}` of an absl flagfile's `--name=value` lines, its includes followed.

    Comments and blank lines are skipped; `--flagfile=X` lines are expanded in
    place (`noisy_keras.run.flagfile.flag_lines`), later values overriding earlier.

    Raises:
        FileNotFoundError: no such file (or include).
        ValueError: a line that is neither a comment nor `--name=value`; an include cycle.
    """
    from noisy_keras.run import flagfile

    values = {}
    for source, number, line in flagfile.flag_entries(path):
        if not line.startswith("--") or "=" not in line:
            raise ValueError(f"{source}:{number}: expected '--name=value', received {line!r}.")
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
    return config_from_values(converted)


def config_from_values(values: Mapping[str, object]) -> TrainConfig:
    """A validated `TrainConfig` from the fields given, typed (parsed flags, converted strings).

    The fields not given take their defaults; this is the one place that sets the
    default that depends on another field (`default_noise_alpha`). Both ways in,
    flagfile strings (`config_from_strings`) and the main job's flags
    (`noisy_keras.run.train.config_from_flags`), end here.
    """
    values = dict(values)
    if "noise_alpha" not in values:
        values["noise_alpha"] = default_noise_alpha(values.get("noise", TrainConfig.noise))
    return validate_config(TrainConfig(**values))


def default_noise_alpha(noise: str) -> float:
    """--noise_alpha when it is not given: the paper's 1e-5 for white noise, else 0 (unused)."""
    return TrainConfig.noise_alpha if noise == "white" else 0.0
