"""The ImageNet recipe: flagfiles (one mock step each), LARS in the main job, no decay on BN and
biases, zero-initialised residual gammas, label smoothing, top-5 accuracy, the config's rules."""

import csv
import dataclasses
import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from tfds_metadata import write_tfds_metadata

import noisy_keras
from noisy_keras.models import losses
from noisy_keras.models import zoo as models
from noisy_keras.optim import lars
from noisy_keras.run import config as config_lib
from noisy_keras.run import recipe
from noisy_keras.run import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGENET_FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "imagenet_resnet50_*.flags")))
# What a laptop needs to train one step of each flagfile on mocked ImageNet, and nothing else:
# a batch of 8, 32x32 images, one epoch of one update, the mock's data directory, no progress bar.
LAPTOP_OVERRIDES = {
    "batch_size": "8",
    "image_size": "32",
    "epochs": "1",
    "updates_per_epoch": "1",
    "verbose": "0",
}


def test_there_are_six_imagenet_flagfiles():
    names = [os.path.basename(p) for p in IMAGENET_FLAGFILES]
    assert names == [
        "imagenet_resnet50_b256.flags",
        "imagenet_resnet50_b256_noise.flags",
        "imagenet_resnet50_b32768_lars.flags",
        "imagenet_resnet50_b32768_lars_noise.flags",
        "imagenet_resnet50_b8192.flags",
        "imagenet_resnet50_b8192_noise.flags",
    ]


@pytest.mark.parametrize("path", IMAGENET_FLAGFILES, ids=os.path.basename)
def test_imagenet_flagfile_header_and_recipe(path):
    text = open(path).read()
    for heading in ("# Run:", "# Data:", "# Needs:", "# Precision:", "# Expect:"):
        assert heading in text, heading
    assert "Not run by this project" in text
    assert f"--recipe={os.path.basename(path)[: -len('.flags')]}" in text
    values = config_lib.read_flagfile(path)
    config = config_lib.config_from_strings(values)
    batch = int(os.path.basename(path).split("_b")[1].split("_")[0].split(".")[0])
    assert config.batch_size == batch
    assert (config.dataset, config.model, config.preprocess) == (
        "tfds:imagenet2012",
        "resnet50",
        "resnet",
    )
    assert config.streaming == "true" and config.top5_accuracy and config.zero_init_residual
    assert config.weight_decay_exclude_bn_bias and config.epochs == 90
    assert config.optimizer == ("lars" if "lars" in path else "momentum")
    assert config.noise_alpha == (1e-5 if path.endswith("_noise.flags") else 0.0)
    if "precision" in config_lib.TrainConfig.__dataclass_fields__:
        # Once the package has --precision, the recipes must say which one they use.
        assert "precision" in values, f"{path} should set --precision"


@pytest.fixture(scope="module")
def imagenet_mock_dir(tmp_path_factory):
    return write_tfds_metadata(
        tmp_path_factory.mktemp("tfds"), "imagenet2012", {"train": 16, "validation": 16}
    )


# Each recipe without noise is its _noise twin with --noise_alpha=0 (the next test), so the
# twins' mock steps train every recipe's flags; the noise-free path is the default one.
NOISE_FLAGFILES = [p for p in IMAGENET_FLAGFILES if p.endswith("_noise.flags")]


def test_each_recipe_without_noise_is_its_noise_twin_at_alpha_zero():
    assert len(NOISE_FLAGFILES) == 3
    for noisy in NOISE_FLAGFILES:
        plain = noisy[: -len("_noise.flags")] + ".flags"
        configs = [
            config_lib.config_from_strings(config_lib.read_flagfile(p)) for p in (plain, noisy)
        ]
        assert configs[1].noise_alpha > 0
        assert dataclasses.replace(configs[1], noise_alpha=0.0) == configs[0], plain


@pytest.mark.parametrize("path", NOISE_FLAGFILES, ids=os.path.basename)
def test_each_imagenet_flagfile_trains_one_mock_step(path, imagenet_mock_dir, tmp_path):
    values = {**config_lib.read_flagfile(path), **LAPTOP_OVERRIDES, "data_dir": imagenet_mock_dir}
    config = config_lib.config_from_strings(values)
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=16, data_dir=imagenet_mock_dir):
        summary = train_lib.train(config, workdir)
    assert summary["status"] == "done", summary
    assert 0 <= summary["val_accuracy"] <= summary["val_top5_accuracy"] <= 1
    with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1"] and np.isfinite(float(rows[0]["loss"]))


