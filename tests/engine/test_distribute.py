"""Strategies from a short name (two logical CPU devices stand in for two GPUs)."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from noisy_keras.engine import distribute


def test_default_is_one_replica():
    strategy = distribute.make_strategy("default")
    assert strategy.num_replicas_in_sync == 1
    assert distribute.is_chief(strategy)
    assert distribute.worker_index(strategy) == 0


@pytest.mark.parametrize("num_devices, expected", [(None, 2), (1, 1), (2, 2)])
def test_mirrored_uses_logical_cpus_without_gpus(num_devices, expected):
    strategy = distribute.make_strategy("mirrored", num_devices)
    assert isinstance(strategy, tf.distribute.MirroredStrategy)
    assert strategy.num_replicas_in_sync == expected
    devices = strategy.extended.worker_devices
    assert [tf.DeviceSpec.from_string(d).device_type for d in devices] == ["CPU"] * expected
    assert len(set(devices)) == expected


@pytest.mark.parametrize(
    "name, num_devices, match",
    [
        (
            "mirorred",
            None,
            r"name must be one of \('default', 'mirrored', 'multiworker'\); "
            r"received 'mirorred'",
        ),
        ("default", 2, r"num_devices must be None or 1 for name='default'; received 2"),
        ("mirrored", 0, r"num_devices must be None or a positive integer; received 0"),
        ("mirrored", 2.0, r"received 2\.0"),
    ],
)
def test_bad_arguments_name_argument_value_and_allowed(name, num_devices, match):
    with pytest.raises(ValueError, match=match):
        distribute.make_strategy(name, num_devices)


def test_mirrored_more_cpus_than_configured_after_initialisation():
    with pytest.raises(ValueError, match=r"num_devices=3 .* already runs with 2 logical CPU"):
        distribute.make_strategy("mirrored", 3)


def test_mirrored_splits_the_cpu_in_a_fresh_process():
    # Nothing initialises TensorFlow's devices before make_strategy does the split.
    code = (
        "from noisy_keras.engine.distribute import make_strategy; "
        "print(make_strategy('mirrored', 3).num_replicas_in_sync)"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3"


def test_multiworker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match=r"name='multiworker' needs the TF_CONFIG"):
        distribute.make_strategy("multiworker")


@pytest.mark.parametrize(
    "deterministic, xla, max_pooling, expected",
    [
        ("auto", False, True, True),
        ("auto", True, False, False),
        ("auto", True, True, False),
        ("true", False, True, True),
        ("true", True, False, True),
        ("false", False, False, False),
        ("false", True, True, False),
        (True, False, True, True),  # Python booleans, as older callers pass them
        (False, True, False, False),
    ],
)
def test_determinism_policy(deterministic, xla, max_pooling, expected):
    resolved = distribute.resolve_determinism(
        deterministic, xla=xla, model_has_max_pooling=max_pooling
    )
    assert resolved is expected


def test_determinism_true_with_xla_and_max_pooling_is_refused_naming_the_flags():
    with pytest.raises(
        ValueError,
        match=r"--deterministic=true cannot be combined with XLA \(--xla=true, or --xla=auto on "
        r"GPUs\) for a model with max pooling.*Allowed: --deterministic=auto or "
        r"--deterministic=false with XLA.*or --deterministic=true with --xla=false",
    ):
        distribute.resolve_determinism("true", xla=True, model_has_max_pooling=True)
    with pytest.raises(ValueError, match=r"deterministic must be one of auto, true, false; "):
        distribute.resolve_determinism("yes", xla=False, model_has_max_pooling=False)
