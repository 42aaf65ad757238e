"""The run directory: the files a run writes, and `RunDir`, the one writer of them.

A run owns one directory. `noisy_keras.engine.fit.fit(workdir=...)` keeps its
checkpoints and status there; the main job adds the rest:

    .noisy_keras_run the marker: this directory is a run the package made (see below)
    flags.txt        the resolved flags; `--flagfile=WORKDIR/flags.txt` reruns the run
    status.json      running / done / diverged / interrupted / failed
    metrics.csv      one row per epoch (see `METRICS_COLUMNS`)
    tensorboard/     TensorBoard logs
    checkpoints/     for exact resume after a crash (rerun the same command)
    model.keras      the final model
    accuracy.png     training (dotted) and validation (solid) accuracy, as in the paper's Fig. 4
    summary.json     final numbers, also printed as one line

`RunDir` names every file and writes the bookkeeping ones (marker, flags,
status, metrics, summary); the model, the figure, the TensorBoard logs and the
checkpoints are written by their producers at the paths it gives. Who may
create, resume or replace a run directory is the main job's rule,
`noisy_keras.run.rundir_rules`. The module sits in the engine package because
the engine's `fit` is itself a resumable run in a directory: the directory's
one writer has to be importable from there.

Epochs are counted from 1 everywhere (metrics.csv, plots, summary, log lines,
like Keras' progress bar): the row of epoch e describes the e-th epoch. Its
`learning_rate` is that of the epoch's first parameter update, update
(e - 1) * updates_per_epoch counted from 0 (the step-decayed rate is constant
over an epoch, so the row of epoch 26 is the first to show the decay applied
after 25 epochs); its `noise_stddev` and `gap` are the epoch logs' values that
`noisy_keras.noise.callbacks.NoiseLogger` puts there (sigma of the epoch's
last update, e * updates_per_epoch - 1), the ones TensorBoard records too.
`wall_time_s` is the training time up to the end of the epoch, summed over
the sessions that trained it (a resumed run continues the count; an
interrupted epoch's time is not counted).

Every file is replaced atomically (`atomic_write_text`): a reader sees the old
or the new file, never a part of one.

This module imports neither TensorFlow nor Keras at import time (the metrics
callback imports Keras when it is made, the checkpoint count TensorFlow when
it is read).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
import time

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
TEMPORARY_PREFIXES = (".tmp-",)  # atomic_write_text's temporary files
TEMPORARY_SUFFIXES = (".tmp",)  # the metrics CSV's rewrite
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
__all__ = [
    "FINAL_STATUSES",
    "METRICS_COLUMNS",
    "RUN_FILES",
    "RUN_MARKER",
    "STATUSES",
    "RunDir",
    "atomic_write_text",
    "read_json",
    "read_metrics",
    "write_csv",
    "write_json",
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


def write_csv(path: str, rows: list, columns=METRICS_COLUMNS) -> None:
    """Writes `rows` (dicts) under a header of `columns` atomically (a temporary file, renamed)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


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


