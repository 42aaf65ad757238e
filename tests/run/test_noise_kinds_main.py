"""Noise kinds in the main job and the experiment runner: flags, runs, grids, names."""

import csv
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from noisy_keras.engine import rundir as workdir_lib
from noisy_keras.models import zoo as models
from noisy_keras.noise.matched import MatchedNoiseOptimizer
from noisy_keras.noise.optimizer import NoisyOptimizer
from noisy_keras.run import config as config_lib
from noisy_keras.run import rundir_rules
from noisy_keras.run import train as train_lib
from noisy_keras.study import experiments, grid

# One short epoch of the digits MLP (5 updates), at the small batch's learning rate.
TINY = dict(model="mlp", batch_size=256, epochs=1, verbose=0, base_learning_rate=0.05)
SMALL = dict(lr_scaling="none", noise_alpha=0.0)


def _weights(workdir):
    model = keras.models.load_model(os.path.join(workdir, workdir_lib.MODEL_FILE))
    return model, [np.asarray(w) for w in model.get_weights()]


def _flags(workdir):
    return config_lib.read_flagfile(os.path.join(workdir, workdir_lib.FLAGS_FILE))


@pytest.fixture(scope="module")
def none_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("none") / "run")
    summary = train_lib.train(config_lib.TrainConfig(**TINY, **SMALL, noise="none"), workdir)
    return workdir, summary


@pytest.mark.parametrize("kind", ["matched", "multiplicative"])
def test_each_kind_trains_an_epoch_records_its_flags_and_changes_the_run(kind, none_run, tmp_path):
    workdir = str(tmp_path / kind)
    config = config_lib.TrainConfig(**TINY, **SMALL, noise=kind, noise_batch_size=32)
    summary = train_lib.train(config, workdir)
    assert summary["status"] == "done" and summary["val_accuracy"] > 0.15  # chance is 0.1
    assert _flags(workdir)["noise"] == kind and _flags(workdir)["noise_batch_size"] == "32"
    model, weights = _weights(workdir)
    _, plain = _weights(none_run[0])
    assert max(np.max(np.abs(a - b)) for a, b in zip(weights, plain)) > 1e-4  # noise entered
    with open(os.path.join(workdir, workdir_lib.METRICS_FILE), newline="") as f:
        sigma = float(next(csv.DictReader(f))["noise_stddev"])
    if kind == "matched":
        assert isinstance(model.optimizer, MatchedNoiseOptimizer)
        assert model.optimizer.deficit == 256 / 32 - 1
        # The row holds sigma of the epoch's last update, set by the trace measured so far:
        # the saved optimizer's (its moving average is saved with it).
        assert sigma > 0 and sigma == pytest.approx(float(model.optimizer.noise_stddev), rel=1e-6)
        # A plain `import noisy_keras` registers the class for load_model in a new process.
        code = "import sys, keras, noisy_keras; print(type(keras.models.load_model(sys.argv[1])."
        code += "optimizer).__name__)"
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        path = os.path.join(workdir, workdir_lib.MODEL_FILE)
        loaded = subprocess.run(
            [sys.executable, "-c", code, path], capture_output=True, text=True, env=env, timeout=120
        )
        assert loaded.stdout.split()[-1:] == ["MatchedNoiseOptimizer"], loaded.stderr[-2000:]
    else:  # the noise is in the loss; the optimizer adds none
        assert type(model.optimizer) is NoisyOptimizer and model.optimizer.alpha == 0.0
        assert sigma == 0.0


def test_none_is_recorded_and_zero_settings_are_bit_identical_to_it(none_run, tmp_path):
    workdir, summary = none_run
    assert summary["status"] == "done"
    assert _flags(workdir)["noise"] == "none" and _flags(workdir)["noise_alpha"] == "0.0"
    _, plain = _weights(workdir)
    for kind in ("multiplicative", "matched"):  # b = B: s^2 = 0
        config = config_lib.TrainConfig(**TINY, **SMALL, noise=kind, noise_batch_size=256)
        train_lib.train(config, str(tmp_path / kind))
        _, weights = _weights(str(tmp_path / kind))
        for a, b in zip(plain, weights, strict=True):
            np.testing.assert_array_equal(a, b)


