r"""The main job: one training run from absl flags, written to a work directory.

    python -m noisy_keras.train                      # digits, small CNN, B=128, noise on
    python -m noisy_keras.train --flagfile=flags/digits_b1024_noise.flags
    noisy-keras-train --dataset=mnist1d --model=cnn1d --batch_size=1024 --noise_alpha=0

Only `main()` reads FLAGS: it builds one validated, frozen `TrainConfig`
(`noisy_keras.config`) and calls `train(config)`, which tests and notebooks
call directly. `train` builds data, schedule, optimizer and model from the
config (`noisy_keras.recipe`), trains them with the engine
(`noisy_keras.training.fit`) and writes the run directory
(`noisy_keras.workdir`, which lists its files).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from noisy_keras import config as config_lib
from noisy_keras import workdir as workdir_lib
from noisy_keras.config import TrainConfig


def define_flags() -> None:
    """Defines the flags of the main job, one per `TrainConfig` field (idempotent).

    Each flag's validator is the config's own field check (`config.check_field`).
    """
    if "batch_size" in flags.FLAGS:
        return
    defaults = TrainConfig()
    enums = {
        "optimizer": config_lib.OPTIMIZER_NAMES,
        "lr_scaling": config_lib.LR_SCALING_RULES,
        "strategy": config_lib.STRATEGY_NAMES,
        "xla": config_lib.XLA_CHOICES,
        "deterministic": config_lib.DETERMINISM_CHOICES,
        "precision": config_lib.PRECISION_CHOICES,
    }
    for field in dataclasses.fields(TrainConfig):
        name, default = field.name, getattr(defaults, field.name)
        help_text = config_lib.FIELD_HELP[name]
        if name in enums:
            flags.DEFINE_enum(name, default, enums[name], help_text)
            continue
        if isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text)
        elif isinstance(default, tuple):
            flags.DEFINE_list(name, [str(v) for v in default], help_text)
        else:
            flags.DEFINE_string(name, default, help_text)
        predicate, allowed = config_lib.field_rule(name)
        if isinstance(default, tuple):
            check = lambda v, p=predicate: (
                all(s.strip().isdigit() for s in v) and p(tuple(int(s) for s in v))
            )
        else:
            check = predicate
        flags.register_validator(name, check, message=f"--{name} {allowed}.")
    flags.DEFINE_string("workdir", "", "Run directory ('' = runs/<dataset>-<model>-b..-a..-s..).")
    flags.DEFINE_bool("overwrite", False, "Delete an existing run in --workdir and start afresh.")


def config_from_flags(flag_values) -> TrainConfig:
    """Builds the frozen config from parsed flags (the only place that reads them)."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = flag_values[field.name].value
        if field.name == "lr_decay_epochs":
            value = tuple(int(s) for s in value)
        values[field.name] = value
    return config_lib.validate_config(TrainConfig(**values))


def train(config: TrainConfig, workdir: str | None = None, *, overwrite: bool = False) -> dict:
    """Runs (or resumes) one experiment and returns its summary.

    Args:
        config: the validated run configuration.
        workdir: run directory; None uses `config.default_workdir()`.
        overwrite: delete an existing run in `workdir` first (never done otherwise).

    Returns:
        The summary dict also written to WORKDIR/summary.json: status, epochs,
        final train/validation accuracy and gap, sharpness-free numbers, wall time,
        and the device policy the run resolved (`device_policy`).

    Raises:
        ValueError: a bad configuration, or an impossible device policy (e.g.
            --deterministic=true with XLA for a model with max pooling), before
            anything is written.
    """
    config = config_lib.validate_config(config)
    # ---- Device policy: strategy, XLA, op determinism, precision. Resolved and checked
    # before the run directory exists; applied for this run only, restored after. ----
    strategy, policy = resolve_device_policy(config)
    with run_settings(policy):
        return _train(config, workdir, overwrite=overwrite, strategy=strategy, policy=policy)


