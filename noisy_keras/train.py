r"""The main job: one training run from absl flags, written to a work directory.

    python -m noisy_keras.train                      # digits, small CNN, B=128, noise on
    python -m noisy_keras.train --flagfile=flags/digits_b512_noise.flags
    noisy-keras-train --dataset=mnist1d --model=cnn1d --batch_size=1024 --noise_alpha=0

Only `main()` reads FLAGS: it validates them, builds one frozen `TrainConfig`
and calls `train(config)`, which tests and notebooks call directly.

The recipe is the paper's (Jaiswal & Taura, Section 4): the learning rate
tuned at `base_batch_size` is scaled to `batch_size` (linear, Goyal et al.
2017; or sqrt, Hoffer et al. 2017), optionally warmed up, and multiplied by
`lr_decay_factor` at epochs 25, 40 and every 10 epochs after; Gaussian noise
with variance `noise_alpha / (1 + t)^noise_gamma` is added to every gradient.

Work directory (`--workdir`, default `runs/<dataset>-<model>-b<batch>-a<alpha>-s<seed>`):
    flags.txt        the resolved flags; `--flagfile=WORKDIR/flags.txt` reruns the run
    status.json      running / done / diverged
    metrics.csv      per epoch: loss, accuracy, val_loss, val_accuracy, gap, lr, noise sigma
    tensorboard/     TensorBoard logs
    checkpoints/     for exact resume after a crash (rerun the same command)
    model.keras      the final model
    accuracy.png     training (dotted) and validation (solid) accuracy, as in the paper's Fig. 4
    summary.json     final numbers, also printed as one line
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from noisy_keras import checkpointing

OPTIMIZER_NAMES = ("sgd", "momentum", "nesterov", "adam", "adamw", "lamb", "rmsprop", "lion")
STRATEGY_NAMES = ("default", "mirrored", "multiworker")
XLA_CHOICES = ("auto", "true", "false")
# Fields that may differ when resuming into an existing work directory.
_RESUMABLE_CHANGES = ("epochs", "verbose", "workdir")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; written to WORKDIR/flags.txt.

    See `define_flags` for the meaning of each field.
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
    deterministic: bool = True
    data_dir: str = ""
    verbose: int = 1

    def flag_strings(self) -> dict:
        """The config as `{flag name: value as written in a flagfile}`, one per field."""
        strings = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            elif isinstance(value, float):
                value = repr(value)
            strings[field.name] = str(value)
        return strings

    def to_flagfile(self) -> str:
        """The config as absl flag lines, one per field."""
        return "".join(f"--{name}={value}\n" for name, value in self.flag_strings().items())

    def default_workdir(self) -> str:
        return os.path.join(
            "runs",
            f"{self.dataset.replace(':', '_').replace('/', '_')}-{self.model}"
            f"-b{self.batch_size}-a{self.noise_alpha:g}-s{self.seed}",
        )


def define_flags() -> None:
    """Defines the flags of the main job (idempotent)."""
    if "batch_size" in flags.FLAGS:
        return
    d = TrainConfig()
    flags.DEFINE_string("dataset", d.dataset, "digits, mnist1d, tfds:NAME or folder:PATH.")
    flags.DEFINE_string("model", d.model, "mlp, cnn, cnn1d, resnet20 or resnet50.")
    flags.DEFINE_enum("optimizer", d.optimizer, OPTIMIZER_NAMES, "Inner optimizer.")
    flags.DEFINE_float("momentum", d.momentum, "Momentum of momentum/nesterov/rmsprop.")
    flags.DEFINE_float("weight_decay", d.weight_decay, "Keras' decoupled weight decay (0 = off).")
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size per parameter update.")
    flags.DEFINE_integer("base_batch_size", d.base_batch_size, "Batch size of the base lr.")
    flags.DEFINE_float("base_learning_rate", d.base_learning_rate, "Learning rate at base batch.")
    flags.DEFINE_enum("lr_scaling", d.lr_scaling, ("linear", "sqrt", "none"), "Scaling rule.")
    flags.DEFINE_float("warmup_epochs", d.warmup_epochs, "Gradual warm-up length (Goyal et al.).")
    flags.DEFINE_float("lr_decay_factor", d.lr_decay_factor, "Multiplier at each decay epoch.")
    flags.DEFINE_list("lr_decay_epochs", list(map(str, d.lr_decay_epochs)), "Decay epochs.")
    flags.DEFINE_integer("lr_decay_every", d.lr_decay_every, "Decay period after the last one.")
    flags.DEFINE_float("noise_alpha", d.noise_alpha, "Noise variance at t=0 (0 = no noise).")
    flags.DEFINE_float("noise_gamma", d.noise_gamma, "Decay exponent of the noise variance.")
    flags.DEFINE_integer("epochs", d.epochs, "Total epochs.")
    flags.DEFINE_integer("seed", d.seed, "Seed of split, order, initialisation and noise.")
    flags.DEFINE_enum("strategy", d.strategy, STRATEGY_NAMES, "tf.distribute strategy.")
    flags.DEFINE_integer("num_devices", d.num_devices, "Devices for mirrored (0 = all).")
    flags.DEFINE_enum("xla", d.xla, XLA_CHOICES, "XLA per replica (auto: on for GPUs).")
    flags.DEFINE_integer("accumulation_steps", d.accumulation_steps, "Micro-batches per update.")
    flags.DEFINE_integer("ghost_batch_size", d.ghost_batch_size, "Ghost BN size (0 = plain BN).")
    flags.DEFINE_float("val_fraction", d.val_fraction, "Validation fraction (paper: 3:1).")
    flags.DEFINE_integer("image_size", d.image_size, "Image side for tfds/folder (0 = default).")
    flags.DEFINE_bool("augment", d.augment, "Light image augmentation (random crop, flip).")
    flags.DEFINE_bool("deterministic", d.deterministic, "TensorFlow op determinism.")
    flags.DEFINE_string("data_dir", d.data_dir, "TFDS data directory ('' = TFDS default).")
    flags.DEFINE_string("workdir", "", "Run directory ('' = runs/<dataset>-<model>-b..-a..-s..).")
    flags.DEFINE_bool("overwrite", False, "Delete an existing run in --workdir and start afresh.")
    flags.DEFINE_integer("verbose", d.verbose, "0 silent, 1 progress bar, 2 one line per epoch.")

    positive = (
        "batch_size",
        "base_batch_size",
        "epochs",
        "accumulation_steps",
        "lr_decay_every",
    )
    for name in positive:
        flags.register_validator(name, lambda v: v >= 1, message=f"--{name} must be >= 1.")
    for name in ("noise_alpha", "noise_gamma", "weight_decay", "warmup_epochs", "num_devices"):
        flags.register_validator(
            name, lambda v: v >= 0 and math.isfinite(v), message=f"--{name} must be >= 0."
        )
    flags.register_validator(
        "base_learning_rate",
        lambda v: v > 0 and math.isfinite(v),
        message="--base_learning_rate must be > 0.",
    )
    flags.register_validator(
        "val_fraction", lambda v: 0 < v < 1, message="--val_fraction must be in (0, 1)."
    )
    flags.register_validator(
        "lr_decay_factor", lambda v: 0 < v <= 1, message="--lr_decay_factor must be in (0, 1]."
    )
    flags.register_validator(
        "seed", lambda v: 0 <= v < 2**31, message="--seed must be in [0, 2**31 - 1]."
    )
    flags.register_validator(
        "momentum", lambda v: 0 <= v < 1, message="--momentum must be in [0, 1)."
    )
    flags.register_validator(
        "ghost_batch_size", lambda v: v >= 0, message="--ghost_batch_size must be >= 0."
    )
    flags.register_validator(
        "lr_decay_epochs",
        lambda v: all(s.strip().isdigit() and int(s) >= 1 for s in v),
        message="--lr_decay_epochs must be a comma-separated list of epochs >= 1.",
    )


def config_from_flags(flag_values) -> TrainConfig:
    """Builds the frozen config from parsed flags (the only place that reads them)."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = flag_values[field.name].value
        if field.name == "lr_decay_epochs":
            value = tuple(int(s) for s in value)
        values[field.name] = value
    return validate_config(TrainConfig(**values))