def test_flags_resolve_the_noise_and_old_flagfiles_keep_their_meaning(flag_values, tmp_path):
    flag_values(["prog", "--noise=multiplicative", "--noise_batch_size=32", "--lr_scaling=none"])
    config = train_lib.config_from_flags(flag_values)
    # --noise_alpha belongs to white noise: unset, it is 0 for the other kinds.
    assert (config.noise, config.noise_alpha, config.noise_batch_size) == ("multiplicative", 0, 32)
    assert config.default_workdir().endswith("-b128-multiplicative-n32-s0")
    flag_values.unparse_flags()
    # A flagfile of the paper's recipe sets only --noise_alpha: white noise, as before.
    old = tmp_path / "old.flags"
    old.write_text("--batch_size=512\n--noise_alpha=0\n")
    flag_values(["prog", f"--flagfile={old}"])
    config = train_lib.config_from_flags(flag_values)
    assert (config.noise, config.noise_alpha) == ("white", 0.0)
    assert config.default_workdir().endswith("-b512-a0-s0")
    assert config_lib.config_from_strings({"noise_alpha": "1e-3"}).noise == "white"
    assert config_lib.config_from_strings({"noise": "none"}).noise_alpha == 0.0
    assert "--noise=white\n" in config_lib.TrainConfig().to_flagfile()


def test_a_run_made_before_the_noise_flags_resumes(tmp_path):
    # Its flags.txt lacks --noise and --noise_batch_size; their defaults are what it ran with.
    workdir = tmp_path / "old"
    workdir.mkdir()
    config = config_lib.TrainConfig(noise_alpha=0.0)
    lines = [s for s in config.to_flagfile().splitlines(True) if not s.startswith("--noise=")]
    lines = [s for s in lines if not s.startswith("--noise_batch_size=")]
    (workdir / "flags.txt").write_text("".join(lines))
    (workdir / workdir_lib.RUN_MARKER).write_text("")
    rundir_rules.prepare_workdir(str(workdir), config)
    with pytest.raises(ValueError, match=r"noise: saved 'white', now 'none'"):
        rundir_rules.prepare_workdir(str(workdir), config.replace(noise="none"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"noise": "matched"}, r"--noise=matched needs --noise_batch_size=b"),
        ({"noise": "multiplicative", "noise_batch_size": 512}, r"--noise_batch_size=512 exceeds "
         r"--batch_size=128"),
        ({"noise": "matched", "noise_batch_size": 32, "noise_alpha": 1e-5},
         r"--noise_alpha=1e-05 sets the white noise's size; with --noise=matched it must be 0"),
        ({"noise": "none", "noise_alpha": 1e-3}, r"--noise_alpha=0.001 .*--noise=none"),
        ({"noise": "white", "noise_batch_size": 32}, r"--noise_batch_size=32 is for "
         r"--noise=matched or multiplicative; with --noise=white it must be 0"),
        ({"noise": "multiplicative", "noise_batch_size": 32, "lr_scaling": "linear"},
         r"--noise=multiplicative with --lr_scaling=linear adds nothing"),
        ({"noise": "matched", "noise_batch_size": 32, "model": "resnet20"},
         r"--noise=matched with --model=resnet20 \(BatchNormalization\) needs "
         r"--accumulation_steps >= 2"),
        ({"noise": "loud"}, r"noise must be one of none, white, matched, multiplicative"),
    ],
)  # fmt: skip
def test_bad_combinations_are_refused_naming_the_flags_before_anything_is_written(
    changes, message, tmp_path
):
    values = {"noise_alpha": 0.0, "lr_scaling": "none", **changes}
    config = config_lib.TrainConfig(**values)
    with pytest.raises(ValueError, match=message):
        train_lib.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_resnet_guard_lists_the_models_with_batch_norm():
    assert config_lib.MODELS_WITH_BATCH_NORM == models.MODELS_WITH_BATCH_NORM
    config_lib.TrainConfig(  # with accumulation the micro-batches are the groups
        model="resnet20", lr_scaling="none", noise="matched", noise_alpha=0.0,
        noise_batch_size=32, accumulation_steps=2,
    ).replace()  # fmt: skip