def resolve_device_policy(config: TrainConfig):
    """The run's strategy and `{"replicas", "xla", "deterministic", "precision"}`, resolved.

    XLA: `distribute.resolve_xla` (`--xla=auto`: on for GPUs); op determinism:
    `distribute.resolve_determinism` (`--deterministic=auto`: on unless XLA is
    on; true with XLA is refused for models with max pooling); precision: the
    Keras dtype policy named by `--precision`.

    Raises:
        ValueError: an impossible combination, naming the flags.
    """
    from noisy_keras import distribute, models

    strategy = distribute.make_strategy(config.strategy, config.num_devices or None)
    xla = distribute.resolve_xla(
        {"auto": "auto", "true": True, "false": False}[config.xla], strategy
    )
    deterministic = distribute.resolve_determinism(
        config.deterministic,
        xla=xla,
        model_has_max_pooling=config.model in models.MODELS_WITH_MAX_POOLING,
    )
    policy = {
        "replicas": int(strategy.num_replicas_in_sync),
        "xla": xla,
        "deterministic": deterministic,
        "precision": config.precision,
    }
    return strategy, policy


@contextlib.contextmanager
def run_settings(policy: dict):
    """Sets Keras' dtype policy and TensorFlow's op determinism for one run, then restores both.

    `train()` is called in a loop by the experiment runner and by tests: a
    run's settings must not leak into the next.
    """
    import keras
    import tensorflow as tf

    from noisy_keras import _keras_internals as internals

    previous_policy = keras.config.dtype_policy()
    previously_deterministic = internals.is_op_determinism_enabled()
    keras.config.set_dtype_policy(policy["precision"])
    if policy["deterministic"] and not previously_deterministic:
        tf.config.experimental.enable_op_determinism()
    elif previously_deterministic and not policy["deterministic"]:
        internals.disable_op_determinism()
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous_policy)
        if internals.is_op_determinism_enabled() != previously_deterministic:
            if previously_deterministic:
                tf.config.experimental.enable_op_determinism()
            else:
                internals.disable_op_determinism()


def _train(config: TrainConfig, workdir, *, overwrite: bool, strategy, policy: dict) -> dict:
    workdir = workdir or config.default_workdir()
    workdir_lib.prepare_workdir(workdir, config, overwrite=overwrite)

    import keras

    from noisy_keras import recipe, training

    if config.verbose:
        print(
            f"noisy_keras.train: {policy['replicas']} replica(s), XLA "
            f"{'on' if policy['xla'] else 'off'} (--xla={config.xla}), op determinism "
            f"{'on' if policy['deterministic'] else 'off'} (--deterministic="
            f"{config.deterministic}), precision {policy['precision']}",
            flush=True,
        )
    replicas = strategy.num_replicas_in_sync
    split = training.split_global_batch(
        config.batch_size, num_replicas=replicas, accumulation_steps=config.accumulation_steps
    )
    dataset = recipe.load_data(config)
    updates_per_epoch = dataset.steps_per_epoch(config.batch_size)
    steps_per_epoch = updates_per_epoch * config.accumulation_steps
    schedule = recipe.make_schedule(config, updates_per_epoch)

    start = time.time()
    metrics_path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    callbacks = [
        workdir_lib.metrics_csv_callback(metrics_path, start),
        keras.callbacks.TensorBoard(
            os.path.join(workdir, workdir_lib.TENSORBOARD_DIR), write_graph=False
        ),
    ]
    result = training.fit(
        lambda: recipe.build_compiled_model(config, dataset, schedule),
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
        xla=policy["xla"],
        accumulation_steps=config.accumulation_steps,
        verbose=config.verbose,
    )
    model = result.model
    summary = {"workdir": workdir, "status": result.status, "message": result.message}
    summary["device_policy"] = policy
    if result.status == "done":
        train_eval = model.evaluate(
            dataset.train_eval_batches(split.step_batch_size), verbose=0, return_dict=True
        )
        val_eval = model.evaluate(
            dataset.val_batches(split.step_batch_size), verbose=0, return_dict=True
        )
        model.save(os.path.join(workdir, workdir_lib.MODEL_FILE))
        summary.update(
            epochs=config.epochs,
            train_accuracy=float(train_eval["accuracy"]),
            val_accuracy=float(val_eval["accuracy"]),
            gap=float(train_eval["accuracy"] - val_eval["accuracy"]),
            train_loss=float(train_eval["loss"]),
            val_loss=float(val_eval["loss"]),
        )
    summary["wall_time_s"] = round(time.time() - start, 1)
    if os.path.exists(metrics_path) and workdir_lib.read_metrics(metrics_path):
        from noisy_keras.analysis import plots

        plots.plot_accuracy_curves(
            {f"B={config.batch_size}": workdir_lib.read_metrics(metrics_path)},
            os.path.join(workdir, workdir_lib.PLOT_FILE),
        )
    workdir_lib.write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
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
