"""Tables, differences and figures of a grid's finished runs (`noisy_keras.experiments`).

Everything is read back from the run directories under OUT/runs (each run's
summary.json and flags.txt), so runs made by several invocations of the runner
(different flagfiles, batch sizes or noises into the same OUT) are reported
together.

Outputs in OUT:
    results.csv      one row per run
    table.csv/.md    per cell: n, mean, sd and 95% CI (Student t) of final validation
                     accuracy, training accuracy, gap, sharpness and wall time
                     (accuracies in %, the gap in percentage points in table.md)
    differences.csv/.md   with a reference cell: each cell's mean minus the reference's,
                     with Welch's 95% CI and p-value (`noisy_keras.analysis.stats.welch_difference`)
                     and Holm's adjusted p-value over the cells (`write_differences`)
    gap_<config>.png, val_<config>.png     gap / validation accuracy vs batch size (same units)
    noise_<config>_b<B>.png                validation curves with and without noise
"""

from __future__ import annotations

import csv
import glob
import math
import os

from noisy_keras import _extras
from noisy_keras.engine.rundir import SUMMARY_FILE, RunDir, write_csv
from noisy_keras.run import config as config_lib
from noisy_keras.run.rundir_rules import read_run_config
from noisy_keras.study import grid as grid_lib
from noisy_keras.study import temperatures

METRICS = ("val_accuracy", "train_accuracy", "gap", "sharpness", "wall_time_s")


def run_row(
    cell: grid_lib.Cell, seed: int, summary: dict, workdir: str, config: config_lib.TrainConfig
) -> dict:
    """One run's row of results.csv: its cell, seed, status and metrics."""
    return {
        "cell": cell.name,
        "base": cell.base_name,
        "batch_size": cell.batch_size,
        "noise": cell.kind.kind,
        "alpha": cell.alpha,
        "noise_batch_size": cell.kind.batch_size,
        "noise_label": cell.label,
        "legend": cell.legend,
        "seed": seed,
        "status": summary["status"],
        **{m: float(summary.get(m, float("nan"))) for m in METRICS},
        "epochs": config.epochs,
        "dataset": config.dataset,
        "model": config.model,
        "workdir": workdir,
    }


def collect_rows(out: str) -> list[dict]:
    """The rows of every run under OUT/runs with a summary.json, in cell and seed order.

    Cells are ordered by base flagfile, batch size, then noise: none, white (by
    alpha), matched, multiplicative (by b).

    A run's cell and seed are read back from its flags.txt and its directory
    name (`grid.cell_of_run`), so the runs of several invocations of the runner
    are collected alike.
    """
    rows = []
    pattern = os.path.join(out, "runs", "*", "seed*", SUMMARY_FILE)
    for summary_path in glob.glob(pattern):
        workdir = os.path.dirname(summary_path)
        run = RunDir(workdir)
        summary = run.read_summary()
        if summary is None or not os.path.exists(run.flags_path):
            continue
        config = read_run_config(workdir)
        cell = grid_lib.cell_of_run(workdir, config)
        rows.append(run_row(cell, config.seed, summary, workdir, config))
    rows.sort(
        key=lambda r: (
            r["base"], r["batch_size"], config_lib.NOISE_KINDS.index(r["noise"]), r["alpha"],
            r["noise_batch_size"], r["cell"], r["seed"],
        )
    )  # fmt: skip
    return rows


_TEXT_COLUMNS = ("cell", "base", "noise", "noise_label", "legend", "status", "dataset", "model")
_INTEGER_COLUMNS = ("batch_size", "noise_batch_size", "seed", "epochs")


