"""The main job: flags, exact metrics and summary, resume, refusals, crash, Ctrl-C, the CLI."""

import dataclasses
import os
import re
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
from absl import flags
from tensorboard_events import read_scalars

from noisy_keras import NoiseLogger
from noisy_keras.data import datasets
from noisy_keras.engine import rundir as workdir_lib
from noisy_keras.noise.chain import current_noise_stddev
from noisy_keras.noise.optimizer import NoisyOptimizer
from noisy_keras.optim import schedule as schedule_lib
from noisy_keras.run import _cli
from noisy_keras.run import config as config_lib
from noisy_keras.run import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(model="mlp", batch_size=128, epochs=2, verbose=0, base_learning_rate=0.05)
# TensorFlow's C++ log lines: glog prefixes (I0000 00:00:...), absl's pre-init notice, start-up.
CPP_LOG_LINE = re.compile(
    r"^[IWEF]\d{4} \d\d:\d\d|All log messages before absl|oneDNN|cuInit|"
    r"cuda drivers|cpu_feature_guard",
    re.MULTILINE,
)


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
        ({"model": "vgg"}, r"Unknown model='vgg'; valid: mlp, cnn, cnn1d, cnn1d_bn, resnet20, "),
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


def _snapshot(directory) -> dict:
    """{relative path: (bytes, mtime)} of every file under `directory`."""
    files = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


def _without_wall_time(rows):
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