def is_temporary(name: str) -> bool:
    """Whether `name` is a temporary file a killed write may leave in a run directory."""
    return name.startswith(TEMPORARY_PREFIXES) or name.endswith(TEMPORARY_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class RunDir:
    """One run's directory: the path of each of its files, and the one writer of them.

    Attributes:
        path: the directory (it need not exist yet).

    Example:
        >>> run = RunDir("runs/a")
        >>> run.read_status()
        {'status': 'done', 'epochs_completed': 30, ...}
    """

    path: str

    def __post_init__(self):
        object.__setattr__(self, "path", os.fspath(self.path))

    def file(self, name: str) -> str:
        """The path of `name` (one of `RUN_FILES`) in the directory."""
        if name not in RUN_FILES:
            raise ValueError(f"name must be one of {RUN_FILES}; received {name!r}.")
        return os.path.join(self.path, name)

    @property
    def checkpoint_dir(self) -> str:
        return self.file(CHECKPOINT_DIR)

    @property
    def tensorboard_dir(self) -> str:
        return self.file(TENSORBOARD_DIR)

    @property
    def metrics_path(self) -> str:
        return self.file(METRICS_FILE)

    @property
    def model_path(self) -> str:
        return self.file(MODEL_FILE)

    @property
    def plot_path(self) -> str:
        return self.file(PLOT_FILE)

    @property
    def flags_path(self) -> str:
        return self.file(FLAGS_FILE)

    # -- creating and emptying ---------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether the directory holds the marker: a run the package made."""
        return os.path.exists(self.file(RUN_MARKER))

    def create(self, flags: str) -> None:
        """Creates the directory with its marker (kept if there) and writes flags.txt."""
        os.makedirs(self.path, exist_ok=True)
        if not self.is_run():
            write_json(
                self.file(RUN_MARKER), {"written_by": "noisy_keras", "contents": list(RUN_FILES)}
            )
        atomic_write_text(self.flags_path, flags)

    def remove_run_files(self) -> None:
        """Deletes what a run writes (`RUN_FILES` and temporary files), and nothing else."""
        for name in os.listdir(self.path):
            if name not in RUN_FILES and not is_temporary(name):
                continue  # never delete what the run did not write
            path = os.path.join(self.path, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)

    # -- status and summary ------------------------------------------------------------------

    def write_status(self, status: str, **details) -> None:
        """Writes `{"status": status, **details}` to status.json, atomically.

        Args:
            status: one of `STATUSES`: "running" while a process trains it, then
                one of `FINAL_STATUSES`.
            **details: JSON-serialisable extras (epochs_completed, message, ...).

        Raises:
            ValueError: `status` is not one of the allowed values.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}; received {status!r}.")
        atomic_write_text(
            self.file(STATUS_FILE), json.dumps({"status": status, **details}, indent=1)
        )

    def read_status(self) -> dict | None:
        """The status written by `write_status`, or None if there is none."""
        return read_json(self.file(STATUS_FILE))

    def write_summary(self, summary: dict) -> None:
        """Writes the run's final numbers to summary.json, atomically."""
        write_json(self.file(SUMMARY_FILE), summary)

    def read_summary(self) -> dict | None:
        """The summary written by `write_summary`, or None if there is none."""
        return read_json(self.file(SUMMARY_FILE))

    # -- epochs --------------------------------------------------------------------------------

    def read_metrics(self) -> list[dict]:
        """The rows of metrics.csv (see `read_metrics`); [] without the file."""
        path = self.metrics_path
        return read_metrics(path) if os.path.exists(path) else []

    def epochs_recorded(self) -> int:
        """The last epoch with a row in metrics.csv (0 without one): what the run trained.

        Needs no TensorFlow. A row is written when its epoch ends, just before
        the epoch's checkpoint, so this can be one ahead of `epochs_checkpointed`.
        """
        return max((row["epoch"] for row in self.read_metrics()), default=0)

    def epochs_checkpointed(self) -> int:
        """Epochs completed by the latest checkpoint (0 without one): where a resume starts."""
        from noisy_keras.engine import checkpointing  # TensorFlow, only when asked

        return checkpointing.checkpointed_epochs(self.checkpoint_dir)

    def metrics_callback(self):
        """A Keras callback that appends one row per epoch to metrics.csv (`METRICS_COLUMNS`).

        Row of epoch e (1-based): Keras' epoch logs (per-epoch training metrics
        are its running mean over the epoch), among them `noise_stddev` and `gap`
        as a `noisy_keras.noise.callbacks.NoiseLogger` listed before this
        callback put them there (empty without one: nothing is computed twice),
        the learning rate of the epoch's first update (read when the epoch
        begins) and the training wall time so far.
        It survives resume: when training (re)starts at epoch e, the rows of
        epochs >= e (to be trained again) are dropped first, and the wall time
        continues from the row of epoch e - 1. An epoch cut short (a stop before
        its last batch, or an exception) gets no row.
        """
        return _metrics_csv_callback(self.metrics_path)


def _metrics_csv_callback(path: str):
    import keras

    class MetricsCSV(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.first_epoch = None
            self.learning_rate = None
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
            self.learning_rate = float(self.model.optimizer.learning_rate)
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
                "gap": logs.get("gap"),
                "learning_rate": self.learning_rate,
                "noise_stddev": logs.get("noise_stddev"),
                "wall_time_s": round(self.elapsed_before + time.time() - self.session_start, 3),
            }
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, METRICS_COLUMNS).writerow(row)
                f.flush()
                os.fsync(f.fileno())

    return MetricsCSV()
