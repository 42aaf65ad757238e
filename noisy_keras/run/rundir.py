"""The run directory: the files a run writes, how they are written, and who may replace them.

A run of the main job owns one directory:

    .noisy_keras_run the marker: this directory is a run the package made (see below)
    flags.txt        the resolved flags; `--flagfile=WORKDIR/flags.txt` reruns the run
    status.json      running / done / diverged / interrupted / failed
    metrics.csv      one row per epoch (see `METRICS_COLUMNS`)
    tensorboard/     TensorBoard logs
    checkpoints/     for exact resume after a crash (rerun the same command)
    model.keras      the final model
    accuracy.png     training (dotted) and validation (solid) accuracy, as in the paper's Fig. 4
    summary.json     final numbers, also printed as one line

The contract, decided by `check_workdir` before anything is created:

* A directory is a run when it holds the marker `RUN_MARKER`, which the package
  writes when it creates the directory. A missing or empty directory becomes a
  new run; any other directory is refused, and nothing in it is touched.
* A run is resumed when its saved flags equal the new ones, except for
  `config.RESUMABLE_FIELDS` (more epochs continue it; data location and
  verbosity do not change what is trained). A run whose summary says "done"
  after the same number of epochs is left exactly as it is.
* `overwrite` replaces a run: it deletes the run's own files (`RUN_FILES`) and
  nothing else. It refuses a directory that is not a run, a run holding other
  files, and `.`, a parent of the current directory, the home directory or `/`,
  whatever they hold.

Epochs are counted from 1 everywhere (metrics.csv, plots, summary, log lines,
like Keras' progress bar): the row of epoch e describes the e-th epoch. Its
`learning_rate` and `noise_stddev` are those of the epoch's first parameter
update, update (e - 1) * updates_per_epoch counted from 0 (the step-decayed
rate is constant over an epoch, so the row of epoch 26 is the first to show
the decay applied after 25 epochs). `wall_time_s` is the training time up to
the end of the epoch, summed over the sessions that trained it (a resumed run
continues the count; an interrupted epoch's time is not counted).

Every file is replaced atomically (`atomic_write_text`): a reader sees the old
or the new file, never a part of one.

This module imports neither TensorFlow nor Keras at import time (the metrics
callback imports Keras when it is made).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time

from noisy_keras.run import config as config_lib

RUN_MARKER = ".noisy_keras_run"
FLAGS_FILE = "flags.txt"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"
PLOT_FILE = "accuracy.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
RUN_FILES = (
    RUN_MARKER,
    FLAGS_FILE,
    STATUS_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    MODEL_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
    CHECKPOINT_DIR,
)
"""Everything a run writes in its directory; `--overwrite` deletes these and nothing else."""
_TEMPORARY_PREFIXES = (".tmp-",)  # atomic_write_text's temporary files
_TEMPORARY_SUFFIXES = (".tmp",)  # the metrics CSV's rewrite
STATUSES = ("running", "done", "diverged", "interrupted", "failed")
FINAL_STATUSES = ("done", "diverged", "interrupted", "failed")
METRICS_COLUMNS = (
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
ACTIONS = ("create", "resume", "overwrite", "done")

__all__ = [
    "ACTIONS",
    "FINAL_STATUSES",
    "METRICS_COLUMNS",
    "RUN_FILES",
    "RUN_MARKER",
    "STATUSES",
    "WorkdirPlan",
    "atomic_write_text",
    "check_workdir",
    "make_workdir",
    "metrics_csv_callback",
    "prepare_workdir",
    "read_json",
    "read_metrics",
    "read_run_config",
    "read_status",
    "write_csv",
    "write_json",
    "write_status",
]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` so that readers see the old or the new file, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, value) -> None:
    """Writes `value` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def read_json(path: str):
    """The JSON value in `path`, or None if there is no such file."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_status(workdir: str, status: str, **details) -> None:
    """Writes `{"status": status, **details}` to `workdir/status.json`, atomically.

    Args:
        workdir: the run's directory.
        status: one of `STATUSES`: "running" while a process trains it, then
            one of `FINAL_STATUSES`.
        **details: JSON-serialisable extras (epoch, message, ...).

    Raises:
        ValueError: `status` is not one of the allowed values.
    """
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}; received {status!r}.")
    atomic_write_text(
        os.path.join(workdir, STATUS_FILE), json.dumps({"status": status, **details}, indent=1)
    )


def read_status(workdir: str) -> dict | None:
    """The run's status written by `write_status`, or None if there is none."""
    return read_json(os.path.join(workdir, STATUS_FILE))


# ---------------------------------------------------------------------------
# Who may use a directory: check first (touching nothing), then act
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorkdirPlan:
    """What a run will do with its directory, decided by `check_workdir`.

    Attributes:
        workdir: the directory as given.
        action: "create" (missing or empty), "resume" (a run with the same
            configuration), "overwrite" (a run to replace) or "done" (a run
            with the same configuration that is already finished).
        summary: the finished run's summary for "done", else None.
    """

    workdir: str
    action: str
    summary: dict | None = None