def validate_config(config: TrainConfig) -> TrainConfig:
    """Cross-field checks; raises ValueError naming the argument, value and what is allowed."""
    from noisy_keras import data, models

    if config.optimizer not in OPTIMIZER_NAMES:
        raise ValueError(
            f"Unknown optimizer={config.optimizer!r}; valid: {', '.join(OPTIMIZER_NAMES)}."
        )
    if config.model not in models.MODEL_NAMES:
        raise ValueError(f"Unknown model={config.model!r}; valid: {', '.join(models.MODEL_NAMES)}.")
    if config.dataset not in data.DATASET_NAMES and not config.dataset.startswith(
        data.DATASET_PREFIXES
    ):
        raise ValueError(
            f"Unknown dataset={config.dataset!r}; valid: {', '.join(data.DATASET_NAMES)}, "
            "tfds:NAME (e.g. tfds:cifar10) or folder:PATH."
        )
    if config.xla not in XLA_CHOICES:
        raise ValueError(f"xla must be one of {XLA_CHOICES}; received xla={config.xla!r}.")
    if config.strategy not in STRATEGY_NAMES:
        raise ValueError(
            f"Unknown strategy={config.strategy!r}; valid: {', '.join(STRATEGY_NAMES)}."
        )
    if config.batch_size % config.accumulation_steps:
        raise ValueError(
            f"batch_size={config.batch_size} is not divisible by "
            f"accumulation_steps={config.accumulation_steps}."
        )
    if config.ghost_batch_size and config.ghost_batch_size > config.batch_size:
        raise ValueError(
            f"ghost_batch_size={config.ghost_batch_size} exceeds batch_size={config.batch_size}."
        )
    return config


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