# ---------------------------------------------------------------------------
# Weight decay exclusions on both ResNets, with Keras' SGD and with LARS
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnets():
    return {
        name: models.build_model(name, input_shape=(32, 32, 3), num_classes=10, seed=0)
        for name in ("resnet20", "resnet50")
    }


def _bn_and_bias_paths(model) -> set:
    paths = set()
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            paths |= {layer.gamma.path, layer.beta.path}
        elif getattr(layer, "bias", None) is not None:
            paths.add(layer.bias.path)
    return paths


@pytest.mark.parametrize("model_name", ["resnet20", "resnet50"])
@pytest.mark.parametrize("optimizer", ["momentum", "lars"])
def test_bn_and_bias_get_no_weight_decay(resnets, model_name, optimizer):
    """A step with zero gradients: decayed variables shrink by an exact factor, excluded ones
    (every BatchNormalization gamma and beta and every bias, found by layer type) stay put."""
    model = resnets[model_name]
    rng = np.random.default_rng(0)
    for variable in model.trainable_variables:  # nonzero everywhere, so decay always shows
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    config = config_lib.TrainConfig(
        model=model_name,
        optimizer=optimizer,
        weight_decay=1e-2,
        weight_decay_exclude_bn_bias=True,
        lars_eeta=0.02 if optimizer == "lars" else config_lib.DEFAULT_LARS_EETA,
    )
    inner = recipe.make_inner_optimizer(config, 0.5)
    before = [v.numpy() for v in model.trainable_variables]
    inner.apply([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables)
    # SGD: w - lr * wd * w (decoupled). LARS: g' = wd * w, trust = eeta / wd, w - lr * eeta * w.
    factor = 1 - 0.5 * (1e-2 if optimizer == "momentum" else 0.02)
    excluded = _bn_and_bias_paths(model)
    assert len(excluded) > 10
    for variable, old in zip(model.trainable_variables, before, strict=True):
        if variable.path in excluded:
            np.testing.assert_array_equal(variable.numpy(), old, err_msg=variable.path)
        else:
            np.testing.assert_allclose(variable.numpy(), old * factor, rtol=1e-6)


def test_bn_and_bias_patterns_match_names_and_paths():
    (pattern,) = recipe.BN_AND_BIAS_PATTERNS
    # Paths (LARS) and the names Keras' optimizers see on TensorFlow ("gamma:0").
    names = ("gamma", "conv1_bn/gamma", "logits/bias", "gamma:0", "beta:0", "bias:0")
    assert all(lars.matches_any([pattern], name) for name in names)
    others = ("conv1_conv/kernel", "alphabeta/kernel", "conv1_bn/moving_mean", "kernel:0", "b:0")
    assert not any(lars.matches_any([pattern], p) for p in others)


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("resnet50", 16)])
def test_zero_init_residual_zeroes_the_last_gamma_of_every_block(name, blocks):
    kwargs = {"input_shape": (32, 32, 3), "num_classes": 10, "seed": 0}
    variants = [models.build_model(name, zero_init_residual=True, **kwargs)]
    if name == "resnet20":
        variants.append(
            models.build_model(name, zero_init_residual=True, ghost_batch_size=4, **kwargs)
        )
    for model in variants:
        kinds = (keras.layers.BatchNormalization, noisy_keras.GhostBatchNormalization)
        norms = [layer for layer in model.layers if isinstance(layer, kinds)]
        assert norms
        zeroed = [layer.name for layer in norms if not np.any(layer.gamma.numpy())]
        assert len(zeroed) == blocks
        assert all(np.all(layer.gamma.numpy() == 1) for layer in norms if layer.name not in zeroed)
    with pytest.raises(ValueError, match=r"zero_init_residual .* received .* model 'mlp'"):
        models.build_model("mlp", zero_init_residual=True, **kwargs)


# ---------------------------------------------------------------------------
# Label smoothing, top-5, LARS in the main job, the config's rules
# ---------------------------------------------------------------------------