def _protected_reason(workdir: str) -> str | None:
    """Why `--overwrite` may never touch `workdir` whatever it holds, or None."""
    target = os.path.realpath(workdir)
    cwd = os.path.realpath(os.getcwd())
    home = os.path.realpath(os.path.expanduser("~"))
    if target == cwd:
        return "it is the current directory"
    if cwd.startswith(target.rstrip(os.sep) + os.sep) or target == os.sep:
        return "it is a parent of the current directory"
    if target == home:
        return "it is the home directory"
    return None


def _is_temporary(name: str) -> bool:
    return name.startswith(_TEMPORARY_PREFIXES) or name.endswith(_TEMPORARY_SUFFIXES)


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_workdir(
    workdir: str, config: config_lib.TrainConfig, overwrite: bool = False
) -> WorkdirPlan:
    """Decides what a run with `config` may do with `workdir`, touching nothing.

    Rule (see the module docstring): a missing or empty directory is created; a
    directory with `RUN_MARKER` whose flags equal `config`'s (except
    `config.RESUMABLE_FIELDS`) is resumed, or left as it is when its summary
    says "done" after `config.epochs` epochs; with `overwrite`, a run holding
    only `RUN_FILES` is replaced. Everything else is refused.

    Args:
        workdir: the run directory.
        config: the run's configuration (already validated).
        overwrite: replace the run in `workdir`.

    Returns:
        A `WorkdirPlan`.

    Raises:
        ValueError: the directory is refused; the message says what it holds
            and that nothing was deleted.
    """
    if not isinstance(workdir, str) or not workdir:
        raise ValueError(f"workdir must be a non-empty path; received {workdir!r}.")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir!r} is a file, not a directory (nothing was deleted).")
    entries = os.listdir(workdir) if os.path.isdir(workdir) else []
    protected = _protected_reason(workdir) if overwrite else None
    if protected:
        raise ValueError(
            f"--overwrite refuses --workdir={workdir!r}: {protected}"
            + (f" (it holds {_listing(entries)})" if entries else "")
            + ". Give a run directory of its own, e.g. runs/NAME (nothing was deleted)."
        )
    if not entries:
        return WorkdirPlan(workdir, "create")
    if RUN_MARKER not in entries:
        raise ValueError(
            f"--workdir={workdir!r} is not empty and is not a run directory of noisy_keras (no "
            f"{RUN_MARKER} marker); it holds {_listing(entries)}. Choose another --workdir"
            + (
                "; --overwrite deletes only run directories that noisy_keras made"
                if overwrite
                else ""
            )
            + " (nothing was deleted)."
        )
    if overwrite:
        foreign = [n for n in entries if n not in RUN_FILES and not _is_temporary(n)]
        if foreign:
            raise ValueError(
                f"--overwrite refuses --workdir={workdir!r}: besides a run it holds files the "
                f"run did not write: {_listing(foreign)}. Move them away or choose another "
                "--workdir (nothing was deleted)."
            )
        return WorkdirPlan(workdir, "overwrite")
    flagfile = os.path.join(workdir, FLAGS_FILE)
    # A field the saved flags lack was added to TrainConfig later: the run had its default.
    saved = {
        **config_lib.TrainConfig().flag_strings(),
        **(config_lib.read_flagfile(flagfile) if os.path.exists(flagfile) else {}),
    }
    wanted = config.flag_strings()
    differences = [
        f"{key}: saved {saved.get(key)!r}, now {wanted[key]!r}"
        for key in wanted
        if key not in config_lib.RESUMABLE_FIELDS and saved.get(key) != wanted[key]
    ]
    if differences:
        raise ValueError(
            f"--workdir={workdir!r} holds a run with a different configuration ("
            + "; ".join(differences)
            + "). Use another --workdir, or pass --overwrite to delete that run and "
            "start afresh (nothing was deleted)."
        )
    trained = _epochs_trained(workdir)
    if trained > config.epochs:
        raise ValueError(
            f"--workdir={workdir!r} holds a run already trained for {trained} epochs; "
            f"epochs={config.epochs} would not continue it. Pass --epochs >= {trained}, or "
            "--overwrite to start afresh (nothing was deleted)."
        )
    summary = read_json(os.path.join(workdir, SUMMARY_FILE))
    if summary and summary.get("status") == "done" and summary.get("epochs") == config.epochs:
        return WorkdirPlan(workdir, "done", summary=summary)
    return WorkdirPlan(workdir, "resume")


def _epochs_trained(workdir: str) -> int:
    """The last epoch in the run's metrics.csv (0 without one)."""
    path = os.path.join(workdir, METRICS_FILE)
    rows = read_metrics(path) if os.path.exists(path) else []
    return max((row["epoch"] for row in rows), default=0)