# ---- The experiment runner ----------------------------------------------------------------


def test_grid_over_noise_kinds_names_cells_runs_and_tables(tmp_path, monkeypatch):
    base = tmp_path / "tiny.flags"
    base.write_text("--dataset=digits\n--model=mlp\n--epochs=1\n--lr_scaling=none\n")
    trained = []

    def fake_train(config, workdir=None, **kwargs):  # the runs themselves: test_train.py
        trained.append(config)
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, workdir_lib.FLAGS_FILE), "w") as f:
            f.write(config.to_flagfile() + f"--workdir={workdir}\n")
        row = {c: 0.5 for c in workdir_lib.METRICS_COLUMNS if c != "epoch"}
        with open(os.path.join(workdir, workdir_lib.METRICS_FILE), "w", newline="") as f:
            writer = csv.DictWriter(f, workdir_lib.METRICS_COLUMNS)
            writer.writeheader()
            writer.writerow({**row, "epoch": 0})
        summary = {"status": "done", "val_accuracy": 0.9, "train_accuracy": 0.95, "gap": 0.05}
        workdir_lib.write_json(os.path.join(workdir, workdir_lib.SUMMARY_FILE), summary)
        return summary

    monkeypatch.setattr(train_lib, "train", fake_train)
    monkeypatch.setattr(experiments, "measure_sharpness", lambda workdir, config: 2.0)
    noises = [
        grid.parse_noise(n, 16) for n in ("none", "white:1e-5", "matched", "multiplicative:32")
    ]
    out = str(tmp_path / "grid")
    rows = experiments.run_grid(
        out=out, flagfiles=[str(base)], batch_sizes=[128], noises=noises, seeds=[0],
        log=lambda _: None,
    )  # fmt: skip
    assert [(c.noise, c.noise_alpha, c.noise_batch_size) for c in trained] == [
        ("none", 0.0, 0),
        ("white", 1e-5, 0),
        ("matched", 0.0, 16),
        ("multiplicative", 0.0, 32),
    ]
    assert sorted(os.listdir(os.path.join(out, "runs"))) == [
        "tiny-b128-a1e-05",
        "tiny-b128-matched-n16",
        "tiny-b128-multiplicative-n32",
        "tiny-b128-none",
    ]
    assert [r["noise_label"] for r in rows] == [
        "none",
        "1e-05",
        "matched b=16",
        "multiplicative b=32",
    ]
    markdown = open(os.path.join(out, "table.md")).read()
    assert (
        "| config | B | noise | n |" in markdown and "| tiny | 128 | matched b=16 | 1 |" in markdown
    )
    with open(os.path.join(out, "table.csv"), newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["noise"] for t in table] == ["none", "white", "matched", "multiplicative"]


def test_bad_grids_are_refused_before_any_run(tmp_path):
    base = tmp_path / "tiny.flags"
    base.write_text("--model=mlp\n--lr_scaling=linear\n")
    out = tmp_path / "grid"
    with pytest.raises(ValueError, match=r"cell tiny-b128-matched-n32: --noise=matched with "
                       r"--lr_scaling=linear adds nothing"):  # fmt: skip
        experiments.run_grid(
            out=str(out), flagfiles=[str(base)], batch_sizes=[128], seeds=[0],
            noises=["none", "matched:32"],
        )  # fmt: skip
    assert not out.exists()
    for entry, message in (
        ("matched", r"'matched' needs a small batch b >= 1: write matched:b"),
        ("white", r"'white' is not one of none, white:ALPHA, matched\[:b\]"),
        ("none:3", r"'none:3' is not one of"),
    ):
        with pytest.raises(ValueError, match=message):
            grid.parse_noise(entry)