def test_label_smoothing_loss_matches_numpy_and_keras():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32") * 3
    labels = np.array([0, 4, 2, 2, 1, 3])
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    expected = -(0.9 * log_p[np.arange(6), labels] + 0.1 * log_p.mean(1))
    actual = losses.smoothed_sparse_cross_entropy(labels, logits, 0.1)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    loss = losses.SmoothedSparseCategoricalCrossentropy(0.1)
    one_hot = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    np.testing.assert_allclose(loss(labels, logits), one_hot(np.eye(5)[labels], logits), rtol=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    np.testing.assert_allclose(
        losses.SmoothedSparseCategoricalCrossentropy(0.0)(labels, logits),
        plain(labels, logits),
        rtol=1e-6,
    )
    again = losses.SmoothedSparseCategoricalCrossentropy.from_config(loss.get_config())
    assert again.label_smoothing == 0.1
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\)"):
        losses.SmoothedSparseCategoricalCrossentropy(1.0)


def test_recipe_compiles_smoothing_and_top5():
    config = config_lib.TrainConfig(model="mlp", label_smoothing=0.2, top5_accuracy=True)
    dataset = dataclasses.make_dataclass("D", ["input_shape", "num_classes"])((8, 8, 1), 10)
    model = recipe.build_compiled_model(config, dataset, 0.1)
    assert isinstance(model.loss, losses.SmoothedSparseCategoricalCrossentropy)
    assert model.loss.label_smoothing == 0.2
    x = np.zeros((2, 8, 8, 1), "float32")
    logs = model.evaluate(x, np.array([1, 2]), verbose=0, return_dict=True)
    assert set(logs) >= {"accuracy", "top5_accuracy"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--streaming=maybe", "--streaming must be one of auto, true, false"),
        ("--preprocess=inception", "--preprocess must be one of resize, resnet"),
        ("--lars_eeta=0", "--lars_eeta must be > 0"),
    ],
)
def test_bad_scale_flags_are_rejected_with_the_flag_named(flag_values, argv, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        flag_values(["prog", argv])


def test_lars_is_a_main_job_optimizer_with_eeta_and_weight_decay(flag_values):
    assert noisy_keras.LARS is lars.LARS
    flag_values(["prog", "--optimizer=lars", "--lars_eeta=0.002", "--weight_decay=5e-5"])
    config = train_lib.config_from_flags(flag_values)
    optimizer = recipe.make_optimizer(config, 0.1)
    inner = optimizer.inner_optimizer
    assert isinstance(inner, lars.LARS)
    assert (inner.eeta, inner.weight_decay_rate, inner.momentum) == (0.002, 5e-5, 0.9)
    assert inner.weight_decay_exclusions is None  # no exclusions unless asked


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"streaming": "true"}, r"streaming=true reads image files; dataset='digits'"),
        ({"preprocess": "resnet"}, r"preprocess='resnet' .* dataset='digits'"),
        (
            {"dataset": "folder:x", "preprocess": "resnet", "augment": True},
            r"augment=true adds the translation",
        ),
        ({"weight_decay_exclude_bn_bias": True}, r"no effect with weight_decay=0"),
        ({"lars_eeta": 0.01}, r"lars_eeta=0.01 is used by optimizer='lars' only"),
        (
            {"zero_init_residual": True},
            r"zero_init_residual=true needs a model .* received model='cnn'",
        ),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\)"),
        ({"updates_per_epoch": -1}, r"updates_per_epoch must be >= 0"),
    ],
)
def test_config_refuses_options_that_would_do_nothing_or_are_out_of_range(changes, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate_config(config_lib.TrainConfig(**changes))


def test_evaluation_batches_are_the_step_batch_up_to_1024_per_replica_multiple():
    sizes = [(128, 1), (1024, 2), (8192, 1), (8192, 3), (32768, 1024), (32768, 2048)]
    expected = [128, 1024, 1024, 1023, 1024, 2048]
    assert [train_lib.evaluation_batch_size(b, r) for b, r in sizes] == expected


def test_updates_per_epoch_beyond_the_epoch_is_refused(tmp_path):
    config = config_lib.TrainConfig(model="mlp", batch_size=128, updates_per_epoch=11, verbose=0)
    with pytest.raises(ValueError, match=r"updates_per_epoch=11 exceeds the 10 full batches"):
        train_lib.train(config, str(tmp_path / "run"))
