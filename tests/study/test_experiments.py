"""The experiment runner: grid x seeds, resume without redoing finished runs, tables."""

import csv
import math
import os
import subprocess
import sys

import pytest

from noisy_keras.analysis import plots
from noisy_keras.run import config as config_lib
from noisy_keras.run import train as train_lib
from noisy_keras.study import experiments, grid, reports, temperatures

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = """# a tiny recipe for tests
--dataset=digits
--model=mlp
--epochs=1
--base_learning_rate=0.05
--xla=false
"""


@pytest.fixture()
def flagfile(tmp_path):
    path = tmp_path / "tiny.flags"
    path.write_text(BASE)
    return str(path)


def test_read_flagfile_and_config_from_strings(flagfile, tmp_path):
    values = config_lib.read_flagfile(flagfile)
    assert values == {
        "dataset": "digits",
        "model": "mlp",
        "epochs": "1",
        "base_learning_rate": "0.05",
        "xla": "false",
    }
    config = config_lib.config_from_strings({**values, "lr_decay_epochs": "3,4", "augment": "0"})
    assert (config.epochs, config.base_learning_rate, config.lr_decay_epochs) == (1, 0.05, (3, 4))
    with pytest.raises(ValueError, match=r"Unknown flag --batchsize; valid: .*batch_size"):
        config_lib.config_from_strings({"batchsize": "3"})
    with pytest.raises(ValueError, match=r"--epochs='ten' is not a valid int"):
        config_lib.config_from_strings({"epochs": "ten"})
    bad = tmp_path / "bad.flags"
    bad.write_text("--model=mlp\nbatch_size 3\n")
    with pytest.raises(ValueError, match=r"bad.flags:2: expected '--name=value'"):
        config_lib.read_flagfile(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.flags"):
        config_lib.read_flagfile(str(tmp_path / "missing.flags"))


def test_grid_runs_every_cell_and_seed_then_resumes_without_redoing(
    flagfile, tmp_path, monkeypatch
):
    out = str(tmp_path / "grid")
    grid = dict(out=out, flagfiles=[flagfile], batch_sizes=[128, 256], alphas=[0.0], seeds=[0, 1])

    # Interrupted grid: the third job fails, the first two are done.
    calls = []
    real_train = train_lib.train

    def flaky_train(config, workdir=None, **kwargs):
        calls.append((config.batch_size, config.seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(config, workdir, **kwargs)

    monkeypatch.setattr(train_lib, "train", flaky_train)
    with pytest.raises(KeyboardInterrupt):
        experiments.run_grid(**grid, log=lambda _: None)
    assert calls == [(128, 0), (128, 1), (256, 0)]

    plotted = {}  # the figures get the table's units: percent and percentage points
    real_plot = plots.plot_gap_vs_batch_size

    def recording_plot(groups, path, **kwargs):
        plotted[os.path.basename(path)] = (groups, kwargs)
        return real_plot(groups, path, **kwargs)

    monkeypatch.setattr(plots, "plot_gap_vs_batch_size", recording_plot)
    calls.clear()
    rows = experiments.run_grid(**grid, log=lambda _: None)
    assert calls == [(256, 0), (256, 1)]  # finished runs are not redone
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    for r in rows:
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["val_accuracy"])
        assert r["sharpness"] > 0  # top Hessian eigenvalue at a trained point

    with open(os.path.join(out, "table.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [(int(t["batch_size"]), int(t["n"])) for t in table] == [(128, 2), (256, 2)]
    by_batch = {}
    for r in rows:
        by_batch.setdefault(r["batch_size"], []).append(r["val_accuracy"])
    for t in table:
        values = by_batch[int(t["batch_size"])]
        assert float(t["val_accuracy_mean"]) == pytest.approx(sum(values) / 2)
    markdown = open(os.path.join(out, "table.md")).read()
    assert markdown.count("\n") == 4 and "| tiny | 128 | 0 | 2 |" in markdown
    for name in ("gap_tiny.png", "val_tiny.png", "noise_tiny_b256.png", "results.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    for name, metric, unit in (
        ("gap_tiny.png", "gap", "(percentage points)"),
        ("val_tiny.png", "val_accuracy", "(%)"),
    ):
        groups, kwargs = plotted[name]
        assert kwargs["ylabel"].endswith(unit)
        assert kwargs["title"] == "tiny: digits, mlp, mean over seeds, 95% CI"
        for batch_size in (128, 256):
            expected = [100.0 * r[metric] for r in rows if r["batch_size"] == batch_size]
            assert groups["no noise"][batch_size] == expected

    calls.clear()
    experiments.run_grid(**grid, log=lambda _: None)
    assert calls == []


def test_shard_splits_jobs_without_overlap(flagfile, tmp_path):
    with pytest.raises(ValueError, match="shard must be"):
        experiments.run_grid(
            out=str(tmp_path),
            flagfiles=[flagfile],
            batch_sizes=[128],
            alphas=[0.0],
            seeds=[0],
            shard=(2, 2),
        )
    with pytest.raises(ValueError, match=r"--shard must look like 'i/n'"):
        experiments._parse_shard("1-2")
    assert experiments._parse_shard("1/3") == (1, 3)


def test_the_command_line_runs_a_packaged_recipe_from_another_directory(tmp_path):
    """Default flagfiles are recipe names shipped with the package, not paths under cwd."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    argv = ["--out=grid", "--flagfiles=repro_digits", "--batch_sizes=1024", "--alphas=0"]
    argv += ["--seeds=1", "--set=epochs=2"]
    completed = subprocess.run(
        [sys.executable, "-m", "noisy_keras.experiments", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == (
        "noisy_keras.experiments: 1 runs reported in grid/table.md"
    )
    table = (tmp_path / "grid" / "table.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith("| repro_digits | 1024 | 0 | 1 |")
    flags = config_lib.read_flagfile(
        str(tmp_path / "grid" / "runs" / "repro_digits-b1024-a0" / "seed0" / "flags.txt")
    )
    assert (flags["model"], flags["epochs"], flags["batch_size"]) == ("mlp", "2", "1024")


def test_same_updates_stretches_epochs_warmup_and_decay_by_the_batch_ratio(flagfile):
    cell = grid.Cell(flagfile, 512, 0.0, grid.Noise("none"))
    base = grid.cell_config(cell, 0, {"warmup_epochs": "2", "lr_decay_epochs": "3,5"})
    config = grid.cell_config(
        cell, 0, {"warmup_epochs": "2", "lr_decay_epochs": "3,5"}, same_updates=True
    )
    assert base.base_batch_size == 32  # 512 / 32 = 16 times the epochs
    assert (config.epochs, config.warmup_epochs, config.lr_decay_epochs) == (16, 32.0, (48, 80))
    assert config.lr_decay_every == 16 * base.lr_decay_every
    same_base = grid.Cell(flagfile, 32, 0.0, grid.Noise("none"))
    assert grid.cell_config(same_base, 0, {}, same_updates=True).epochs == 1
    odd = grid.Cell(flagfile, 48, 0.0, grid.Noise("none"))
    with pytest.raises(ValueError, match=r"cell tiny-b48-none: same_updates: epochs=1 .*48/32"):
        grid.cell_config(odd, 0, {}, same_updates=True)


def test_reports_collect_every_invocation_and_compare_with_a_reference(
    flagfile, tmp_path, monkeypatch
):
    monkeypatch.setattr(experiments, "measure_sharpness", lambda workdir, config: 1.0)
    out = str(tmp_path / "grid")
    common = dict(out=out, flagfiles=[flagfile], seeds=[0, 1], log=lambda _: None)
    first = experiments.run_grid(**common, batch_sizes=[128], noises=["none"])
    second = experiments.run_grid(
        **common, batch_sizes=[256], noises=["none", "white:1e-3"], reference="tiny-b128-none"
    )
    assert [r["cell"] for r in first] == ["tiny-b128-none"] * 2  # each invocation's own rows
    assert sorted({r["cell"] for r in second}) == ["tiny-b256-a0.001", "tiny-b256-none"]
    with open(os.path.join(out, "results.csv"), newline="") as f:
        every = list(csv.DictReader(f))  # the report has both invocations' runs
    assert sorted({(r["cell"], r["seed"]) for r in every}) == [
        (cell, seed)
        for cell in ("tiny-b128-none", "tiny-b256-a0.001", "tiny-b256-none")
        for seed in ("0", "1")
    ]
    assert {r["noise"] for r in every if r["cell"] == "tiny-b256-a0.001"} == {"white"}
    # Differences: mean minus the reference's mean, Welch's interval around it.
    rows = reports.collect_rows(out)
    by_cell = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r["val_accuracy"])
    diffs = {d["cell"]: d for d in reports.differences(rows, "tiny-b128-none")}
    for cell in ("tiny-b256-none", "tiny-b256-a0.001"):
        d = diffs[cell]
        expected = sum(by_cell[cell]) / 2 - sum(by_cell["tiny-b128-none"]) / 2
        assert d["difference"] == pytest.approx(expected)
        if not math.isnan(d["ci_low"]):
            assert d["ci_low"] < d["difference"] < d["ci_high"]
            assert d["p_holm"] >= d["p_value"] and (d["p_value"] < 0.05) == d["excludes_zero"]
    assert reports.read_results_csv(os.path.join(out, "results.csv")) == [
        {k: v for k, v in r.items() if k != "workdir"} for r in rows
    ]  # the committed CSV gives back the rows the differences are computed from
    markdown = open(os.path.join(out, "differences.md")).read()
    assert "from tiny-b128-none" in markdown and "| tiny-b256-none | 2 |" in markdown
    with pytest.raises(ValueError, match=r"reference='tiny-b64-none' has no finished runs; cells"):
        reports.differences(rows, "tiny-b64-none")


def test_cell_of_run_reads_the_cell_back_and_refuses_a_renamed_directory(flagfile, tmp_path):
    for noise in ("none", "white:1e-05", "matched:32", "multiplicative:16"):
        cell = grid.grid_cells([flagfile], [64], noises=[noise])[0]
        config = grid.cell_config(cell, 3, {"lr_scaling": "none"})
        back = grid.cell_of_run(grid.run_dir("out", cell, 3), config)
        assert (back.name, back.base_name, back.kind) == (cell.name, "tiny", cell.kind)
    renamed = os.path.join("out", "runs", "renamed", "seed3")
    with pytest.raises(ValueError, match=r"'renamed' does not end with '-b64-multiplicative-n16'"):
        grid.cell_of_run(renamed, config)


def test_noise_temperature_report_measures_each_cell_against_its_small_batch(
    flagfile, tmp_path, monkeypatch
):
    monkeypatch.setattr(experiments, "measure_sharpness", lambda workdir, config: 1.0)
    out = str(tmp_path / "grid")
    experiments.run_grid(
        out=out,
        flagfiles=[flagfile],
        batch_sizes=[32, 128],
        noises=["none", "multiplicative:32"],
        overrides={"lr_scaling": "none"},
        seeds=[0],
        log=lambda _: None,
    )
    rows = reports.collect_rows(out)
    found = temperatures.noise_temperature_rows(
        rows, "tiny-b128-none", num_draws=100, max_examples=256
    )
    entries = {(e["cell"], e["point"]): e for e in found}
    assert sorted({cell for cell, _ in entries}) == [
        "tiny-b128-multiplicative-n32",
        "tiny-b128-none",
        "tiny-b32-multiplicative-n32",
        "tiny-b32-none",
    ]
    for point in ("init", "final"):
        ratio = {cell: e["ratio"] for (cell, p), e in entries.items() if p == point}
        error = {cell: e["ratio_standard_error"] for (cell, p), e in entries.items() if p == point}
        predicted = {cell: e["predicted_ratio"] for (cell, p), e in entries.items() if p == point}
        # b = B: the small batch against itself (independent draws of the same size)
        assert ratio["tiny-b32-none"] == pytest.approx(1.0, abs=4 * error["tiny-b32-none"])
        for cell in ratio:  # the measurement follows the closed forms
            assert ratio[cell] == pytest.approx(predicted[cell], abs=4 * error[cell] + 0.02)
        # without noise B=128 of 256 examples carries about 1/7 of b=32's noise (without
        # replacement); with the multiplicative weights it carries at least the small batch's
        assert predicted["tiny-b128-none"] < 0.2 and predicted["tiny-b128-multiplicative-n32"] > 0.9
    markdown = temperatures.noise_temperature_markdown(found)
    assert "| tiny-b128-none | final | 1 |" in markdown