def test_metrics_rows_summary_and_resume_are_exact(tmp_path):
    # Step decay x0.5 after 2 epochs: the row of epoch 3 is the first with the decayed rate.
    config = config_lib.TrainConfig(
        **{**TINY, "epochs": 3},
        lr_decay_epochs=(2,),
        lr_decay_factor=0.5,
        noise_alpha=1e-3,
        noise_log_every=4,
    )
    straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
    probe = _LogsProbe()
    summary = train_lib.train(config, straight_dir, log=None, callbacks=[probe])
    rows = workdir_lib.read_metrics(os.path.join(straight_dir, "metrics.csv"))
    scalars = read_scalars(os.path.join(straight_dir, "tensorboard", "train"))

    # Each row: epochs from 1; the rate of the epoch's first update (e - 1) * U, sigma of its
    # last, e * U - 1 (NoiseLogger's logs, which TensorBoard records too).
    data = datasets.load_dataset("digits", seed=0)
    updates = data.steps_per_epoch(128)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        step = (row["epoch"] - 1) * updates
        last = row["epoch"] * updates - 1
        rate = schedule_lib.learning_rate_at(
            step,
            peak_learning_rate=0.2,
            steps_per_epoch=updates,
            decay_factor=0.5,
            decay_epochs=(2,),
        )
        sigma = np.sqrt(1e-3 / (1.0 + last) ** 0.55)
        assert row["learning_rate"] == pytest.approx(rate, rel=1e-6)  # float32 rounding
        assert row["noise_stddev"] == pytest.approx(sigma, rel=1e-6)
        assert row["gap"] == row["accuracy"] - row["val_accuracy"]
        epoch = row["epoch"] - 1  # TensorBoard's and Keras' epochs count from 0
        assert scalars["epoch_noise_stddev"][epoch] == pytest.approx(sigma, rel=1e-6)
        assert scalars["epoch_noise_step"][epoch] == last
        assert scalars["epoch_gap"][epoch] == pytest.approx(row["gap"], abs=1e-7)  # float32
    # --noise_log_every=4: sigma of every 4th update too.
    per_update = scalars["update_noise_stddev"]
    assert sorted(per_update) == list(range(0, 3 * updates, 4))
    for step, value in per_update.items():
        assert value == pytest.approx(np.sqrt(1e-3 / (1.0 + step) ** 0.55), rel=1e-6)
    # The user's callback, after the job's own, saw those logs, every epoch.
    assert [epoch for epoch, _ in probe.epochs] == [0, 1, 2]
    for (_, logs), row in zip(probe.epochs, rows):
        assert (logs["noise_stddev"], logs["gap"]) == (row["noise_stddev"], row["gap"])
    # ... with the keys a callback after NoiseLogger sees in Keras' own fit.
    in_fit = _LogsProbe()
    keras.models.load_model(os.path.join(straight_dir, "model.keras")).fit(
        data.val_batches(128),
        validation_data=data.val_batches(128),
        epochs=1,
        verbose=0,
        callbacks=[NoiseLogger(), in_fit],
    )
    assert {key for _, logs in probe.epochs for key in logs} == set(in_fit.epochs[0][1])
    assert [row["learning_rate"] for row in rows] == pytest.approx([0.2, 0.2, 0.1], rel=1e-6)

    # The summary's accuracies are those of a separate evaluation on each whole split.
    model = keras.models.load_model(os.path.join(straight_dir, "model.keras"))
    train_eval = model.evaluate(data.train_eval_batches(128), verbose=0, return_dict=True)
    val_eval = model.evaluate(data.val_batches(128), verbose=0, return_dict=True)
    assert (summary["train_accuracy"], summary["val_accuracy"]) == (
        train_eval["accuracy"],
        val_eval["accuracy"],
    )
    assert summary["train_loss"] == pytest.approx(train_eval["loss"], rel=1e-6)
    assert summary["val_loss"] == pytest.approx(val_eval["loss"], rel=1e-6)
    assert summary["gap"] == summary["train_accuracy"] - summary["val_accuracy"]
    assert summary["epochs"] == 3 and summary["wall_time_s"] == rows[-1]["wall_time_s"]
    assert workdir_lib.read_json(os.path.join(straight_dir, "summary.json")) == summary

    # 2 epochs, then a resume to 3: the same rows, and the wall time goes on counting.
    train_lib.train(config.replace(epochs=2), resumed_dir, log=None)
    metrics = os.path.join(resumed_dir, "metrics.csv")
    first = workdir_lib.read_metrics(metrics)
    first[-1]["wall_time_s"] = 1e6  # as if the first session had trained for 1e6 s
    workdir_lib.write_csv(metrics, first)
    lines = []
    resumed = train_lib.train(config, resumed_dir, log=lines.append)
    assert lines == [
        f"noisy_keras.train: resuming {resumed_dir} at epoch 3 of 3 "
        "(its checkpoint holds epochs 1-2)"
    ]
    resumed_rows = workdir_lib.read_metrics(metrics)
    assert _without_wall_time(resumed_rows) == _without_wall_time(rows)
    assert 1e6 < resumed_rows[2]["wall_time_s"] < 1e6 + 600
    assert resumed["wall_time_s"] == resumed_rows[2]["wall_time_s"]

    # A finished run, run again: nothing is trained or written.
    before = _snapshot(straight_dir)
    again = train_lib.train(config.replace(verbose=2), straight_dir, log=None)
    assert again == {**summary, "already_done": True}
    assert _snapshot(straight_dir) == before