def config_from_strings(values: dict) -> TrainConfig:
    """A validated `TrainConfig` from `{field: string}` (flagfile values).

    Raises:
        ValueError: an unknown field, or a value of the wrong type, naming both.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    converted = {}
    for key, text in values.items():
        if key not in fields:
            raise ValueError(f"Unknown flag --{key}; valid: {', '.join(sorted(fields))}.")
        default = getattr(defaults, key)
        try:
            if isinstance(default, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                converted[key] = text.lower() in ("true", "1")
            elif isinstance(default, tuple):
                converted[key] = tuple(int(s) for s in text.split(",") if s.strip())
            elif isinstance(default, int):
                converted[key] = int(text)
            elif isinstance(default, float):
                converted[key] = float(text)
            else:
                converted[key] = text
        except ValueError:
            raise ValueError(f"--{key}={text!r} is not a valid {type(default).__name__}.") from None
    return validate_config(TrainConfig(**converted))


def prepare_workdir(workdir: str, config: TrainConfig, overwrite: bool = False) -> None:
    """Creates `workdir`, or checks that the run already in it has the same configuration.

    Nothing in an existing work directory is deleted unless `overwrite` is True.

    Raises:
        ValueError: the work directory holds a run with a different configuration,
            or files that are not a run of this program.
    """
    flagfile = os.path.join(workdir, "flags.txt")
    if os.path.isdir(workdir) and os.listdir(workdir):
        if overwrite:
            shutil.rmtree(workdir)
        elif not os.path.exists(flagfile):
            raise ValueError(
                f"--workdir={workdir!r} is not empty and holds no flags.txt, so it is not a run "
                "of noisy_keras.train; choose another --workdir (nothing was deleted)."
            )
        else:
            saved = read_flagfile(flagfile)
            wanted = config.flag_strings()
            differences = [
                f"{key}: saved {saved.get(key)!r}, now {wanted[key]!r}"
                for key in wanted
                if key not in _RESUMABLE_CHANGES and saved.get(key) != wanted[key]
            ]
            if differences:
                raise ValueError(
                    f"--workdir={workdir!r} holds a run with a different configuration ("
                    + "; ".join(differences)
                    + "). Use another --workdir, or pass --overwrite to delete that run and "
                    "start afresh (nothing was deleted)."
                )
    os.makedirs(workdir, exist_ok=True)
    checkpointing.atomic_write_text(flagfile, config.to_flagfile() + f"--workdir={workdir}\n")


def _make_optimizer(config: TrainConfig, learning_rate):
    import keras

    from noisy_keras import NoisyOptimizer

    common = {
        "learning_rate": learning_rate,
        "weight_decay": config.weight_decay or None,
        "gradient_accumulation_steps": (
            config.accumulation_steps if config.accumulation_steps > 1 else None
        ),
    }
    if config.optimizer == "sgd":
        inner = keras.optimizers.SGD(**common)
    elif config.optimizer in ("momentum", "nesterov"):
        inner = keras.optimizers.SGD(
            momentum=config.momentum, nesterov=config.optimizer == "nesterov", **common
        )
    elif config.optimizer == "adam":
        inner = keras.optimizers.Adam(**common)
    elif config.optimizer == "adamw":
        common["weight_decay"] = config.weight_decay
        inner = keras.optimizers.AdamW(**common)
    elif config.optimizer == "lamb":
        inner = keras.optimizers.Lamb(**common)
    elif config.optimizer == "rmsprop":
        inner = keras.optimizers.RMSprop(momentum=config.momentum, **common)
    else:
        inner = keras.optimizers.Lion(**common)
    return NoisyOptimizer(
        inner, alpha=config.noise_alpha, gamma=config.noise_gamma, seed=config.seed
    )


class _EpochCSV:
    """Per-epoch CSV that survives resume: rows of epochs to be re-run are dropped first."""

    COLUMNS = (
        "epoch",
        "loss",
        "accuracy",
        "val_loss",
        "val_accuracy",
        "gap",
        "learning_rate",
        "noise_stddev",
        "wall_time_s",
    )

    @staticmethod
    def make(path: str, start_time: float):
        import keras

        class EpochCSV(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.initial_epoch = None

            def on_epoch_begin(self, epoch, logs=None):
                if self.initial_epoch is None:
                    self.initial_epoch = epoch
                    rows = read_metrics(path) if os.path.exists(path) else []
                    kept = [r for r in rows if int(r["epoch"]) < epoch]
                    _write_rows(path, kept)

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                optimizer = self.model.optimizer
                row = {
                    "epoch": epoch,
                    "loss": logs.get("loss"),
                    "accuracy": logs.get("accuracy"),
                    "val_loss": logs.get("val_loss"),
                    "val_accuracy": logs.get("val_accuracy"),
                    "gap": (
                        logs["accuracy"] - logs["val_accuracy"]
                        if "accuracy" in logs and "val_accuracy" in logs
                        else None
                    ),
                    "learning_rate": float(optimizer.learning_rate),
                    "noise_stddev": float(getattr(optimizer, "noise_stddev", 0.0)),
                    "wall_time_s": round(time.time() - start_time, 3),
                }
                with open(path, "a", newline="") as f:
                    csv.DictWriter(f, _EpochCSV.COLUMNS).writerow(row)
                    f.flush()
                    os.fsync(f.fileno())

        return EpochCSV()


def _write_rows(path: str, rows: list) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, _EpochCSV.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    """Reads a run's metrics.csv into a list of dicts of floats (epoch as int)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed = {}
        for key, value in row.items():
            if key == "epoch":
                parsed[key] = int(value)
            else:
                parsed[key] = float(value) if value not in ("", None) else float("nan")
        out.append(parsed)
    return out