def read_results_csv(path: str) -> list[dict]:
    """The rows of a results.csv as `collect_rows` made them (numbers as numbers).

    The committed results of a study keep results.csv, not the run directories; the
    differences can be recomputed from it (`write_differences`).
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key not in _TEXT_COLUMNS:
                row[key] = int(float(value)) if key in _INTEGER_COLUMNS else float(value)
    return rows


def write_differences(out: str, rows: list[dict], reference: str, name: str = "differences"):
    """Writes OUT/NAME.csv and OUT/NAME.md: `differences` of validation accuracy and of the gap.

    Holm's correction runs over each table's cells (the comparisons with `reference`).
    """
    diffs = differences(rows, reference) + differences(rows, reference, "gap")
    _write_csv(os.path.join(out, f"{name}.csv"), diffs)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(differences_markdown(diffs[: len(diffs) // 2]) + "\n")
        f.write(differences_markdown(diffs[len(diffs) // 2 :]))
    return diffs


def summarize_rows(rows: list[dict]) -> list[dict]:
    """Per cell: n and mean, sd, 95% CI of every metric over the finished seeds."""
    from noisy_keras.analysis import stats

    table = []
    cells = {}
    for row in rows:
        key = (row["base"], row["batch_size"], row.get("noise_label", f"{row['alpha']:g}"))
        cells.setdefault(key, []).append(row)
    for (base, batch_size, label), members in cells.items():
        done = [r for r in members if r["status"] == "done"]
        entry = {
            "base": base,
            "batch_size": batch_size,
            "noise": members[0].get("noise", "white"),
            "alpha": members[0]["alpha"],
            "noise_batch_size": members[0].get("noise_batch_size", 0),
            "noise_label": label,
            "n": len(done),
        }
        entry["diverged"] = sum(r["status"] == "diverged" for r in members)
        for metric in METRICS:
            values = [r[metric] for r in done if math.isfinite(r[metric])]
            if values:
                s = stats.summarize(values)
                entry.update(
                    {
                        f"{metric}_mean": s.mean,
                        f"{metric}_sd": s.std,
                        f"{metric}_ci_low": s.ci_low,
                        f"{metric}_ci_high": s.ci_high,
                    }
                )
        table.append(entry)
    return table


def _fmt(entry: dict, metric: str, scale: float = 100.0, digits: int = 1) -> str:
    mean = entry.get(f"{metric}_mean")
    if mean is None:
        return "-"
    low, high = entry[f"{metric}_ci_low"], entry[f"{metric}_ci_high"]
    if math.isnan(low):
        return f"{scale * mean:.{digits}f}"
    half = scale * (high - low) / 2
    return f"{scale * mean:.{digits}f} ± {half:.{digits}f}"


def markdown_table(table: list[dict]) -> str:
    """The per-cell table in Markdown: mean ± 95% CI half-width (accuracies in %)."""
    lines = [
        "| config | B | noise | n | val acc % | train acc % | gap (pp) | sharpness | time s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        lines.append(
            f"| {e['base']} | {e['batch_size']} | {e['noise_label']} | {e['n']} | "
            f"{_fmt(e, 'val_accuracy')} | {_fmt(e, 'train_accuracy')} | {_fmt(e, 'gap')} | "
            f"{_fmt(e, 'sharpness', 1.0, 2)} | {_fmt(e, 'wall_time_s', 1.0, 0)} |"
        )
    return "\n".join(lines) + "\n"


def _write_csv(path: str, rows: list[dict]) -> None:
    keys = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    write_csv(path, rows, keys)


def _what(rows: list[dict]) -> str:
    """Dataset and model of a config's runs, for figure titles."""
    names = sorted({f"{r.get('dataset', '?')}, {r.get('model', '?')}" for r in rows})
    return "; ".join(names)


def write_figures(out: str, rows: list[dict]) -> list[str]:
    """Gap and validation accuracy vs batch size per base config; noise comparison curves.

    Accuracies in percent and the gap in percentage points, as in table.md;
    titles name the config, dataset and model (and the batch size of the
    noise comparison); alpha is in each legend.
    """
    from noisy_keras.analysis import plots

    written = []
    for base in sorted({r["base"] for r in rows}):
        done = [r for r in rows if r["base"] == base and r["status"] == "done"]
        if not done:
            continue
        what = _what(done)
        for metric, prefix, label in (
            ("gap", "gap", "final gap: training - validation accuracy (percentage points)"),
            ("val_accuracy", "val", "final validation accuracy (%)"),
        ):
            groups = {}
            for r in done:
                name = r["legend"]
                groups.setdefault(name, {}).setdefault(r["batch_size"], []).append(
                    100.0 * r[metric]
                )
            path = os.path.join(out, f"{prefix}_{base}.png")
            plots.plot_gap_vs_batch_size(
                groups, path, ylabel=label, title=f"{base}: {what}, mean over seeds, 95% CI"
            )
            written.append(path)
        largest = max(r["batch_size"] for r in done)
        curves = {}
        for r in done:
            if r["batch_size"] == largest:
                name = r["legend"]
                curves.setdefault(name, []).append(RunDir(r["workdir"]).read_metrics())
        path = os.path.join(out, f"noise_{base}_b{largest}.png")
        plots.plot_noise_comparison(
            curves, path, title=f"{base}: {what}, B={largest}, mean over seeds, 95% CI"
        )
        written.append(path)
    plt = _extras.require("matplotlib.pyplot", "noisy_keras.study.reports")
    plt.close("all")
    return written


