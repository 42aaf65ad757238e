"""The run configuration: one set of checks for the command line, flagfiles and Python."""

import dataclasses
import os
import subprocess
import sys

import pytest

from noisy_keras.run import config as config_lib
from noisy_keras.run.config import TrainConfig

BAD_VALUES = [
    ("noise_alpha", -1.0, r"noise_alpha must be >= 0; received noise_alpha=-1.0"),
    ("noise_gamma", float("nan"), r"noise_gamma must be >= 0; received noise_gamma=nan"),
    ("batch_size", 0, r"batch_size must be >= 1; received batch_size=0"),
    ("base_learning_rate", 0.0, r"base_learning_rate must be > 0"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\)"),
    ("val_fraction", 1.0, r"val_fraction must be in \(0, 1\)"),
    ("lr_decay_factor", 0.0, r"lr_decay_factor must be in \(0, 1\]"),
    ("lr_decay_epochs", (0, 5), r"lr_decay_epochs must be a comma-separated list of epochs >= 1"),
    ("seed", 2**31, r"seed must be in \[0, 2\*\*31 - 1\]"),
    ("lr_scaling", "cubic", r"lr_scaling must be one of linear, sqrt, none"),
    ("strategy", "tpu", r"strategy must be one of default, mirrored, multiworker"),
    ("xla", "yes", r"xla must be one of auto, true, false"),
    ("verbose", 3, r"verbose must be 0, 1 or 2"),
    ("epochs", 2.5, r"epochs must be >= 1; received epochs=2.5"),
]


@pytest.mark.parametrize("name, value, message", BAD_VALUES)
def test_every_range_is_checked_for_configs_built_in_python(name, value, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate_config(dataclasses.replace(TrainConfig(), **{name: value}))


def test_flagfile_strings_go_through_the_same_checks():
    with pytest.raises(ValueError, match=r"noise_alpha must be >= 0; received noise_alpha=-1.0"):
        config_lib.config_from_strings({"noise_alpha": "-1"})
    with pytest.raises(ValueError, match=r"--batch_size='many' is not a valid int"):
        config_lib.config_from_strings({"batch_size": "many"})


def test_replace_validates_and_keeps_the_rest():
    config = TrainConfig(batch_size=256, seed=3)
    changed = config.replace(noise_alpha=1e-3)
    assert (changed.batch_size, changed.seed, changed.noise_alpha) == (256, 3, 1e-3)
    with pytest.raises(ValueError, match="noise_alpha must be >= 0"):
        config.replace(noise_alpha=-1e-3)


def test_every_field_has_help_and_a_rule():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(config_lib.FIELD_HELP) == names
    for name in names:
        config_lib.field_rule(name)  # KeyError if a field had no rule


def test_the_name_tuples_match_the_registries():
    from noisy_keras.engine import distribute
    from noisy_keras.models import zoo as models
    from noisy_keras.optim import lr
    from noisy_keras.run import recipe

    assert tuple(models._BUILDERS) == config_lib.MODEL_NAMES
    assert tuple(recipe.OPTIMIZER_BUILDERS) == config_lib.OPTIMIZER_NAMES
    assert lr.SCALING_RULES == config_lib.LR_SCALING_RULES
    assert distribute.STRATEGY_NAMES == config_lib.STRATEGY_NAMES


def test_config_module_imports_neither_tensorflow_nor_keras():
    # The package __init__ imports Keras: stand an empty package in for it, so only the
    # config modules (config, config_rules, _validation, flagfile) run.
    package_dir = os.path.dirname(os.path.dirname(config_lib.__file__))  # noisy_keras/
    recipe = os.path.join(os.path.dirname(package_dir), "flags", "digits_b32.flags")
    code = (
        "import sys, types; "
        "package = types.ModuleType('noisy_keras'); "
        f"package.__path__ = [{package_dir!r}]; sys.modules['noisy_keras'] = package; "
        "import noisy_keras.run.config as c; "
        f"assert c.read_flagfile({recipe!r})['dataset'] == 'digits'; "
        "print(sorted(k for k in ('tensorflow', 'keras') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr[-1000:]


def test_determinism_and_precision_take_only_their_choices():
    for name, value, message in [
        ("deterministic", True, r"deterministic must be one of auto, true, false"),
        ("precision", "float16", r"precision must be one of float32, mixed_float16, mixed_b"),
    ]:
        with pytest.raises(ValueError, match=message):
            config_lib.validate_config(dataclasses.replace(TrainConfig(), **{name: value}))
    # Flagfiles written before --deterministic had an 'auto' still read.
    assert config_lib.config_from_strings({"deterministic": "true"}).deterministic == "true"
    assert TrainConfig().deterministic == "auto" and TrainConfig().precision == "float32"
