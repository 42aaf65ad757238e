r"""Trains one model from flags and writes everything it did to a run directory.

    python -m noisy_keras.train                      # digits, small CNN, B=128, noise on
    python -m noisy_keras.train --recipe=digits_b1024_noise --epochs=2   # a shipped recipe
    noisy-keras-train --dataset=mnist1d --model=cnn1d --batch_size=1024 --noise_alpha=0
    noisy-keras-train --batch_size=512 --lr_scaling=none --noise=matched --noise_batch_size=32

It prints Keras' progress and one final line (accuracies, gap, run directory).
The run directory (--workdir, default runs/<dataset>-<model>-b<B>-a<alpha>-s<seed>)
holds flags.txt, status.json, metrics.csv, checkpoints, the model, a plot and
summary.json. Run the same command again to resume after a crash or Ctrl-C; a
finished run is left as it is. --overwrite replaces a run, and only a run.
Set NOISY_KERAS_TF_LOGS=1 to see TensorFlow's own log lines.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings

from absl import app, flags
from absl import logging as absl_logging

from noisy_keras import _extras
from noisy_keras.engine.rundir import PLOT_FILE, RunDir
from noisy_keras.run import _cli, device_policy, rundir_rules
from noisy_keras.run import config as config_lib
from noisy_keras.run import flagfile as flagfile_lib
from noisy_keras.run.config import TrainConfig

# Design: only `main()` reads FLAGS; it builds one validated, frozen `TrainConfig`
# (`noisy_keras.run.config`) and calls `train(config)`, which tests and notebooks call
# directly. `train` checks the run directory (`noisy_keras.run.rundir_rules`), builds data,
# schedule, optimizer and model (`noisy_keras.run.recipe`), and only then creates the
# directory and trains with the engine (`noisy_keras.engine.fit.fit`).


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
        "noise": config_lib.NOISE_KINDS,
        "deterministic": config_lib.DETERMINISM_CHOICES,
        "precision": config_lib.PRECISION_CHOICES,
        "method": config_lib.GRADIENT_METHOD_NAMES,
        "penalty_gradient": config_lib.PENALTY_GRADIENTS,
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
    recipes = flagfile_lib.recipe_names()
    flags.DEFINE_string(
        "recipe",
        "",
        "A recipe shipped with the package, by name: its flags, then the flags given after "
        f"it (which override them). Recipes: {', '.join(recipes)}.",
    )
    flags.register_validator(
        "recipe",
        lambda name: name == "" or name in recipes,
        message=f"--recipe must be one of the shipped recipes: {', '.join(recipes)}.",
    )
    flags.DEFINE_string("workdir", "", "Run directory ('' = runs/<dataset>-<model>-b..-a..-s..).")
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace the run in --workdir: delete the files a run writes there and start afresh. "
        "Refused for a directory that is not a run, holds other files, or is ., a parent "
        "of the current directory or the home directory.",
    )


def config_from_flags(flag_values) -> TrainConfig:
    """Builds the frozen config from parsed flags (the only place that reads them).

    The flags given on the command line or in a flagfile, typed by absl; the rest
    take `TrainConfig`'s defaults in `config.config_from_values`.
    """
    values = {}
    for field in dataclasses.fields(TrainConfig):
        flag = flag_values[field.name]
        if flag.present:
            values[field.name] = flag.value
    if "lr_decay_epochs" in values:
        values["lr_decay_epochs"] = tuple(int(s) for s in values["lr_decay_epochs"])
    return config_lib.config_from_values(values)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def train(
    config: TrainConfig,
    workdir: str | None = None,
    *,
    overwrite: bool = False,
    log=print,
    callbacks=(),
) -> dict:
    """Runs, resumes or (when finished) only reports one experiment; returns its summary.

    Order: the config and the run directory are checked (`rundir_rules.check_workdir`,
    touching nothing); a finished run with this configuration returns at once,
    unchanged. Then strategy, batch split, data and schedule are built, all of
    which may refuse bad input, and only then the directory is created (or a
    run in it replaced with `overwrite`) and training starts or resumes from the
    last checkpoint. `status.json` always ends in a final state: "done",
    "diverged", "interrupted" (KeyboardInterrupt, re-raised) or "failed" (any
    other exception, re-raised; the message is the error's first line).

    Args:
        config: the run configuration (validated here).
        workdir: run directory; None uses `config.default_workdir()`.
        overwrite: replace the run in `workdir` (see `noisy_keras.run.rundir_rules`).
        log: where the one-line notices go (resuming, ...); None for silence.
        callbacks: Keras callbacks to run with the job's own, called by the engine
            exactly as `keras.Model.fit` calls them: after `NoiseLogger`, the
            metrics CSV and TensorBoard (so their epoch `logs` hold
            `noise_stddev`, `noise_step`, `gap` and the kind's other values, see
            `noisy_keras.noise.callbacks`), for epochs `initial_epoch..epochs-1`
            (after a resume, from the checkpoint's epoch on). Not called for a run
            that is already finished.

    Returns:
        The summary written to WORKDIR/summary.json: workdir, status, message,
        epochs, train/validation accuracy and loss measured after training on
        each whole split, gap (train - validation accuracy) and wall_time_s
        (training time summed over sessions). For a run that was already
        finished, the stored summary with `already_done=True` added (nothing
        is written). Also `device_policy`: the replicas, XLA, op determinism and
        precision the run resolved.

    Raises:
        ValueError, FileNotFoundError: bad input, or an impossible device policy
            (e.g. --deterministic=true with XLA for a model with max pooling);
            nothing was created or deleted.
        ConnectionError: a TFDS dataset that is not prepared cannot be downloaded.
        noisy_keras._extras.MissingExtraError: the dataset needs an extra that is not
            installed (mnist1d: `pip install "noisy_keras[study]"`); nothing was created.
        KeyboardInterrupt: interrupted; status "interrupted", checkpoints kept.
    """
    config = config_lib.validate_config(config)
    callbacks = check_callbacks(callbacks)
    workdir = workdir or config.default_workdir()
    log = log or (lambda _line: None)
    plan = rundir_rules.check_workdir(workdir, config, overwrite=overwrite)
    if plan.action == "done":
        return {**plan.summary, "already_done": True}
    # Device policy: strategy, XLA, op determinism, precision. Resolved and checked
    # before the run directory exists; applied for this run only, restored after.
    strategy, policy = device_policy.resolve_device_policy(config)
    with device_policy.run_settings(policy):
        return _run(config, workdir, plan, strategy, policy, log, callbacks)


def check_callbacks(callbacks) -> list:
    """`callbacks` as a list of `keras.callbacks.Callback` (ValueError naming one that is not)."""
    if (
        callbacks is None
        or not hasattr(callbacks, "__iter__")
        or isinstance(callbacks, (str, bytes, dict))
    ):
        raise ValueError(
            "callbacks must be a list of keras.callbacks.Callback instances; received "
            f"callbacks={callbacks!r}."
        )
    callbacks = list(callbacks)
    if callbacks:
        import keras

        for i, callback in enumerate(callbacks):
            if not isinstance(callback, keras.callbacks.Callback):
                raise ValueError(
                    f"callbacks[{i}] must be a keras.callbacks.Callback instance; received "
                    f"{callback!r} of type {type(callback).__name__}."
                )
    return callbacks


def progress_verbosity(verbose: int, stream=None) -> int:
    """The `verbose` to give Keras: its progress bar (1) only where it can redraw itself.

    Keras redraws the bar with backspaces and carriage returns wherever it runs
    on a POSIX system; in a file or a pipe those pile up. So 1 stays 1 on a
    terminal and in a notebook (IPython kernel) and becomes 2 (one plain line
    per epoch) when `stream` (default: sys.stdout) is redirected; 0 and 2 stay.
    """
    stream = sys.stdout if stream is None else stream
    if verbose != 1 or "ipykernel" in sys.modules:
        return verbose
    isatty = getattr(stream, "isatty", None)
    return 1 if isatty is not None and isatty() else 2


def _run(config, workdir, plan, strategy, policy, log, user_callbacks) -> dict:
    """`train` after the checks that need no TensorFlow, under the run's device settings."""
    import keras

    from noisy_keras.engine import fit as training
    from noisy_keras.noise.callbacks import NoiseLogger
    from noisy_keras.run import recipe

    verbose = progress_verbosity(config.verbose)
    if verbose >= 2:  # one line per epoch: the device policy heads it
        log(
            f"noisy_keras.train: {policy['replicas']} replica(s), XLA "
            f"{'on' if policy['xla'] else 'off'} (--xla={config.xla}), op determinism "
            f"{'on' if policy['deterministic'] else 'off'} (--deterministic="
            f"{config.deterministic}), precision {policy['precision']}"
        )
    split = training.split_global_batch(
        config.batch_size,
        num_replicas=strategy.num_replicas_in_sync,
        accumulation_steps=config.accumulation_steps,
    )
    dataset = recipe.load_data(config)
    if dataset.num_classes < 2:
        raise ValueError(
            f"dataset={config.dataset!r} has {dataset.num_classes} class "
            f"({', '.join(map(str, dataset.class_names)) or 'unnamed'}); classification "
            "needs at least 2 (for folder:PATH, one subfolder of images per class)."
        )
    updates_per_epoch = dataset.steps_per_epoch(config.batch_size)
    if config.updates_per_epoch:
        if config.updates_per_epoch > updates_per_epoch:
            raise ValueError(
                f"updates_per_epoch={config.updates_per_epoch} exceeds the "
                f"{updates_per_epoch} full batches of {config.batch_size} in an epoch of "
                f"{config.dataset!r}; allowed: 0 (all) or 1..{updates_per_epoch}."
            )
        updates_per_epoch = config.updates_per_epoch
    eval_batch_size = evaluation_batch_size(split.step_batch_size, strategy.num_replicas_in_sync)
    short = averaging_lag_notice(config.ema_momentum, updates_per_epoch * config.epochs)
    if short:
        log(f"noisy_keras.train: {short}")
    steps_per_epoch = updates_per_epoch * config.accumulation_steps
    schedule = recipe.make_schedule(config, updates_per_epoch)

    rundir_rules.make_workdir(plan, config)  # everything above is checked: now create
    run_dir = RunDir(workdir)
    resume_from = run_dir.epochs_checkpointed() if plan.action == "resume" else 0
    run_dir.write_status("running", epochs_completed=resume_from)
    if resume_from:
        log(
            f"noisy_keras.train: resuming {workdir} at epoch {resume_from + 1} of "
            f"{config.epochs} (its checkpoint holds epochs 1-{resume_from})"
        )
    per_update = {}
    if config.noise_log_every:
        per_update = dict(log_dir=run_dir.tensorboard_dir, update_freq=config.noise_log_every)
    callbacks = [  # the noise first: the CSV, TensorBoard and the user's read its logs
        NoiseLogger(**per_update),
        run_dir.metrics_callback(),
        keras.callbacks.TensorBoard(run_dir.tensorboard_dir, write_graph=False),
        *user_callbacks,
        _cli.interrupt_callback(),
    ]
    try:
        with _cli.defer_interrupts():
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
                workdir=run_dir,
                validation_data=dataset.val_batches(eval_batch_size),
                callbacks=callbacks,
                strategy=strategy,
                xla=policy["xla"],
                accumulation_steps=config.accumulation_steps,
                verbose=verbose,
            )
        return _report(config, run_dir, result, dataset, eval_batch_size, policy, log)
    except KeyboardInterrupt:
        completed = run_dir.epochs_checkpointed()
        run_dir.write_status(
            "interrupted",
            epochs_completed=completed,
            message=f"stopped in epoch {completed + 1}; rerun the same command to resume "
            f"at epoch {completed + 1}",
        )
        raise
    except Exception as error:
        run_dir.write_status(
            "failed",
            epochs_completed=run_dir.epochs_checkpointed(),
            message=_first_line(error),
        )
        raise


def _report(config, run_dir, result, dataset, batch_size, policy, log) -> dict:
    """After training: evaluates each whole split, saves the model, plots, writes the summary."""
    from noisy_keras.noise import multiplicative

    rows = run_dir.read_metrics()
    summary = {"workdir": run_dir.path, "status": result.status, "message": result.message}
    summary["device_policy"] = policy
    if result.status == "done":
        model = result.model
        train_eval = model.evaluate(
            dataset.train_eval_batches(batch_size), verbose=0, return_dict=True
        )
        val_eval = model.evaluate(dataset.val_batches(batch_size), verbose=0, return_dict=True)
        with warnings.catch_warnings():  # flags.txt holds the noise's settings: the job rebuilds it
            warnings.filterwarnings("ignore", message=multiplicative.NOT_SAVED)
            model.save(run_dir.model_path)
        summary.update(
            epochs=config.epochs,
            train_accuracy=float(train_eval["accuracy"]),
            val_accuracy=float(val_eval["accuracy"]),
            gap=float(train_eval["accuracy"] - val_eval["accuracy"]),
            train_loss=float(train_eval["loss"]),
            val_loss=float(val_eval["loss"]),
        )
        if config.top5_accuracy:
            summary.update(
                train_top5_accuracy=float(train_eval["top5_accuracy"]),
                val_top5_accuracy=float(val_eval["top5_accuracy"]),
            )
    summary["wall_time_s"] = rows[-1]["wall_time_s"] if rows else 0.0
    if rows:
        try:
            from noisy_keras.analysis import plots
        except _extras.MissingExtraError as error:  # the core install: no figure, say why
            log(f"noisy_keras.train: no {PLOT_FILE}: {error}")
        else:
            plots.plot_accuracy_curves(
                {f"B={config.batch_size}": rows},
                run_dir.plot_path,
                title=run_title(config),
            )
    run_dir.write_summary(summary)
    return summary


EVAL_BATCH_LIMIT = 1024
"""Largest global batch for validation and the final evaluation (see `evaluation_batch_size`)."""


def averaging_lag_notice(ema_momentum: float, updates: int) -> str | None:
    """A warning when the weights' moving average spans too much of the run, else None.

    Keras starts the average at the first update's weights with no bias
    correction, and it remembers about 1 / (1 - m) updates, so a run of fewer
    than 3 / (1 - m) updates ends with an average still weighted towards its
    early weights (the default job for 2 epochs, 20 updates: validation
    accuracy 0.61 without averaging, 0.33 with m = 0.9, 0.08 with m = 0.99).
    """
    if not ema_momentum or updates >= 3.0 / (1.0 - ema_momentum):
        return None
    largest = math.floor(1000.0 * max(0.0, 1.0 - 3.0 / updates)) / 1000.0  # rounded down
    return (
        f"warning: --ema_momentum={ema_momentum:g} averages over about "
        f"{1.0 / (1.0 - ema_momentum):.0f} updates, and this run makes {updates}: the averaged "
        "weights it evaluates and saves stay close to its early ones. Use a smaller momentum "
        f"(at most {largest:g} for {updates} updates) or more epochs."
    )


def evaluation_batch_size(step_batch_size: int, replicas: int) -> int:
    """The global batch of validation and final evaluation: the step batch, at most 1,024.

    Rule: min(step_batch_size, EVAL_BATCH_LIMIT) rounded down to a multiple of
    `replicas`, and at least `replicas`. Under MultiWorkerMirroredStrategy
    Keras shards a plain evaluation dataset by data, so every worker reads
    whole evaluation batches: at B=32,768 a step-sized batch would be 19.7 GB
    of 224 px float32 images per worker. The batch size does not change what
    is measured (up to float rounding); runs with batches up to 1,024 are
    unchanged.
    """
    limited = min(step_batch_size, EVAL_BATCH_LIMIT)
    return max(replicas, limited // replicas * replicas)


def run_title(config: TrainConfig) -> str:
    """What a figure of one run names: dataset, model, batch size, noise (alpha), seed."""
    noise = {"white": f"alpha={config.noise_alpha:g}", "none": "no noise"}.get(
        config.noise, f"{config.noise} noise, b={config.noise_batch_size}"
    )
    return f"{config.dataset}, {config.model}, B={config.batch_size}, {noise}, seed {config.seed}"


def summary_line(summary: dict) -> str:
    """One line for the end of a run."""
    if summary["status"] != "done":
        return (
            f"noisy_keras.train: {summary['status']}: {summary['message']} ({summary['workdir']})"
        )
    state = "already done (nothing changed)" if summary.get("already_done") else "done"
    return (
        f"noisy_keras.train: {state} | {summary['epochs']} epochs in "
        f"{summary['wall_time_s']:.0f}s | train acc {summary['train_accuracy']:.4f} | "
        f"val acc {summary['val_accuracy']:.4f} | gap {summary['gap']:+.4f} | "
        f"{summary['workdir']}"
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
    workdir = None
    with _cli.sigint_at_batch_boundaries():
        try:
            config = config_from_flags(FLAGS)
            workdir = FLAGS.workdir or config.default_workdir()
            if rundir_rules.check_workdir(workdir, config, FLAGS.overwrite).action != "done":
                _cli.quiet_tensorflow()
            summary = train(config, workdir, overwrite=FLAGS.overwrite)
        except (ValueError, FileNotFoundError, ConnectionError, _extras.MissingExtraError) as error:
            print(f"noisy_keras.train: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            status = RunDir(workdir).read_status() if workdir else None
            where = (
                f"; {status['message']} ({workdir})"
                if status and status.get("status") == "interrupted"
                else ""
            )
            print(f"noisy_keras.train: interrupted{where}", file=sys.stderr)
            return _cli.EXIT_INTERRUPTED
    print(summary_line(summary))
    return 0 if summary["status"] == "done" else 1


def run() -> None:
    """Console-script entry point (`noisy-keras-train`)."""
    define_flags()
    _cli.run_app(main, "noisy_keras.train")


if __name__ == "__main__":
    run()
