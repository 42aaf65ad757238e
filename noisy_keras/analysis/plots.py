"""Figures for the analysis: accuracy curves, the parametric plot, noise comparison, gap.

Every function takes plain data, draws on a new `matplotlib.figure.Figure` with the
Agg canvas (no pyplot, no global state, no display needed), writes a PNG when a
path is given, and returns the Figure so that callers and tests can inspect it.

Per-run histories may be given as

* a mapping of column name to per-epoch values (e.g. `keras.callbacks.History.history`),
* a sequence of per-epoch row mappings (e.g. the rows of a CSV log, values may be
  strings), or
* the path of such a CSV file (columns like epoch, accuracy, val_accuracy, loss,
  val_loss).

The x axis is the ``epoch`` column when present, else 1, 2, ..., n (epochs count
from 1, as in the main job's metrics.csv and Keras' progress bar), with integer
ticks. Accuracies and the gap are drawn in the units of the experiment tables:
percent and percentage points (`percent=True`, the default; `metric_label` names
each axis).

Styles follow Jaiswal & Taura's figures: training curves dotted, validation
curves solid, one colour per run (Fig. 4, 6); noise vs no noise validation curves
(Fig. 7).

References:
    S. K. Jaiswal and K. Taura, "Overcoming Generalization Gap in Large
    Mini-Batch Training of Deep Neural Networks" (Fig. 4, 6, 7).
    N. S. Keskar et al., "On Large-Batch Training for Deep Learning: Generalization
    Gap and Sharp Minima", ICLR 2017 (Fig. 2).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence

import numpy as np
import scipy.stats
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from noisy_keras._validation import is_int
from noisy_keras.analysis.interpolation import InterpolationResult
from noisy_keras.analysis.stats import summarize

TRAIN_STYLE = ":"
VALIDATION_STYLE = "-"

METRIC_LABELS = {
    "accuracy": "training accuracy",
    "val_accuracy": "validation accuracy",
    "loss": "training loss",
    "val_loss": "validation loss",
    "gap": "gap: training - validation accuracy",
}
"""Axis names of the columns the main job writes (others are shown as they are named)."""


def in_percent(metric: str) -> bool:
    """Whether `metric` is a fraction shown in percent: accuracies and the gap."""
    return metric.endswith("accuracy") or metric == "gap"


def metric_label(metric: str, percent: bool = True) -> str:
    """The axis label of `metric`, with its unit: "validation accuracy (%)", ...

    The gap is a difference of percentages, so its unit is percentage points.
    """
    label = METRIC_LABELS.get(metric, metric.replace("_", " "))
    if percent and in_percent(metric):
        return label + (" (percentage points)" if metric == "gap" else " (%)")
    return label


def _scaled(values: np.ndarray, metric: str, percent: bool) -> np.ndarray:
    return values * 100.0 if percent and in_percent(metric) else values


def _epoch_axis(axes) -> None:
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.8):
    figure = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(figure)
    axes = [figure.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return figure, axes


def _colours(count: int) -> list:
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(count)]


def _save(figure: Figure, path) -> Figure:
    if path is not None:
        path = os.fspath(path)
        if not path.lower().endswith(".png"):
            raise ValueError(f"path must name a .png file; received {path!r}.")
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(path, format="png", dpi=120)
    return figure


def _check_runs(runs, name: str) -> Mapping:
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(
            f"{name} must be a non-empty mapping of label -> data; received {type(runs).__name__}"
            + (" (empty)" if isinstance(runs, Mapping) else "")
            + "."
        )
    return runs


def history_columns(history) -> dict[str, np.ndarray]:
    """Per-epoch columns of a run as float arrays of equal length.

    Args:
        history: a mapping of column -> values, a `keras.callbacks.History`, a
            sequence of row mappings, or the path of a CSV file with a header row.

    Returns:
        A dict of column name -> float64 array; an ``epoch`` column is added as
        1..n when absent.
    """
    if hasattr(history, "history") and isinstance(history.history, Mapping):
        history = history.history
    if isinstance(history, str | os.PathLike):
        with open(history, newline="") as handle:
            history = list(csv.DictReader(handle))
    if isinstance(history, Mapping):
        columns = {str(k): np.asarray(v, dtype=np.float64).ravel() for k, v in history.items()}
    elif isinstance(history, Sequence) and all(isinstance(row, Mapping) for row in history):
        keys = list(history[0].keys()) if history else []
        try:
            columns = {k: np.asarray([float(row[k]) for row in history]) for k in keys}
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"history rows must all have the columns {keys} with numeric values: {error}"
            ) from None
    else:
        raise ValueError(
            "history must be a mapping of column -> values, a sequence of row mappings, or "
            f"a CSV path; received {type(history).__name__}."
        )
    lengths = {k: v.size for k, v in columns.items()}
    if not columns or len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise ValueError(
            f"history columns must be non-empty and of equal length; received lengths {lengths}."
        )
    if "epoch" not in columns:
        columns["epoch"] = np.arange(1, next(iter(lengths.values())) + 1, dtype=np.float64)
    return columns


def _column(columns: Mapping, key: str, run: str) -> np.ndarray:
    if key not in columns:
        raise ValueError(
            f"run {run!r} has no column {key!r}; available columns: {sorted(columns)}."
        )
    return columns[key]


def plot_accuracy_curves(
    runs: Mapping,
    path=None,
    *,
    metric: str = "accuracy",
    title: str | None = None,
    percent: bool = True,
) -> Figure:
    """Training (dotted) and validation (solid) curves per run, one colour per run (Fig. 4).

    Args:
        runs: mapping of run label (e.g. "B=32") -> history (see module docstring).
        path: where to write the PNG, or None.
        metric: the column to plot; its validation column is ``"val_" + metric``.
        title: the axes title; name what the runs are (dataset, model, batch
            size, alpha), as the main job does.
        percent: draw accuracies in percent (x100).

    Returns:
        The Figure: one axes with two lines per run, training then validation.
    """
    _check_runs(runs, "runs")
    figure, (axes,) = _new_figure()
    for colour, (label, history) in zip(_colours(len(runs)), runs.items(), strict=True):
        columns = history_columns(history)
        epochs = columns["epoch"]
        axes.plot(
            epochs,
            _scaled(_column(columns, metric, label), metric, percent),
            TRAIN_STYLE,
            color=colour,
            label=f"{label} (training)",
        )
        axes.plot(
            epochs,
            _scaled(_column(columns, "val_" + metric, label), metric, percent),
            VALIDATION_STYLE,
            color=colour,
            label=f"{label} (validation)",
        )
    _epoch_axis(axes)
    axes.set_ylabel(metric_label(metric, percent).replace("training ", ""))
    axes.set_title(title or f"{metric}: training dotted, validation solid")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_parametric(results, path=None, *, title: str | None = None) -> Figure:
    """The parametric plot (Fig. 6, after Keskar et al. Fig. 2): accuracy and loss vs a.

    Args:
        results: an `InterpolationResult`, or a mapping of label (e.g. "B=32 -> B=128")
            -> `InterpolationResult` to overlay several pairs in different colours.
        path: where to write the PNG, or None.
        title: the figure title.

    Returns:
        The Figure: left axes accuracy, right axes loss; per result a dotted
        training line and, when validation data was evaluated, a solid validation
        line.
    """
    if isinstance(results, InterpolationResult):
        results = {"": results}
    _check_runs(results, "results")
    figure, (accuracy_axes, loss_axes) = _new_figure(ncols=2)
    for colour, (label, result) in zip(_colours(len(results)), results.items(), strict=True):
        if not isinstance(result, InterpolationResult):
            raise ValueError(
                f"results[{label!r}] must be an InterpolationResult; "
                f"received {type(result).__name__}."
            )
        prefix = f"{label} " if label else ""
        for axes, key in ((accuracy_axes, "accuracy"), (loss_axes, "loss")):
            axes.plot(
                result.alphas,
                getattr(result, "train_" + key),
                TRAIN_STYLE,
                color=colour,
                label=f"{prefix}training",
            )
            validation = getattr(result, "val_" + key)
            if validation is not None:
                axes.plot(
                    result.alphas,
                    validation,
                    VALIDATION_STYLE,
                    color=colour,
                    label=f"{prefix}validation",
                )
    for axes, key in ((accuracy_axes, "accuracy"), (loss_axes, "loss")):
        axes.set_xlabel("a  (theta = (1 - a) theta_S + a theta_L)")
        axes.set_ylabel(key)
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    figure.suptitle(title or "Parametric plot: training dotted, validation solid")
    return _save(figure, path)


def _as_run_list(runs) -> list:
    """One history, or a sequence of histories, as a list of histories."""
    if isinstance(runs, Mapping | str | os.PathLike) or hasattr(runs, "history"):
        return [runs]
    if isinstance(runs, Sequence) and runs:
        first = runs[0]
        if isinstance(first, Mapping) and all(np.ndim(v) == 0 for v in first.values()):
            return [runs]  # the per-epoch rows of a single run
        return list(runs)
    raise ValueError(f"each group must hold at least one run; received {runs!r}.")


def plot_noise_comparison(
    groups: Mapping,
    path=None,
    *,
    metric: str = "val_accuracy",
    confidence: float = 0.95,
    title: str | None = None,
    percent: bool = True,
) -> Figure:
    """Validation curves of groups of runs, e.g. without and with gradient noise (Fig. 7).

    Each group is one run or several runs (seeds) of one configuration; the line is
    the per-epoch mean over its runs, and with two or more runs a shaded band shows
    the Student-t confidence interval of that mean.

    Args:
        groups: mapping of label (e.g. "no noise", "alpha=1e-5") -> a history or a
            sequence of histories with the same number of epochs.
        path: where to write the PNG, or None.
        metric: the column to plot (default ``"val_accuracy"``).
        confidence: level of the band.
        title: the axes title.
        percent: draw accuracies in percent (x100).

    Returns:
        The Figure: one solid line per group (and one band per group of >= 2 runs).
    """
    _check_runs(groups, "groups")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1; received {confidence!r}.")
    figure, (axes,) = _new_figure()
    for colour, (label, runs) in zip(_colours(len(groups)), groups.items(), strict=True):
        histories = [history_columns(run) for run in _as_run_list(runs)]
        curves = [
            _scaled(_column(columns, metric, label), metric, percent) for columns in histories
        ]
        if len({curve.size for curve in curves}) != 1:
            raise ValueError(
                f"the runs of group {label!r} must have the same number of epochs; received "
                f"{[curve.size for curve in curves]}."
            )
        stacked = np.stack(curves)
        mean = stacked.mean(axis=0)
        epochs = histories[0]["epoch"]
        axes.plot(epochs, mean, VALIDATION_STYLE, color=colour, label=f"{label} (n={len(curves)})")
        if len(curves) >= 2:
            quantile = scipy.stats.t.ppf(0.5 + confidence / 2.0, df=len(curves) - 1)
            half = quantile * stacked.std(axis=0, ddof=1) / np.sqrt(len(curves))
            axes.fill_between(epochs, mean - half, mean + half, color=colour, alpha=0.2)
    _epoch_axis(axes)
    axes.set_ylabel(metric_label(metric, percent))
    axes.set_title(
        title or f"{metric_label(metric, False)}, mean over runs with {confidence:.0%} CI"
    )
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_gap_vs_batch_size(
    gaps: Mapping,
    path=None,
    *,
    confidence: float = 0.95,
    ylabel: str = "generalization gap (training - validation accuracy)",
    title: str | None = None,
) -> Figure:
    """Generalization gap vs batch size, mean and confidence interval per group.

    The values are drawn as given (any per-seed quantity works, e.g. sharpness);
    pass gaps and accuracies in the units of your tables with a `ylabel` that
    says so (the experiment runner passes percentage points).

    Args:
        gaps: mapping of group label (e.g. "no noise", "alpha=1e-5") -> mapping of
            batch size -> sequence of gap values (one per seed).
        path: where to write the PNG, or None.
        confidence: level of the error bars (Student t; no bar for a single seed).
        ylabel: the y-axis label.
        title: the axes title.

    Returns:
        The Figure: one errorbar series per group, batch sizes ascending on a
        log2 axis; the bars span the confidence interval of the mean.
    """
    _check_runs(gaps, "gaps")
    figure, (axes,) = _new_figure()
    for colour, (label, by_batch) in zip(_colours(len(gaps)), gaps.items(), strict=True):
        if not isinstance(by_batch, Mapping) or not by_batch:
            raise ValueError(
                f"gaps[{label!r}] must be a non-empty mapping of batch size -> values; "
                f"received {by_batch!r}."
            )
        for batch_size in by_batch:
            if not is_int(batch_size) or batch_size < 1:
                raise ValueError(
                    f"gaps[{label!r}] keys must be positive integer batch sizes; "
                    f"received {batch_size!r}."
                )
        sizes = sorted(by_batch)
        summaries = [summarize(by_batch[b], confidence=confidence) for b in sizes]
        means = np.array([s.mean for s in summaries])
        errors = np.array([s.half_width for s in summaries])
        axes.errorbar(sizes, means, yerr=errors, fmt="o-", color=colour, capsize=4, label=label)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("batch size")
    axes.set_ylabel(ylabel)
    axes.set_title(title or f"mean over seeds with {confidence:.0%} CI")
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    return _save(figure, path)
