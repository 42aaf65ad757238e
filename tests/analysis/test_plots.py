"""Tests for noisy_keras.analysis.plots: files written, artists counted, plotted data checked."""

import csv

import numpy as np
import pytest

from noisy_keras.analysis import (
    InterpolationResult,
    history_columns,
    metric_label,
    plot_accuracy_curves,
    plot_gap_vs_batch_size,
    plot_noise_comparison,
    plot_parametric,
    summarize,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE


HISTORY_A = {"accuracy": [0.5, 0.7, 0.9], "val_accuracy": [0.4, 0.55, 0.6]}
ROWS_B = [  # CSV rows as read by csv.DictReader: strings, epochs from 1 as the main job writes
    {"epoch": "1", "accuracy": "0.45", "val_accuracy": "0.42"},
    {"epoch": "2", "accuracy": "0.65", "val_accuracy": "0.52"},
    {"epoch": "3", "accuracy": "0.85", "val_accuracy": "0.58"},
]


def percent(values):
    return 100.0 * np.asarray(values, dtype=np.float64)


def integer_ticks(axes) -> bool:
    """Whether every x tick label of `axes` is a whole number (no half epochs)."""
    axes.figure.canvas.draw()
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    return bool(ticks) and all(float(t).is_integer() for t in ticks)


def test_accuracy_curves(tmp_path):
    csv_path = tmp_path / "run_c.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "accuracy", "val_accuracy", "loss"])
        writer.writeheader()
        writer.writerows(
            {"epoch": e, "accuracy": 0.3 + 0.1 * e, "val_accuracy": 0.2 + 0.1 * e, "loss": 1.0}
            for e in range(1, 5)
        )
    path = tmp_path / "figures" / "accuracy.png"
    figure = plot_accuracy_curves(
        {"B=32": HISTORY_A, "B=64": ROWS_B, "B=128": csv_path},
        path,
        title="digits, mlp, B=128, alpha=1e-05",
    )
    assert_png(path)
    (axes,) = figure.axes
    lines = axes.get_lines()
    assert len(lines) == 6
    assert [line.get_linestyle() for line in lines] == [":", "-"] * 3
    assert [line.get_label() for line in lines[:2]] == ["B=32 (training)", "B=32 (validation)"]
    np.testing.assert_array_equal(lines[0].get_xdata(), [1, 2, 3])  # epochs from 1
    np.testing.assert_array_equal(lines[0].get_ydata(), percent(HISTORY_A["accuracy"]))
    np.testing.assert_array_equal(lines[1].get_ydata(), percent(HISTORY_A["val_accuracy"]))
    np.testing.assert_array_equal(lines[2].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(lines[3].get_ydata(), percent([0.42, 0.52, 0.58]))
    np.testing.assert_allclose(lines[5].get_ydata(), [30.0, 40.0, 50.0, 60.0])
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("epoch", "accuracy (%)")
    assert axes.get_title() == "digits, mlp, B=128, alpha=1e-05" and integer_ticks(axes)
    colours = [line.get_color() for line in lines]
    assert colours[0] == colours[1] and colours[2] == colours[3] and colours[4] == colours[5]
    assert len({colours[0], colours[2], colours[4]}) == 3
    loss_figure = plot_accuracy_curves(
        {"r": {"loss": [2.0, 1.0], "val_loss": [2.5, 1.5]}}, metric="loss"
    )
    np.testing.assert_array_equal(loss_figure.axes[0].get_lines()[1].get_ydata(), [2.5, 1.5])
    assert loss_figure.axes[0].get_ylabel() == "loss"
    fractions = plot_accuracy_curves({"r": HISTORY_A}, percent=False)
    np.testing.assert_array_equal(fractions.axes[0].get_lines()[0].get_ydata(), [0.5, 0.7, 0.9])


def test_metric_labels_carry_the_units_of_the_tables():
    assert metric_label("val_accuracy") == "validation accuracy (%)"
    assert metric_label("gap") == "gap: training - validation accuracy (percentage points)"
    assert metric_label("val_loss") == "validation loss"
    assert metric_label("val_accuracy", percent=False) == "validation accuracy"


def interpolation_result(offset, with_validation=True):
    alphas = np.linspace(-1, 2, 5)
    return InterpolationResult(
        alphas=alphas,
        train_loss=alphas**2 + offset,
        train_accuracy=1.0 - 0.1 * alphas**2,
        val_loss=alphas**2 + offset + 0.5 if with_validation else None,
        val_accuracy=0.9 - 0.1 * alphas**2 if with_validation else None,
        batchnorm="interpolate",
    )


def test_parametric_plot(tmp_path):
    first, second = interpolation_result(0.0), interpolation_result(1.0, with_validation=False)
    path = tmp_path / "parametric.png"
    figure = plot_parametric({"32 vs 64": first, "32 vs 128": second}, path)
    assert_png(path)
    accuracy_axes, loss_axes = figure.axes
    assert len(accuracy_axes.get_lines()) == 3 and len(loss_axes.get_lines()) == 3
    train, validation, other_train = loss_axes.get_lines()
    np.testing.assert_array_equal(train.get_xdata(), first.alphas)
    np.testing.assert_array_equal(train.get_ydata(), first.train_loss)
    np.testing.assert_array_equal(validation.get_ydata(), first.val_loss)
    np.testing.assert_array_equal(other_train.get_ydata(), second.train_loss)
    assert (train.get_linestyle(), validation.get_linestyle()) == (":", "-")
    np.testing.assert_array_equal(accuracy_axes.get_lines()[1].get_ydata(), first.val_accuracy)
    single = plot_parametric(first)
    assert [line.get_label() for line in single.axes[0].get_lines()] == ["training", "validation"]


def test_noise_comparison_mean_and_band():
    seeds = [
        {"val_accuracy": [0.5, 0.6, 0.7]},
        {"val_accuracy": [0.52, 0.63, 0.69]},
        {"val_accuracy": [0.49, 0.58, 0.74]},
    ]
    figure = plot_noise_comparison({"alpha=1e-5": seeds, "no noise": ROWS_B})
    (axes,) = figure.axes
    noisy, plain = axes.get_lines()
    stacked = percent([s["val_accuracy"] for s in seeds])
    np.testing.assert_allclose(noisy.get_ydata(), stacked.mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(plain.get_ydata(), percent([0.42, 0.52, 0.58]))
    np.testing.assert_array_equal(plain.get_xdata(), [1, 2, 3])
    assert noisy.get_label() == "alpha=1e-5 (n=3)" and plain.get_label() == "no noise (n=1)"
    assert axes.get_ylabel() == "validation accuracy (%)" and integer_ticks(axes)
    assert len(axes.collections) == 1  # a band only for the group with several runs
    vertices = axes.collections[0].get_paths()[0].vertices
    summaries = [summarize(stacked[:, e]) for e in range(3)]
    assert vertices[:, 1].max() == pytest.approx(max(s.ci_high for s in summaries), rel=1e-12)
    assert vertices[:, 1].min() == pytest.approx(min(s.ci_low for s in summaries), rel=1e-12)
    with pytest.raises(ValueError, match="same number of epochs"):
        plot_noise_comparison({"g": [{"val_accuracy": [0.1, 0.2]}, {"val_accuracy": [0.1]}]})


def test_gap_vs_batch_size(tmp_path):
    gaps = {
        "no noise": {128: [0.20, 0.25, 0.22], 32: [0.05, 0.07, 0.06], 64: [0.1, 0.12, 0.11]},
        "alpha=1e-5": {32: [0.05, 0.06, 0.05], 128: [0.15]},
    }
    path = tmp_path / "gap.png"
    figure = plot_gap_vs_batch_size(gaps, path)
    assert_png(path)
    (axes,) = figure.axes
    assert axes.get_xscale() == "log" and len(axes.containers) == 2
    container = axes.containers[0]
    line = container.lines[0]
    np.testing.assert_array_equal(line.get_xdata(), [32, 64, 128])
    expected = [summarize(gaps["no noise"][b]) for b in (32, 64, 128)]
    np.testing.assert_allclose(line.get_ydata(), [s.mean for s in expected], rtol=1e-12)
    segments = container.lines[2][0].get_segments()
    np.testing.assert_allclose([seg[0][1] for seg in segments], [s.ci_low for s in expected])
    np.testing.assert_allclose([seg[1][1] for seg in segments], [s.ci_high for s in expected])
    assert [c.get_label() for c in axes.containers] == ["no noise", "alpha=1e-5"]


def test_bad_input_raises(tmp_path):
    with pytest.raises(ValueError, match="runs must be a non-empty mapping"):
        plot_accuracy_curves({})
    with pytest.raises(ValueError, match="run 'B=32' has no column 'val_accuracy'"):
        plot_accuracy_curves({"B=32": {"accuracy": [0.1, 0.2]}})
    with pytest.raises(ValueError, match="equal length"):
        history_columns({"accuracy": [0.1, 0.2], "val_accuracy": [0.1]})
    with pytest.raises(ValueError, match="numeric"):
        history_columns([{"accuracy": "high"}])
    with pytest.raises(ValueError, match="path must name a .png file"):
        plot_accuracy_curves({"r": HISTORY_A}, tmp_path / "curves.jpg")
    with pytest.raises(ValueError, match="must be an InterpolationResult"):
        plot_parametric({"pair": {"alphas": [0.0]}})
    with pytest.raises(ValueError, match="keys must be positive integer batch sizes"):
        plot_gap_vs_batch_size({"g": {"32": [0.1]}})
    with pytest.raises(ValueError, match="values must all be finite"):
        plot_gap_vs_batch_size({"g": {32: [0.1, float("nan")]}})
