"""The compared methods in the main job and the experiment runner: flags, runs, names, refusals."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from noisy_keras.engine import rundir as workdir_lib
from noisy_keras.optim import registry
from noisy_keras.optim.sharpness import GRADIENT_METHODS, SAM, GradientNormPenalty
from noisy_keras.run import config as config_lib
from noisy_keras.run import recipe
from noisy_keras.run import train as train_lib
from noisy_keras.study import grid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One short epoch of the digits MLP (5 updates).
TINY = dict(model="mlp", batch_size=256, epochs=1, verbose=0, base_learning_rate=0.05)


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env.pop("TF_CONFIG", None)
    return env


def _weights(workdir):
    model = keras.models.load_model(os.path.join(workdir, workdir_lib.MODEL_FILE))
    return model, [np.asarray(w) for w in model.get_weights()]


def test_the_registry_names_the_methods():
    assert registry.GRADIENT_METHOD_NAMES == ("none", *GRADIENT_METHODS)


def test_the_cli_trains_sam_with_averaging_mirrored_with_xla(tmp_path):
    """As a user runs it: 2 replicas, XLA on, the SAM core compiled, the average saved."""
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "noisy_keras.train", "--model=mlp", "--method=sam"]
    argv += ["--sam_rho=0.05", "--ema_momentum=0.9", "--strategy=mirrored", "--num_devices=2"]
    argv += ["--xla=true", "--epochs=1", "--verbose=2", f"--workdir={workdir}"]
    dump = tmp_path / "xla"
    env = dict(_env(), XLA_FLAGS=f"--xla_dump_to={dump}")
    completed = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path
    )
    assert completed.returncode == 0, (completed.stdout + completed.stderr)[-4000:]
    with open(workdir / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "done" and summary["device_policy"]["replicas"] == 2
    flags = config_lib.read_flagfile(str(workdir / workdir_lib.FLAGS_FILE))
    assert (flags["method"], flags["sam_rho"], flags["ema_momentum"]) == ("sam", "0.05", "0.9")
    compiled = {name.split(".")[1] for name in os.listdir(dump) if name.startswith("module_")}
    assert any("method_loss_and_gradients" in name for name in compiled), sorted(compiled)
    model, _ = _weights(str(workdir))
    inner = model.optimizer.inner_optimizer
    assert inner.use_ema and inner.ema_momentum == pytest.approx(0.9)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("plain") / "run")
    train_lib.train(config_lib.TrainConfig(**TINY), workdir)
    return workdir


@pytest.mark.parametrize(
    "changes",
    [
        dict(method="sam", sam_rho=0.05, sam_adaptive=True),
        dict(method="gradient_norm_penalty", penalty_strength=0.05),
        dict(ema_momentum=0.5),
    ],
    ids=["asam", "penalty", "ema"],
)
def test_each_method_trains_and_changes_the_run(changes, plain_run, tmp_path):
    config = config_lib.TrainConfig(**TINY, **changes)
    workdir = str(tmp_path / "run")
    messages = []
    summary = train_lib.train(config, workdir, log=messages.append)
    assert summary["status"] == "done" and summary["val_accuracy"] > 0.15  # chance is 0.1
    # 5 updates, and an average over about 1 / (1 - 0.5) = 2: fewer than 3 / (1 - m) = 6.
    lag = [m for m in messages if "--ema_momentum=0.5 averages over about 2 updates" in m]
    assert len(lag) == ("ema_momentum" in changes), messages
    _, weights = _weights(workdir)
    _, plain = _weights(plain_run)
    assert max(np.max(np.abs(a - b)) for a, b in zip(weights, plain)) > 1e-4


def test_the_recipe_attaches_what_the_config_names():
    from noisy_keras.data.datasets import load_dataset
    from noisy_keras.engine.cores import gradient_method

    dataset = load_dataset("digits", seed=0, val_fraction=0.25)
    config = config_lib.TrainConfig(
        **TINY, method="gradient_norm_penalty", penalty_strength=0.1, optimizer="lars"
    )
    config = config.replace(penalty_gradient="double_backprop", ema_momentum=0.99)
    model = recipe.build_compiled_model(config, dataset, 0.1)
    assert gradient_method(model) == GradientNormPenalty(0.1, gradient="double_backprop")
    assert model.optimizer.inner_optimizer.use_ema  # LARS too
    sam = recipe.build_compiled_model(config_lib.TrainConfig(**TINY, method="sam"), dataset, 0.1)
    assert gradient_method(sam) == SAM(0.05)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(sam_rho=0.1), r"--sam_rho=0.1 is used by --method=sam only; received --method=none"),
        (
            dict(method="sam", penalty_strength=0.1),
            r"--penalty_strength=0.1 is used by --method=gradient_norm_penalty only",
        ),
        (dict(sam_adaptive=True), r"--sam_adaptive=true is used by --method=sam only"),
        (
            dict(method="gradient_norm_penalty"),
            r"needs --penalty_strength=lambda > 0 .*received --penalty_strength=0.0",
        ),
        (dict(method="sam", sam_rho=0.0), r"sam_rho must be > 0; received sam_rho=0.0"),
        (dict(ema_momentum=1.0), r"ema_momentum must be in \[0, 1\); received ema_momentum=1.0"),
        (dict(method="lookahead"), r"method must be one of none, sam, gradient_norm_penalty"),
    ],
)
def test_bad_settings_are_refused_naming_them(changes, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate_config(config_lib.TrainConfig(**changes))


def test_the_cli_refuses_a_setting_without_its_method_before_writing(tmp_path):
    argv = [sys.executable, "-m", "noisy_keras.train", "--penalty_strength=0.1", "--epochs=1"]
    argv.append(f"--workdir={tmp_path / 'run'}")
    completed = subprocess.run(
        argv, capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path
    )
    assert completed.returncode == 2, completed.stdout + completed.stderr
    assert "--penalty_strength=0.1 is used by --method=gradient_norm_penalty only" in (
        completed.stderr
    )
    assert not os.path.exists(tmp_path / "run")


def test_workdirs_name_the_method():
    base = config_lib.TrainConfig()
    assert base.default_workdir() == os.path.join("runs", "digits-cnn-b128-a1e-05-s0")
    cases = {
        "sam0.05": dict(method="sam"),
        "asam0.5": dict(method="sam", sam_rho=0.5, sam_adaptive=True),
        "gnp0.01-ema0.99": dict(
            method="gradient_norm_penalty", penalty_strength=0.01, ema_momentum=0.99
        ),
        "gnpdb0.01": dict(
            method="gradient_norm_penalty",
            penalty_strength=0.01,
            penalty_gradient="double_backprop",
        ),
    }
    for name, changes in cases.items():
        path = config_lib.TrainConfig(**changes).default_workdir()
        assert path == os.path.join("runs", f"digits-cnn-b128-a1e-05-{name}-s0")


@pytest.mark.parametrize(
    "entry, noise, method, name, label",
    [
        ("sam:0.05", grid.Noise("none"), grid.Method("sam", 0.05), "none-sam0.05", "none + SAM"),
        (
            "white:1e-5+asam:0.5+ema:0.99",
            grid.Noise("white", alpha=1e-5),
            grid.Method("sam", 0.5, adaptive=True, ema=0.99),
            "a1e-05-asam0.5-ema0.99",
            "1e-05 + adaptive SAM rho=0.5 + EMA 0.99",
        ),
        (
            "gnp:0.01",
            grid.Noise("none"),
            grid.Method("gradient_norm_penalty", 0.01),
            "none-gnp0.01",
            "none + grad-norm penalty lambda=0.01",
        ),
        ("ema:0.9", grid.Noise("none"), grid.Method(ema=0.9), "none-ema0.9", "none + EMA 0.9"),
        (
            "matched:32",
            grid.Noise("matched", batch_size=32),
            grid.Method(),
            "matched-n32",
            "matched",
        ),
    ],
)
def test_runner_kinds_parse_name_configure_and_read_back(
    entry, noise, method, name, label, tmp_path
):
    assert grid.parse_kind(entry) == (noise, method)
    (cell,) = grid.grid_cells(["repro_digits"], [512], noises=[entry])
    assert cell.name == f"repro_digits-b512-{name}"
    assert cell.label.startswith(label)
    config = grid.cell_config(cell, 3, {"lr_scaling": "none"})
    assert (config.method, config.ema_momentum) == (method.kind, method.ema)
    workdir = grid.run_dir(str(tmp_path), cell, 3)
    assert grid.cell_of_run(workdir, config).name == cell.name


@pytest.mark.parametrize(
    "entry, message",
    [
        ("sam:0", r"part 'sam:0' must be sam:X with X > 0"),
        ("sam:0.05+gnp:0.1", r"part 'gnp:0.1' must be gnp:X with X > 0, once per entry"),
        ("ema:1", r"part 'ema:1' must be ema:M with 0 < M < 1"),
        ("none+white:1e-5", r"has two noises"),
        ("swa:5", r"'swa:5' is not one of none, white:ALPHA"),
    ],
)
def test_bad_runner_kinds_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        grid.parse_kind(entry)


def test_the_averaging_lag_notice_starts_below_three_memories():
    assert train_lib.averaging_lag_notice(0.0, 5) is None
    assert train_lib.averaging_lag_notice(0.99, 300) is None
    notice = train_lib.averaging_lag_notice(0.99, 299)
    assert "averages over about 100 updates, and this run makes 299" in notice
    assert "at most 0.989 for 299 updates" in notice