def make_workdir(plan: WorkdirPlan, config: config_lib.TrainConfig) -> None:
    """Carries out `plan`: creates the run directory (or empties a run for "overwrite").

    Writes the marker and flags.txt (flags.txt gets the new resumable fields on
    a resume). A "done" plan changes nothing.
    """
    workdir = plan.workdir
    if plan.action == "done":
        return
    if plan.action == "overwrite":
        for name in os.listdir(workdir):
            if name not in RUN_FILES and not _is_temporary(name):
                continue  # check_workdir refused these; never delete what the run did not write
            path = os.path.join(workdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    os.makedirs(workdir, exist_ok=True)
    marker = os.path.join(workdir, RUN_MARKER)
    if not os.path.exists(marker):
        write_json(marker, {"written_by": "noisy_keras", "contents": list(RUN_FILES)})
    atomic_write_text(
        os.path.join(workdir, FLAGS_FILE), config.to_flagfile() + f"--workdir={workdir}\n"
    )


def prepare_workdir(
    workdir: str, config: config_lib.TrainConfig, overwrite: bool = False
) -> WorkdirPlan:
    """`check_workdir`, then `make_workdir`; returns the plan.

    Raises:
        ValueError: as `check_workdir`; nothing is created or deleted then.
    """
    plan = check_workdir(workdir, config, overwrite=overwrite)
    make_workdir(plan, config)
    return plan


# ---------------------------------------------------------------------------
# metrics.csv
# ---------------------------------------------------------------------------


def write_csv(path: str, rows: list, columns=METRICS_COLUMNS) -> None:
    """Writes `rows` (dicts) under a header of `columns` atomically (a temporary file, renamed)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_run_config(workdir: str) -> config_lib.TrainConfig:
    """The config a run was made with, from its flags.txt (less the `--workdir` line).

    Fields the file lacks were added to `TrainConfig` after the run: it had their defaults.

    Raises:
        FileNotFoundError: the directory has no flags.txt.
        ValueError: the file does not parse as a config.
    """
    values = config_lib.read_flagfile(os.path.join(workdir, FLAGS_FILE))
    values.pop("workdir", None)
    return config_lib.config_from_strings(values)


def read_metrics(path: str) -> list[dict]:
    """Reads a run's metrics.csv into a list of dicts of floats (epoch as int, from 1)."""
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


def metrics_csv_callback(path: str):
    """A Keras callback that appends one row per epoch to `path` (see `METRICS_COLUMNS`).

    Row of epoch e (1-based): Keras' epoch logs (per-epoch training metrics are
    its running mean over the epoch), the gap = accuracy - val_accuracy, the
    learning rate and noise sigma of the epoch's first update (read when the
    epoch begins, `noisy_keras.noise.optimizer.current_noise_stddev` unwrapping any
    LossScaleOptimizer), and the training wall time so far. It survives resume:
    when training (re)starts at epoch e, the rows of epochs >= e (to be
    trained again) are dropped first, and the wall time continues from the row
    of epoch e - 1. An epoch cut short (a stop before its last batch, or an
    exception) gets no row.
    """
    import keras

    from noisy_keras.noise.optimizer import current_noise_stddev

    class MetricsCSV(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.first_epoch = None
            self.epoch_values = {}
            self.elapsed_before = 0.0
            self.session_start = time.time()

        def on_epoch_begin(self, epoch, logs=None):
            if self.first_epoch is None:
                self.first_epoch = epoch
                rows = read_metrics(path) if os.path.exists(path) else []
                kept = [r for r in rows if r["epoch"] <= epoch]
                write_csv(path, kept)
                self.elapsed_before = kept[-1]["wall_time_s"] if kept else 0.0
                self.session_start = time.time()
            optimizer = self.model.optimizer
            self.epoch_values = {
                "learning_rate": float(optimizer.learning_rate),
                "noise_stddev": current_noise_stddev(optimizer),
            }
            self.last_batch = -1

        def on_train_batch_end(self, batch, logs=None):
            self.last_batch = batch

        def on_epoch_end(self, epoch, logs=None):
            steps = self.params.get("steps")
            if steps is not None and self.last_batch != steps - 1:
                return  # cut short (a divergence stop): the epoch is not complete
            logs = logs or {}
            row = {
                "epoch": epoch + 1,
                "loss": logs.get("loss"),
                "accuracy": logs.get("accuracy"),
                "val_loss": logs.get("val_loss"),
                "val_accuracy": logs.get("val_accuracy"),
                "gap": (
                    logs["accuracy"] - logs["val_accuracy"]
                    if "accuracy" in logs and "val_accuracy" in logs
                    else None
                ),
                **self.epoch_values,
                "wall_time_s": round(self.elapsed_before + time.time() - self.session_start, 3),
            }
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, METRICS_COLUMNS).writerow(row)
                f.flush()
                os.fsync(f.fileno())

    return MetricsCSV()
