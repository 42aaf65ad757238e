"""A fresh install works: the TFDS path, packaged recipes, and no network needed to find out.

These tests use only the package and its install requirements (no pytest
fixtures beyond `tmp_path`, no mocked imports), so CI also runs this file as
`python tests/test_fresh_install.py` in a virtual environment made with
`pip install .` alone, before the test extras are installed. TFDS is imported
for real; where data is needed it is either prepared locally by a tiny TFDS
builder defined here, or TFDS' own `tfds.testing.mock_data`.
"""

import os
import pathlib
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow_datasets as tfds  # noqa: E402

from noisy_keras.data import datasets  # noqa: E402
from noisy_keras.data import tfds as tfds_data
from noisy_keras.engine import rundir as workdir_lib  # noqa: E402
from noisy_keras.run import config as config_lib  # noqa: E402
from noisy_keras.run import flagfile
from noisy_keras.run import train as train_lib  # noqa: E402
from noisy_keras.study import grid

TINY_TRAIN, TINY_VALIDATION, TINY_CLASSES = 24, 9, 3


def _tiny_image(split: str, index: int) -> np.ndarray:
    """An 8x8 grey image whose pixels encode (split, index), so splits are told apart."""
    offset = 0 if split == "train" else 100
    return np.full((8, 8, 1), offset + index, dtype=np.uint8)


class NoisyKerasTinyImages(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset prepared from memory: train and validation splits, 3 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=TINY_CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples("train", TINY_TRAIN),
            "validation": self._generate_examples("validation", TINY_VALIDATION),
        }

    def _generate_examples(self, split, count):
        for index in range(count):
            yield index, {"image": _tiny_image(split, index), "label": index % TINY_CLASSES}


TINY_NAME = "tfds:noisy_keras_tiny_images"


def test_a_prepared_tfds_dataset_uses_its_validation_split_and_trains(tmp_path):
    data_dir = str(tmp_path / "tfds")
    tfds.builder(TINY_NAME[len("tfds:") :], data_dir=data_dir).download_and_prepare()
    data = datasets.load_dataset(TINY_NAME, data_dir=data_dir)
    assert (data.num_train, data.num_val, data.num_classes) == (TINY_TRAIN, TINY_VALIDATION, 3)
    # Every validation example is the validation split's, none is a training one.
    assert sorted(int(x) for x in data.x_val[:, 0, 0, 0]) == [100 + i for i in range(9)]
    assert sorted(int(x) for x in data.x_train[:, 0, 0, 0]) == list(range(TINY_TRAIN))
    assert data.validation == "the dataset's own 'validation' split"

    config = config_lib.TrainConfig(
        dataset=TINY_NAME, data_dir=data_dir, model="mlp", batch_size=8, epochs=1, verbose=0
    )
    summary = train_lib.train(config, str(tmp_path / "run"), log=None)
    assert summary["status"] == "done" and summary["epochs"] == 1
    assert workdir_lib.RunDir(str(tmp_path / "run")).read_status()["status"] == "done"


def test_the_main_job_trains_on_tfds_mnist_under_tfds_mock_data(tmp_path):
    config = config_lib.TrainConfig(
        dataset="tfds:mnist",
        data_dir=str(tmp_path / "tfds"),
        model="mlp",
        batch_size=16,
        epochs=1,
        verbose=0,
    )
    with tfds.testing.mock_data(num_examples=64):
        summary = train_lib.train(config, str(tmp_path / "run"), log=None)
    assert summary["status"] == "done"
    # mock_data knows no splits, so the 64 training examples are split 3:1.
    assert len(workdir_lib.read_metrics(str(tmp_path / "run" / "metrics.csv"))) == 1


def test_an_unprepared_tfds_dataset_fails_within_seconds_without_network(tmp_path):
    """The real mnist builder, not prepared; the download host is made unreachable."""
    saved = tfds_data.TFDS_PROBE_ADDRESS
    tfds_data.TFDS_PROBE_ADDRESS = ("127.0.0.1", 9)  # nothing listens: refused at once
    workdir = tmp_path / "run"
    try:
        config = config_lib.TrainConfig(
            dataset="tfds:mnist", data_dir=str(tmp_path / "empty"), model="mlp", verbose=0
        )
        try:
            train_lib.train(config, str(workdir), log=None)
        except ConnectionError as error:
            message = str(error)
        else:
            raise AssertionError("an unprepared dataset without network was not refused")
    finally:
        tfds_data.TFDS_PROBE_ADDRESS = saved
    assert "'tfds:mnist' is not prepared in data_dir=" in message, message
    # Refused by the connection test, before TFDS' own download (which retries for minutes).
    assert "cannot be downloaded: no network (connecting to 127.0.0.1:9 failed" in message
    assert not workdir.exists()  # refused before the run directory was made