def train(config: TrainConfig, workdir: str | None = None, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) one experiment and returns its summary.

    Args:
        config: the validated run configuration.
        workdir: run directory; None uses `config.default_workdir()`.
        overwrite: delete an existing run in `workdir` first (never done otherwise).

    Returns:
        The summary dict also written to WORKDIR/summary.json: status, epochs,
        final train/validation accuracy and gap, sharpness-free numbers, wall time.
    """
    config = validate_config(config)
    workdir = workdir or config.default_workdir()
    prepare_workdir(workdir, config, overwrite=overwrite)

    import keras
    import tensorflow as tf

    from noisy_keras import data, distribute, lr, models, training

    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = distribute.make_strategy(config.strategy, config.num_devices or None)
    replicas = strategy.num_replicas_in_sync
    split = training.split_global_batch(
        config.batch_size, num_replicas=replicas, accumulation_steps=config.accumulation_steps
    )
    dataset = data.load_dataset(
        config.dataset,
        seed=config.seed,
        val_fraction=config.val_fraction,
        data_dir=config.data_dir or None,
        image_size=config.image_size or None,
    )
    updates_per_epoch = dataset.steps_per_epoch(config.batch_size)
    steps_per_epoch = updates_per_epoch * config.accumulation_steps
    schedule = lr.paper_schedule(
        base_learning_rate=config.base_learning_rate,
        batch_size=config.batch_size,
        base_batch_size=config.base_batch_size,
        steps_per_epoch=updates_per_epoch,
        rule=config.lr_scaling,
        warmup_epochs=config.warmup_epochs,
        decay_factor=config.lr_decay_factor,
        decay_epochs=config.lr_decay_epochs,
        decay_every=config.lr_decay_every,
    )

    def build():
        model = models.build_model(
            config.model,
            input_shape=dataset.input_shape,
            num_classes=dataset.num_classes,
            ghost_batch_size=config.ghost_batch_size or None,
            seed=config.seed,
        )
        model.compile(
            optimizer=_make_optimizer(config, schedule),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return model

    start = time.time()
    callbacks = [
        _EpochCSV.make(os.path.join(workdir, "metrics.csv"), start),
        keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard"), write_graph=False),
    ]
    result = training.fit(
        build,
        dataset.train_epochs(
            split.step_batch_size,
            config.seed,
            augment=config.augment,
            batches_per_epoch=steps_per_epoch,
        ),
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        workdir=workdir,
        validation_data=dataset.val_batches(split.step_batch_size),
        callbacks=callbacks,
        strategy=strategy,
        xla={"auto": "auto", "true": True, "false": False}[config.xla],
        verbose=config.verbose,
    )
    model = result.model
    summary = {"workdir": workdir, "status": result.status, "message": result.message}
    if result.status == "done":
        train_eval = model.evaluate(
            dataset.train_eval_batches(split.step_batch_size), verbose=0, return_dict=True
        )
        val_eval = model.evaluate(
            dataset.val_batches(split.step_batch_size), verbose=0, return_dict=True
        )
        model.save(os.path.join(workdir, "model.keras"))
        summary.update(
            epochs=config.epochs,
            train_accuracy=float(train_eval["accuracy"]),
            val_accuracy=float(val_eval["accuracy"]),
            gap=float(train_eval["accuracy"] - val_eval["accuracy"]),
            train_loss=float(train_eval["loss"]),
            val_loss=float(val_eval["loss"]),
        )
    summary["wall_time_s"] = round(time.time() - start, 1)
    metrics_path = os.path.join(workdir, "metrics.csv")
    if os.path.exists(metrics_path) and read_metrics(metrics_path):
        from noisy_keras.analysis import plots

        plots.plot_accuracy_curves(
            {f"B={config.batch_size}": read_metrics(metrics_path)},
            os.path.join(workdir, "accuracy.png"),
        )
    checkpointing.atomic_write_text(
        os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2) + "\n"
    )
    return summary


def summary_line(summary: dict) -> str:
    """One line for the end of a run."""
    if summary["status"] != "done":
        return (
            f"noisy_keras.train: {summary['status']}: {summary['message']} ({summary['workdir']})"
        )
    return (
        f"noisy_keras.train: done in {summary['wall_time_s']:.0f}s | "
        f"train acc {summary['train_accuracy']:.4f} | val acc {summary['val_accuracy']:.4f} | "
        f"gap {summary['gap']:+.4f} | {summary['workdir']}"
    )


def quiet_info_logs(flag_values) -> None:
    """absl INFO off unless --verbosity was given: TensorFlow logs a line per checkpoint shard."""
    if not flag_values["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    quiet_info_logs(FLAGS)
    try:
        config = config_from_flags(FLAGS)
        summary = train(config, FLAGS.workdir or None, overwrite=FLAGS.overwrite)
    except (ValueError, FileNotFoundError) as error:
        print(f"noisy_keras.train: error: {error}", file=sys.stderr)
        return 2
    print(summary_line(summary))
    return 0 if summary["status"] == "done" else 1


def run() -> None:
    """Console-script entry point (`noisy-keras-train`)."""
    define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