@pytest.mark.parametrize(
    "first", ["import keras, noisy_keras", "import noisy_keras; import keras"], ids=str
)
def test_a_saved_run_loads_after_importing_the_package_in_either_order(tmp_path, first):
    workdir = str(tmp_path / "run")
    train_lib.train(config_lib.TrainConfig(**{**TINY, "epochs": 1}), workdir, log=None)
    code = (
        f"import sys; {first}; "
        "m = keras.models.load_model(sys.argv[1]); "
        "lr = m.optimizer.inner_optimizer.get_config()['learning_rate']; "
        "print(type(m.optimizer).__name__, lr['class_name'])"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code, os.path.join(workdir, "model.keras")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert loaded.stdout.split()[-2:] == ["NoisyOptimizer", "WarmupStepDecay"]


def test_current_noise_stddev_unwraps_the_loss_scale_optimizer():
    keras.config.set_dtype_policy("mixed_float16")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(
        optimizer=NoisyOptimizer(keras.optimizers.SGD(0.1), alpha=1e-3, seed=0), loss="mse"
    )
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert current_noise_stddev(model.optimizer) == pytest.approx(np.sqrt(1e-3), rel=1e-6)
    model.fit(np.ones((8, 3)), np.zeros((8, 2)), batch_size=2, epochs=1, verbose=0)
    updates = int(model.optimizer.iterations)  # steps with overflowing loss scale are skipped
    assert updates >= 1
    assert current_noise_stddev(model.optimizer) == pytest.approx(
        np.sqrt(1e-3 / (1.0 + updates) ** 0.55), rel=1e-6
    )
    assert current_noise_stddev(keras.optimizers.Adam()) == 0.0  # no noise is added
    with pytest.raises(
        ValueError, match="optimizer must be a Keras optimizer .* received Sequential"
    ):
        current_noise_stddev(model)


def _one_class_folder(root):
    from PIL import Image

    (root / "only").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "only" / f"{i}.png")
    return f"folder:{root}"


@pytest.mark.parametrize(
    "changes, error, message",
    [
        ({"dataset": "folder:/no/such/folder"}, FileNotFoundError, "does not exist"),
        ({"dataset": "ONE_CLASS", "image_size": 8}, ValueError, "has 1 class .* at least 2"),
        (
            {"strategy": "mirrored", "num_devices": 2, "batch_size": 127},
            ValueError,
            "global_batch_size=127 is not divisible by num_replicas",
        ),
        ({"noise_alpha": -1.0}, ValueError, "noise_alpha must be >= 0"),
    ],
    ids=["missing folder", "one-class folder", "batch split", "config range"],
)
def test_refused_bad_inputs_leave_no_directory(tmp_path, changes, error, message):
    if changes.get("dataset") == "ONE_CLASS":
        changes = {**changes, "dataset": _one_class_folder(tmp_path / "images")}
    config = config_lib.TrainConfig(**{**TINY, "epochs": 1})
    workdir = tmp_path / "runs" / "refused"
    with pytest.raises(error, match=message):
        train_lib.train(dataclasses_replace(config, **changes), str(workdir), log=None)
    assert not workdir.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "callbacks, message",
    [
        ([NoiseLogger(), print], r"callbacks\[1\] must be a keras.callbacks.Callback .*builtin"),
        (None, r"callbacks must be a list of keras.callbacks.Callback .*callbacks=None"),
        (NoiseLogger(), r"callbacks must be a list of keras.callbacks.Callback"),
    ],
)
def test_bad_callbacks_are_named_and_leave_no_directory(tmp_path, callbacks, message):
    workdir = tmp_path / "runs" / "refused"
    with pytest.raises(ValueError, match=message):
        train_lib.train(config_lib.TrainConfig(**TINY), str(workdir), callbacks=callbacks)
    assert not (tmp_path / "runs").exists()


def dataclasses_replace(config, **changes):
    return dataclasses.replace(config, **changes)  # unvalidated: train() must refuse it


class _LogsProbe(keras.callbacks.Callback):
    """Records the epochs a callback is called for and the logs it gets at each epoch's end."""

    def __init__(self):
        super().__init__()
        self.begun, self.epochs = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append((epoch, dict(logs)))


def test_a_crash_ends_in_status_failed_and_a_rerun_finishes(tmp_path):
    class CrashInEpoch2(keras.callbacks.Callback):  # a user's callback that fails
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("disk full\nsecond line of the error")

    workdir = str(tmp_path / "run")
    config = config_lib.TrainConfig(**{**TINY, "epochs": 3})
    with pytest.raises(RuntimeError, match="disk full"):
        train_lib.train(config, workdir, log=None, callbacks=[CrashInEpoch2()])
    assert workdir_lib.RunDir(workdir).read_status() == {
        "status": "failed",
        "epochs_completed": 1,
        "message": "RuntimeError: disk full",
    }
    # The rerun resumes at epoch 2: the user's callback is called as Keras' fit with
    # initial_epoch=1 calls it, for epochs 1 and 2 (from 0).
    probe = _LogsProbe()
    assert train_lib.train(config, workdir, log=None, callbacks=(probe,))["status"] == "done"
    assert probe.begun == [1, 2] and [epoch for epoch, _ in probe.epochs] == [1, 2]
    assert all({"noise_stddev", "noise_step", "gap"} <= set(logs) for _, logs in probe.epochs)
    assert [r["epoch"] for r in workdir_lib.read_metrics(os.path.join(workdir, "metrics.csv"))] == [
        1,
        2,
        3,
    ]