def test_packaged_recipes_and_their_includes_resolve_from_any_directory(tmp_path):
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        path = flagfile.resolve("repro_digits.flags")
        same = flagfile.resolve("repro_digits")
        # digits_b1024_noise includes repro_digits by name: found beside it, not in the cwd.
        values = config_lib.read_flagfile(flagfile.resolve("digits_b1024_noise"))
    finally:
        os.chdir(previous)
    assert path == same and os.path.isabs(path) and os.path.isfile(path)
    assert config_lib.read_flagfile(path)["dataset"] == "digits"
    assert (values["dataset"], values["batch_size"], values["noise_alpha"]) == (
        "digits",
        "1024",
        "1e-05",
    )
    assert set(grid.DEFAULT_FLAGFILES) <= set(flagfile.recipes())
    try:
        flagfile.resolve("no_such_recipe.flags")
    except FileNotFoundError as error:
        assert "recipes: caltech101_resnet50_b128, " in str(error), str(error)
    else:
        raise AssertionError("an unknown recipe was accepted")


def test_every_public_name_imports_first_in_a_fresh_interpreter(tmp_path):
    """`from noisy_keras import ...` of every name in __all__ as the first line of a new script.

    The package's `__init__` imports its whole API eagerly (it defines no module-level
    `__getattr__`), so a first import runs the same code whichever name it asks for, and one
    new interpreter checks them all. Were the API made lazy, the name asked for first would
    matter: the first assertion says so.
    """
    import subprocess

    import noisy_keras

    assert not hasattr(noisy_keras, "__getattr__"), (
        "noisy_keras resolves names lazily now: import each name in its own interpreter"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    names = ", ".join(noisy_keras.__all__)
    process = subprocess.run(
        [sys.executable, "-c", f"from noisy_keras import {names}; print('imported')"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip().splitlines()[-1:] == ["imported"], process.stdout[-2000:]
    assert len(noisy_keras.__all__) == len(set(noisy_keras.__all__)) == 24


def test_the_notebooks_install_cell_keeps_colabs_tensorflow(tmp_path):
    """Colab has TensorFlow and Keras installed: the notebooks' install pins them where supported.

    The cell first installs the package alone (`--no-deps`: pip changes nothing else), then
    `noisy_keras.install.install_beside_installed` asks for the extras with TensorFlow and
    Keras pinned to the installed versions (tests/test_install.py runs the cell itself). On
    this bare install, with the wheel's own metadata, the plan pins what is installed.
    """
    import importlib.metadata
    import json

    from noisy_keras import install

    colab = pathlib.Path(__file__).resolve().parent.parent / "colab"
    notebooks = sorted(colab.glob("*.ipynb"))
    assert len(notebooks) == 3
    for notebook in notebooks:
        cells = json.loads(notebook.read_text())["cells"]
        cell = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        (pip_line,) = [line.strip() for line in cell.splitlines() if "%pip install" in line]
        assert pip_line == '%pip install -q --no-deps "noisy_keras @ {SOURCE}"', notebook.name
        assert 'install.install_beside_installed(f"noisy_keras[all] @ {SOURCE}")' in cell
        for option in (" -U", "--upgrade", "--force-reinstall"):
            assert option not in cell, (notebook.name, option)
    plan = install.requirements("noisy_keras[all]")
    versions = {name: importlib.metadata.version(name) for name in ("tensorflow", "keras")}
    assert plan.requirements == (
        "noisy_keras[all]",
        f"tensorflow=={versions['tensorflow']}",
        f"keras=={versions['keras']}",
    ), plan
    assert plan.changed == ()


if __name__ == "__main__":  # CI, before the test extras (pytest) are installed
    failures = 0
    for name, test in sorted(globals().items()):
        if name.startswith("test_") and callable(test):
            with tempfile.TemporaryDirectory() as directory:
                try:
                    test(pathlib.Path(directory))
                    print(f"passed: {name}")
                except Exception as error:  # report every test, then fail
                    failures += 1
                    print(f"FAILED: {name}: {type(error).__name__}: {error}")
    sys.exit(1 if failures else 0)