def differences(rows: list[dict], reference: str, metric: str = "val_accuracy") -> list[dict]:
    """Per cell: its mean of `metric` minus the reference cell's, with Welch's 95% CI.

    Each entry also holds Welch's two-sided p-value and, for the family of every
    cell compared with the reference in this table, Holm's adjusted p-value
    (`noisy_keras.analysis.stats.holm_adjust`): read a difference as established
    only where the adjusted value is small.

    Args:
        rows: run rows (`collect_rows`); only finished runs count.
        reference: the name of the reference cell (`Cell.name`, the `cell` column).
        metric: a metric of `METRICS`.

    Raises:
        ValueError: the reference cell has no finished runs, naming the cells there are.
    """
    from noisy_keras.analysis import stats

    values = {}
    for row in rows:
        if row["status"] == "done" and math.isfinite(row[metric]):
            values.setdefault(row["cell"], []).append(row[metric])
    if reference not in values:
        raise ValueError(
            f"reference={reference!r} has no finished runs; cells: {', '.join(sorted(values))}."
        )
    table = []
    for cell, sample in values.items():
        if cell == reference:
            continue
        entry = {"cell": cell, "reference": reference, "metric": metric, "n": len(sample)}
        entry["n_reference"] = len(values[reference])
        if len(sample) >= 2 and len(values[reference]) >= 2:
            d = stats.welch_difference(sample, values[reference])
            entry.update(
                difference=d.difference,
                ci_low=d.ci_low,
                ci_high=d.ci_high,
                df=d.df,
                excludes_zero=d.ci_low > 0 or d.ci_high < 0,
                p_value=d.p_value,
            )
        else:
            mean = sum(sample) / len(sample) - sum(values[reference]) / len(values[reference])
            nan = float("nan")
            entry.update(
                difference=mean, ci_low=nan, ci_high=nan, df=nan, excludes_zero=False, p_value=nan
            )
        table.append(entry)
    tested = [e for e in table if not math.isnan(e["p_value"])]
    for entry, adjusted in zip(tested, stats.holm_adjust([e["p_value"] for e in tested])):
        entry["p_holm"] = adjusted
    for entry in table:
        entry.setdefault("p_holm", float("nan"))
    return table


def differences_markdown(table: list[dict], scale: float = 100.0) -> str:
    """The differences in Markdown (percentage points for accuracies and the gap)."""
    if not table:
        return ""
    lines = [
        f"Difference of mean {table[0]['metric']} from {table[0]['reference']} "
        "(percentage points), Welch's 95% CI, Welch's p and Holm's adjusted p over the "
        f"{len(table)} cells:",
        "",
        "| cell | n | difference | 95% CI | p | Holm p |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for e in table:
        ci, p, holm = "-", "-", "-"
        if not math.isnan(e["ci_low"]):
            ci = f"[{scale * e['ci_low']:+.2f}, {scale * e['ci_high']:+.2f}]"
            p, holm = f"{e['p_value']:.3f}", f"{e['p_holm']:.3f}"
        lines.append(
            f"| {e['cell']} | {e['n']} | {scale * e['difference']:+.2f} | {ci} | {p} | {holm} |"
        )
    return "\n".join(lines) + "\n"


def write_reports(
    out: str, reference: str | None = None, noise_temperature_at: str | None = None
) -> list[dict]:
    """Collects every finished run under OUT into results.csv, table.csv/.md and figures.

    Args:
        out: the grid's output directory.
        reference: a cell name: also differences.csv/.md of validation accuracy
            and of the gap from that cell (`differences`).
        noise_temperature_at: a cell name: also noise_temperature.csv/.md, every
            cell's noise temperature at that cell's runs' weights
            (`noisy_keras.study.temperatures.noise_temperature_rows`).

    Returns:
        The rows (`collect_rows`).
    """
    rows = collect_rows(out)
    if not rows:
        return rows
    _write_csv(
        os.path.join(out, "results.csv"),
        [{k: v for k, v in r.items() if k != "workdir"} for r in rows],
    )
    table = summarize_rows(rows)
    _write_csv(os.path.join(out, "table.csv"), table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(markdown_table(table))
    if reference:
        write_differences(out, rows, reference)
    if noise_temperature_at:
        entries = temperatures.noise_temperature_rows(rows, noise_temperature_at)
        _write_csv(os.path.join(out, "noise_temperature.csv"), entries)
        with open(os.path.join(out, "noise_temperature.md"), "w") as f:
            f.write(temperatures.noise_temperature_markdown(entries))
    write_figures(out, rows)
    return rows
