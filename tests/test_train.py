"""The main job: flag validation, workdir safety, an end-to-end run and its resume."""

import csv
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from noisy_keras import config as config_lib
from noisy_keras import train as train_lib
from noisy_keras import workdir as workdir_lib

TINY = dict(model="mlp", batch_size=128, epochs=2, verbose=0, base_learning_rate=0.05)


@pytest.fixture()
def flag_values():
    """The global absl flags, defined once, parsed per test and reset after."""
    train_lib.define_flags()
    yield flags.FLAGS
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_size=0"], "--batch_size must be >= 1"),
        (["--noise_alpha=-1"], "--noise_alpha must be >= 0"),
        (["--val_fraction=1.5"], r"--val_fraction must be in \(0, 1\)"),
        (["--lr_decay_factor=0"], r"--lr_decay_factor must be in \(0, 1\]"),
        (["--seed=-2"], r"--seed must be in \[0, 2\*\*31 - 1\]"),
        (["--lr_decay_epochs=25,x"], "--lr_decay_epochs must be a comma-separated list"),
        (["--optimizer=adagrad"], "value should be one of"),
        (["--lr_scaling=cubic"], "value should be one of"),
        (["--deterministic=yes"], "value should be one of"),
        (["--precision=float16"], "value should be one of"),
    ],
)
def test_bad_flags_are_rejected_with_the_flag_named(flag_values, argv, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        flag_values(["prog", *argv])


def test_flags_build_a_frozen_config(flag_values):
    flag_values(["prog", "--batch_size=512", "--noise_alpha=0.001", "--lr_decay_epochs=5,9"])
    config = train_lib.config_from_flags(flag_values)
    assert (config.batch_size, config.noise_alpha, config.lr_decay_epochs) == (512, 1e-3, (5, 9))
    with pytest.raises(AttributeError):
        config.batch_size = 3  # frozen


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": "vgg"}, r"Unknown model='vgg'; valid: mlp, cnn, cnn1d, resnet20, resnet50"),
        ({"optimizer": "sgdw"}, r"Unknown optimizer='sgdw'; valid: sgd, momentum"),
        ({"dataset": "cifar10"}, r"Unknown dataset='cifar10'; valid: digits, mnist1d, tfds:NAME"),
        ({"batch_size": 100, "accumulation_steps": 3}, r"batch_size=100 is not divisible by"),
        ({"ghost_batch_size": 512}, r"ghost_batch_size=512 exceeds batch_size=128"),
    ],
)
def test_bad_config_is_named(changes, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate_config(config_lib.TrainConfig(**changes))


def test_flagfile_round_trip_lists_every_field():
    config = config_lib.TrainConfig(lr_decay_epochs=(3, 7), augment=True, noise_alpha=1e-3)
    text = config.to_flagfile()
    assert "--lr_decay_epochs=3,7\n" in text and "--augment=true\n" in text
    assert "--noise_alpha=0.001\n" in text
    assert len(text.splitlines()) == len(config_lib.TrainConfig.__dataclass_fields__)


def test_workdir_with_other_configuration_is_refused_and_kept(tmp_path):
    workdir = str(tmp_path / "run")
    workdir_lib.prepare_workdir(workdir, config_lib.TrainConfig(batch_size=128))
    marker = os.path.join(workdir, "keep.txt")
    with open(marker, "w") as f:
        f.write("user data")
    with pytest.raises(ValueError, match=r"batch_size: saved '128', now '256'.*--overwrite"):
        workdir_lib.prepare_workdir(workdir, config_lib.TrainConfig(batch_size=256))
    assert os.path.exists(marker)
    # More epochs is a resume of the same run, not a different configuration.
    workdir_lib.prepare_workdir(workdir, config_lib.TrainConfig(batch_size=128, epochs=99))
    assert os.path.exists(marker)
    workdir_lib.prepare_workdir(workdir, config_lib.TrainConfig(batch_size=256), overwrite=True)
    assert not os.path.exists(marker)


def test_non_run_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no flags.txt.*nothing was deleted"):
        workdir_lib.prepare_workdir(str(tmp_path), config_lib.TrainConfig())
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_train_writes_every_output_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    config = config_lib.TrainConfig(**TINY)
    summary = train_lib.train(config, workdir)
    assert summary["status"] == "done"
    for name in (
        "flags.txt",
        "status.json",
        "metrics.csv",
        "model.keras",
        "accuracy.png",
        "summary.json",
    ):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert os.listdir(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(workdir, "status.json")) as f:
        assert json.load(f)["status"] == "done"
    rows = _rows(os.path.join(workdir, "metrics.csv"))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for r in rows:
        assert float(r["gap"]) == pytest.approx(float(r["accuracy"]) - float(r["val_accuracy"]))
        assert float(r["learning_rate"]) == pytest.approx(0.05 * 128 / 32)
    assert float(rows[1]["noise_stddev"]) < float(rows[0]["noise_stddev"])
    assert summary["gap"] == pytest.approx(summary["train_accuracy"] - summary["val_accuracy"])
    assert summary["val_accuracy"] > 0.3  # ten classes: chance is 0.1

    # The saved model (NoisyOptimizer, WarmupStepDecay inside) loads after a plain import.
    code = (
        "import sys, keras, noisy_keras; "
        "m = keras.models.load_model(sys.argv[1]); "
        "lr = m.optimizer.inner_optimizer.get_config()['learning_rate']; "
        "print(type(m.optimizer).__name__, lr['class_name'])"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    loaded = subprocess.run(
        [sys.executable, "-c", code, os.path.join(workdir, "model.keras")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split()[-2:] == ["NoisyOptimizer", "WarmupStepDecay"]

    # The same run with more epochs resumes at epoch 2 and keeps the first rows.
    more = train_lib.train(config_lib.TrainConfig(**{**TINY, "epochs": 3}), workdir)
    assert more["status"] == "done"
    resumed_rows = _rows(os.path.join(workdir, "metrics.csv"))
    assert [int(r["epoch"]) for r in resumed_rows] == [0, 1, 2]
    assert resumed_rows[:2] == rows


def test_cli_runs_and_a_rerun_from_its_flagfile_resumes(tmp_path):
    workdir = str(tmp_path / "cli")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    argv = [sys.executable, "-m", "noisy_keras.train", f"--workdir={workdir}"]
    argv += [f"--{k}={v}" for k, v in TINY.items()] + ["--epochs=1"]
    first = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "noisy_keras.train: done" in first.stdout and "val acc" in first.stdout
    checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))

    rerun = [sys.executable, "-m", "noisy_keras.train", f"--flagfile={workdir}/flags.txt"]
    second = subprocess.run(rerun, capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "noisy_keras.train: done" in second.stdout
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints

    clash = subprocess.run(
        [*argv[:-1], "--epochs=1", "--batch_size=64"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert clash.returncode == 2
    assert "different configuration" in clash.stderr and "--overwrite" in clash.stderr


def test_deterministic_true_with_xla_and_max_pooling_is_refused_before_anything_is_written(
    tmp_path,
):
    workdir = tmp_path / "run"
    config = config_lib.TrainConfig(model="cnn", xla="true", deterministic="true", epochs=1)
    with pytest.raises(ValueError, match=r"--deterministic=true cannot be combined with XLA"):
        train_lib.train(config, str(workdir))
    assert not workdir.exists()


def test_precision_and_determinism_hold_for_the_run_only(tmp_path):
    """mixed_float16 for the run (LossScaleOptimizer, float32 logits), then float32 again."""
    import keras

    from noisy_keras import _keras_internals

    workdir = str(tmp_path / "run")
    config = config_lib.TrainConfig(**{**TINY, "epochs": 1, "precision": "mixed_float16"})
    summary = train_lib.train(config, workdir)
    assert summary["status"] == "done"
    assert summary["device_policy"] == {
        "replicas": 1,
        "xla": False,
        "deterministic": True,
        "precision": "mixed_float16",
    }
    assert keras.config.dtype_policy().name == "float32"
    assert not _keras_internals.is_op_determinism_enabled()
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["device_policy"]["precision"] == "mixed_float16"
    (row,) = _rows(os.path.join(workdir, "metrics.csv"))
    assert float(row["noise_stddev"]) > 0  # read through the LossScaleOptimizer
    # As with any Keras model, load a mixed-precision one under its policy (else no loss scale).
    keras.config.set_dtype_policy("mixed_float16")
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.layers[1].dtype_policy.name == "mixed_float16"
    assert model.outputs[0].dtype == "float32"
    assert "--precision=mixed_float16" in open(os.path.join(workdir, "flags.txt")).read()
