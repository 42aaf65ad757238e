"""The run directory: the files a run writes, how they are written, and who may replace them.

A run of the main job owns one directory:

    flags.txt        the resolved flags; `--flagfile=WORKDIR/flags.txt` reruns the run
    status.json      running / done / diverged
    metrics.csv      one row per epoch (see `METRICS_COLUMNS`)
    tensorboard/     TensorBoard logs
    checkpoints/     for exact resume after a crash (rerun the same command)
    model.keras      the final model
    accuracy.png     training (dotted) and validation (solid) accuracy, as in the paper's Fig. 4
    summary.json     final numbers, also printed as one line

Every file is replaced atomically (`atomic_write_text`): a reader sees the old
or the new file, never a part of one. Nothing in a directory is deleted
unless the caller asks to overwrite it.

This module imports neither TensorFlow nor Keras at import time (the metrics
callback imports Keras when it is made).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time

from noisy_keras import config as config_lib

FLAGS_FILE = "flags.txt"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.keras"
PLOT_FILE = "accuracy.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
STATUSES = ("running", "done", "diverged")
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
    "METRICS_COLUMNS",
    "STATUSES",
    "atomic_write_text",
    "metrics_csv_callback",
    "prepare_workdir",
    "read_json",
    "read_metrics",
    "read_status",
    "write_json",
    "write_status",
]


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` so that readers see the old or the new file, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
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
        status: one of "running", "done", "diverged".
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


def prepare_workdir(workdir: str, config: config_lib.TrainConfig, overwrite: bool = False) -> None:
    """Creates `workdir`, or checks that the run already in it has the same configuration.

    Nothing in an existing work directory is deleted unless `overwrite` is True.
    Fields in `config_lib.RESUMABLE_FIELDS` may differ (more epochs resume the run).

    Raises:
        ValueError: the work directory holds a run with a different configuration,
            or files that are not a run of this program.
    """
    flagfile = os.path.join(workdir, FLAGS_FILE)
    if os.path.isdir(workdir) and os.listdir(workdir):
        if overwrite:
            shutil.rmtree(workdir)
        elif not os.path.exists(flagfile):
            raise ValueError(
                f"--workdir={workdir!r} is not empty and holds no flags.txt, so it is not a run "
                "of noisy_keras.train; choose another --workdir (nothing was deleted)."
            )
        else:
            saved = config_lib.read_flagfile(flagfile)
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
    os.makedirs(workdir, exist_ok=True)
    atomic_write_text(flagfile, config.to_flagfile() + f"--workdir={workdir}\n")


# ---------------------------------------------------------------------------
# metrics.csv
# ---------------------------------------------------------------------------


def _write_rows(path: str, rows: list) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, METRICS_COLUMNS)
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


def metrics_csv_callback(path: str, start_time: float):
    """A Keras callback that appends one row per epoch to `path` (see `METRICS_COLUMNS`).

    It survives resume: when training (re)starts at epoch e, the rows of
    epochs >= e (to be trained again) are dropped first.
    """
    import keras

    class MetricsCSV(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.initial_epoch = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.initial_epoch is None:
                self.initial_epoch = epoch
                rows = read_metrics(path) if os.path.exists(path) else []
                _write_rows(path, [r for r in rows if int(r["epoch"]) < epoch])

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            optimizer = self.model.optimizer
            noisy = optimizer  # under mixed_float16 a LossScaleOptimizer wraps the NoisyOptimizer
            while not hasattr(noisy, "noise_stddev") and hasattr(noisy, "inner_optimizer"):
                noisy = noisy.inner_optimizer
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
                "noise_stddev": float(getattr(noisy, "noise_stddev", 0.0)),
                "wall_time_s": round(time.time() - start_time, 3),
            }
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, METRICS_COLUMNS).writerow(row)
                f.flush()
                os.fsync(f.fileno())

    return MetricsCSV()
