"""The main job as a user runs it: every registry model, default flags, 2 replicas, XLA on.

`python -m noisy_keras.train --strategy=mirrored --num_devices=2 --xla=true --epochs=1`
in a subprocess, per model: mlp and cnn on digits, cnn1d on mnist1d, resnet20
and resnet50 on a small generated image folder at 32 px. The defaults include
`--deterministic=auto`, which turns op determinism off under XLA (the cnn and
resnet50 have max pooling, whose gradient XLA cannot compute deterministically).
XLA_FLAGS=--xla_dump_to makes XLA write every module it compiles: the
per-replica train and test functions must be among them.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from noisy_keras.run import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes x 58 random 40x40 RGB PNGs: 130 training images, one update of B=128."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cow"):
        (root / name).mkdir()
        for i in range(58):
            image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
            tf.io.write_file(str(root / name / f"{i}.png"), tf.io.encode_png(image))
    return str(root)


CASES = {
    "mlp": ["--model=mlp"],
    "cnn": [],  # the default model
    "cnn1d": ["--dataset=mnist1d", "--model=cnn1d"],
    "cnn1d_bn": ["--dataset=mnist1d", "--model=cnn1d_bn"],
    "resnet20": ["--model=resnet20", "--image_size=32"],
    "resnet50": ["--model=resnet50", "--image_size=32"],
}


def test_the_cases_are_the_registry():
    assert sorted(CASES) == sorted(config_lib.MODEL_NAMES)


@pytest.mark.parametrize("model", list(CASES))
def test_main_job_trains_every_model_mirrored_with_xla(model, image_folder, tmp_path):
    argv = [sys.executable, "-m", "noisy_keras.train", *CASES[model]]
    if model.startswith("resnet"):
        argv.append(f"--dataset=folder:{image_folder}")
    argv += ["--strategy=mirrored", "--num_devices=2", "--xla=true", "--epochs=1", "--verbose=2"]
    argv.append(f"--workdir={tmp_path / 'run'}")
    dump = tmp_path / "xla"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XLA_FLAGS=f"--xla_dump_to={dump}")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env.pop("TF_CONFIG", None)
    completed = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=TIMEOUT_S, cwd=tmp_path
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert (
        "noisy_keras.train: 2 replica(s), XLA on (--xla=true), op determinism off "
        "(--deterministic=auto), precision float32" in completed.stdout
    )
    assert "noisy_keras.train: done" in completed.stdout

    with open(tmp_path / "run" / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "done"
    assert summary["device_policy"] == {
        "replicas": 2,
        "xla": True,
        "deterministic": False,
        "precision": "float32",
    }
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["val_loss"])
    compiled = {name.split(".")[1] for name in os.listdir(dump) if name.startswith("module_")}
    assert any("loss_and_gradients" in name for name in compiled), sorted(compiled)
    assert any("loss_and_predictions" in name for name in compiled), sorted(compiled)