def test_the_progress_bar_is_kept_for_terminals_only():
    class Stream:
        def __init__(self, tty):
            self.isatty = lambda: tty

    assert [train_lib.progress_verbosity(v, Stream(True)) for v in (0, 1, 2)] == [0, 1, 2]
    assert [train_lib.progress_verbosity(v, Stream(False)) for v in (0, 1, 2)] == [0, 2, 2]
    assert train_lib.progress_verbosity(1, object()) == 2  # no isatty at all: not a terminal


@pytest.mark.parametrize("argument", ["--help", "-h", "--helpfull"])
def test_help_exits_0_and_lists_every_model_and_dataset(tmp_path, argument):
    shown = _run_cli([argument], tmp_path, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    model_help = re.search(r"--model: (.*)", shown.stdout).group(1)
    # Every model the validator accepts, cnn1d_bn included, and nothing else.
    listed = re.split(r", | or ", model_help.rstrip("."))
    assert sorted(listed) == sorted(config_lib.MODEL_NAMES) and "cnn1d_bn" in listed
    assert all(name in shown.stdout for name in config_lib.DATASET_NAMES)
    assert ("Try --helpfull" in shown.stdout) == (argument != "--helpfull")
    assert os.listdir(tmp_path) == []


def test_the_main_job_refuses_another_keras_backend_before_writing(tmp_path):
    env = {**_cli_env(), "KERAS_BACKEND": "jax"}
    command = [sys.executable, "-m", "noisy_keras.train", "--epochs=1"]
    refused = subprocess.run(
        command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert refused.returncode == 2, refused.stderr[-2000:]
    # One line: the library's message (Keras could not load jax here, or jax is not TensorFlow).
    assert refused.stderr.startswith(
        "error: noisy_keras needs the TensorFlow backend of Keras 3; KERAS_BACKEND is 'jax'"
    ), refused.stderr[-2000:]
    assert refused.stderr.strip().endswith("Set KERAS_BACKEND=tensorflow.")
    assert len(refused.stderr.strip().splitlines()) == 1 and refused.stdout == ""
    assert os.listdir(tmp_path) == []  # nothing written
    library = subprocess.run(
        [sys.executable, "-c", "import noisy_keras"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert library.returncode == 1
    assert "ImportError: noisy_keras needs the TensorFlow backend of Keras 3" in library.stderr


def _cli_env():
    env = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", _cli.TF_LOGS_ENV)
    }
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_cli(args, cwd, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "noisy_keras.train", *args],
        capture_output=True,
        text=True,
        env=_cli_env(),
        cwd=cwd,
        timeout=timeout,
    )


def test_cli_runs_quietly_leaves_a_finished_run_alone_refuses_and_overwrites(tmp_path):
    # The default --verbose=1 (TINY's verbose=0 is left out), output to a pipe.
    settings = {k: v for k, v in TINY.items() if k != "verbose"}
    argv = ["--workdir=run", *(f"--{k}={v}" for k, v in settings.items()), "--epochs=1"]
    first = _run_cli(argv, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert not CPP_LOG_LINE.search(first.stderr + first.stdout), first.stderr[-2000:]
    # Redirected, the progress bar becomes plain lines: no carriage returns, backspaces or
    # terminal escape codes; the device policy, Keras' line for the epoch, one final line.
    for control in ("\r", "\b", "\x1b"):
        assert control not in first.stdout + first.stderr, repr(control)
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0] == (
        "noisy_keras.train: 1 replica(s), XLA off (--xla=auto), op determinism on "
        "(--deterministic=auto), precision float32"
    )
    assert lines[1].startswith("10/10 - ") and "val_accuracy" in lines[1]
    assert lines[2].startswith("noisy_keras.train: done | 1 epochs in ")

    before = _snapshot(tmp_path / "run")
    rerun = _run_cli(["--flagfile=run/flags.txt"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.startswith("noisy_keras.train: already done (nothing changed) | 1 epochs")
    assert _snapshot(tmp_path / "run") == before  # summary.json and the rest, byte for byte

    clash = _run_cli([*argv, "--batch_size=64"], tmp_path)
    assert clash.returncode == 2
    assert "batch_size: saved '128', now '64'" in clash.stderr and "--overwrite" in clash.stderr
    assert _snapshot(tmp_path / "run") == before

    replaced = _run_cli([*argv, "--batch_size=64", "--overwrite"], tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert config_lib.read_flagfile(str(tmp_path / "run" / "flags.txt"))["batch_size"] == "64"
    assert workdir_lib.read_json(str(tmp_path / "run" / "summary.json"))["epochs"] == 1
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) != []
    assert {k: v for k, v in _snapshot(tmp_path / "run").items() if k in before} != before


def test_ctrl_c_stops_at_a_batch_boundary_and_a_rerun_finishes(tmp_path):
    argv = ["--workdir=run", *(f"--{k}={v}" for k, v in TINY.items()), "--epochs=30", "--verbose=2"]
    command = [sys.executable, "-m", "noisy_keras.train", *argv]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_cli_env(),
        cwd=tmp_path,
    )
    for line in process.stdout:  # wait for progress, not for a fixed time
        if line.startswith("Epoch 3/30"):
            break
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=10)
    assert process.returncode == _cli.EXIT_INTERRUPTED == 130, stderr[-2000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr[-2000:]
    status = workdir_lib.RunDir(str(tmp_path / "run")).read_status()
    completed = status["epochs_completed"]
    assert status["status"] == "interrupted" and 2 <= completed < 30
    assert stderr.startswith(f"noisy_keras.train: interrupted; stopped in epoch {completed + 1}")
    checkpoints = os.listdir(tmp_path / "run" / "checkpoints")
    assert f"ckpt-{completed}.index" in checkpoints
    rows = workdir_lib.read_metrics(str(tmp_path / "run" / "metrics.csv"))
    assert [r["epoch"] for r in rows] == list(range(1, completed + 1))

    rerun = _run_cli(argv, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming run at epoch {completed + 1} of 30" in rerun.stdout
    assert rerun.stdout.strip().splitlines()[-1].startswith("noisy_keras.train: done | 30 epochs")
    rows = workdir_lib.read_metrics(str(tmp_path / "run" / "metrics.csv"))
    assert [r["epoch"] for r in rows] == list(range(1, 31))
    assert workdir_lib.RunDir(str(tmp_path / "run")).read_status()["status"] == "done"


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
    saved = workdir_lib.read_json(os.path.join(workdir, "summary.json"))
    assert saved["device_policy"]["precision"] == "mixed_float16"
    (row,) = workdir_lib.read_metrics(os.path.join(workdir, "metrics.csv"))
    assert float(row["noise_stddev"]) > 0  # read through the LossScaleOptimizer
    # As with any Keras model, load a mixed-precision one under its policy (else no loss scale).
    keras.config.set_dtype_policy("mixed_float16")
    model = keras.models.load_model(os.path.join(workdir, "model.keras"))
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.layers[1].dtype_policy.name == "mixed_float16"
    assert model.outputs[0].dtype == "float32"
    assert "--precision=mixed_float16" in open(os.path.join(workdir, "flags.txt")).read()
