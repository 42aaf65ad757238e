"""The core install and its extras: an optional package missing fails where it is used, in one line.

An extra's package is "missing" when `sys.modules[name] = None`: Python's own way of making
`import name` fail (ModuleNotFoundError with `error.name == name`), exactly as when the
package is not installed.
"""

import os
import subprocess
import sys

import pytest

from noisy_keras import _extras
from noisy_keras.data import datasets
from noisy_keras.engine import rundir as workdir_lib
from noisy_keras.run import config as config_lib
from noisy_keras.run import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(monkeypatch, *names):
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    # As users run it: TensorFlow's log level left to the command line.
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_require_names_the_feature_the_package_and_the_extra(monkeypatch):
    _block(monkeypatch, "mnist1d")
    with pytest.raises(_extras.MissingExtraError) as raised:
        _extras.require("mnist1d.data", "dataset='mnist1d'")
    assert str(raised.value) == (
        "dataset='mnist1d' needs mnist1d, which is not installed: "
        'pip install "noisy_keras[study]"'
    )
    assert isinstance(raised.value, ImportError)
    with pytest.raises(_extras.MissingExtraError, match=r'noisy_keras\[analysis\]"$'):
        _extras.require("mnist1d", "x", extra="analysis")
    assert _extras.require("scipy.stats", "x").__name__ == "scipy.stats"
    with pytest.raises(ValueError, match=r"module='torch' is not an optional dependency"):
        _extras.require("torch", "x")


def test_every_optional_import_of_the_package_is_declared_in_an_extra():
    import configparser

    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    extras = parser["options.extras_require"]
    core = parser["options"]["install_requires"]
    for module, (package, extra) in _extras.EXTRA_OF.items():
        assert package in extras[extra] and package in extras["all"], (module, extra)
        assert package not in core, package
    for package in ("matplotlib", "scipy", "scikit-learn", "mnist1d"):
        assert package not in core, package


def test_mnist1d_without_its_extra_is_refused_in_one_line_before_anything_is_written(
    monkeypatch, tmp_path
):
    _block(monkeypatch, "mnist1d")
    datasets._mnist1d_arrays.cache_clear()
    monkeypatch.chdir(tmp_path)
    config = config_lib.TrainConfig(dataset="mnist1d", model="cnn1d", epochs=1, verbose=0)
    with pytest.raises(_extras.MissingExtraError, match=r'pip install "noisy_keras\[study\]"$'):
        train_lib.train(config, log=None)
    assert os.listdir(tmp_path) == []
    datasets._mnist1d_arrays.cache_clear()


@pytest.mark.parametrize(
    "blocked, module, flags, feature",
    [
        ("mnist1d", "run.train", "'--dataset=mnist1d', '--model=cnn1d'", "dataset='mnist1d'"),
        ("scipy", "study.experiments", "'--out=out', '--seeds=1'", "noisy_keras.experiments"),
    ],
)
def test_a_command_line_names_the_missing_extra_in_one_line_before_writing(
    tmp_path, blocked, module, flags, feature
):
    program = module.split(".")[1]  # train, experiments
    code = (
        f"import sys; sys.modules[{blocked!r}] = None; "
        f"sys.argv = ['noisy-keras-{program}', {flags}]; "
        f"from noisy_keras.{module} import run; run()"
    )
    refused = _python(code, tmp_path)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr == (
        f"noisy_keras.{program}: error: {feature} needs {blocked}, which is not installed: "
        'pip install "noisy_keras[study]"\n'
    )
    assert os.listdir(tmp_path) == []


def test_the_main_job_trains_without_matplotlib_and_says_the_plot_needs_analysis(
    monkeypatch, tmp_path
):
    _block(monkeypatch, "matplotlib")
    for loaded in [m for m in sys.modules if m.startswith("noisy_keras.analysis")]:
        monkeypatch.delitem(sys.modules, loaded)  # imported by an earlier test: import anew
    lines = []
    config = config_lib.TrainConfig(model="mlp", batch_size=128, epochs=1, verbose=0)
    summary = train_lib.train(config, str(tmp_path / "run"), log=lines.append)
    assert summary["status"] == "done"
    assert not (tmp_path / "run" / workdir_lib.PLOT_FILE).exists()
    assert lines == [
        f"noisy_keras.train: no {workdir_lib.PLOT_FILE}: noisy_keras.analysis needs "
        'matplotlib, which is not installed: pip install "noisy_keras[analysis]"'
    ]


def test_the_package_imports_without_any_extra_and_analysis_names_its_extra(tmp_path):
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in _extras.EXTRA_OF)
    code = (
        f"import sys; {blocked}; import noisy_keras; print('imported'); import noisy_keras.analysis"
    )
    result = _python(code, tmp_path)
    assert result.stdout == "imported\n", result.stderr[-2000:]
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "noisy_keras._extras.MissingExtraError: noisy_keras.analysis needs matplotlib, "
        'which is not installed: pip install "noisy_keras[analysis]"'
    )
