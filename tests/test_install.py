"""`noisy_keras.install`: the notebooks' install keeps a supported TensorFlow and Keras as they are.

CI runs this file on the newest supported stack (leg 1) and on Colab's TensorFlow 2.20 and
Keras 3.13.2 (leg 2): on both, the plan pins the installed versions.
"""

import configparser
import importlib.metadata
import json
import os
import subprocess
import sys
import types

import pytest

from noisy_keras import install

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart", "generalization_gap", "multi_gpu_xla")
RANGES = {"tensorflow": ">=2.20,<2.22", "keras": ">=3.13,<4"}


def test_the_supported_ranges_are_the_ones_setup_cfg_declares():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, "setup.cfg"))
    declared = [
        Requirement(line)
        for line in parser["options"]["install_requires"].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    expected = {r.name: r.specifier for r in declared if r.name in ("tensorflow", "keras")}
    ranges = install.supported_ranges()
    assert {name: SpecifierSet(spec) for name, spec in ranges.items()} == expected
    with pytest.raises(ValueError, match="distribution='no-such-package' is not installed"):
        install.supported_ranges("no-such-package")


def test_supported_installed_versions_are_pinned_and_others_get_the_range():
    plan = install.requirements(
        "noisy_keras[all]", installed={"tensorflow": "2.20.0", "keras": "3.13.2"}, ranges=RANGES
    )
    assert plan.requirements == ("noisy_keras[all]", "tensorflow==2.20.0", "keras==3.13.2")
    assert plan.kept == ("tensorflow", "keras") and plan.changed == ()
    plan = install.requirements(
        "noisy_keras", installed={"tensorflow": "2.22.0", "keras": None}, ranges=RANGES
    )
    assert plan.requirements == ("noisy_keras", "tensorflow>=2.20,<2.22", "keras>=3.13,<4")
    assert plan.changed == (
        ("tensorflow", "2.22.0", ">=2.20,<2.22"),
        ("keras", None, ">=3.13,<4"),
    )
    plan = install.requirements(  # a release candidate inside the range is kept
        "noisy_keras", installed={"tensorflow": "2.21.0rc1", "keras": "3.13.0"}, ranges=RANGES
    )
    assert plan.kept == ("tensorflow", "keras")
    with pytest.raises(ValueError, match=r"package must be a requirement string; received"):
        install.requirements("", ranges=RANGES)
    with pytest.raises(ValueError, match=r"ranges\['keras'\]='3.x' is not a version range"):
        install.requirements("noisy_keras", ranges={**RANGES, "keras": "3.x"}, installed={})


def test_this_environment_keeps_its_own_tensorflow_and_keras():
    plan = install.requirements("noisy_keras[all]")
    versions = [importlib.metadata.version(n) for n in ("tensorflow", "keras")]
    assert plan.requirements[1:] == (f"tensorflow=={versions[0]}", f"keras=={versions[1]}")


def _first_code_cell(notebook: str) -> str:
    cells = json.load(open(os.path.join(REPO, "colab", f"{notebook}.ipynb")))["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_the_notebooks_install_cell_runs_in_a_colab_like_kernel(notebook, monkeypatch, capsys):
    """The cell as IPython runs it, with `google.colab` present and pip recorded, not run."""
    from IPython.core.inputtransformer2 import TransformerManager

    source = TransformerManager().transform_cell(_first_code_cell(notebook))
    magics, commands, namespace = [], [], {}
    # IPython expands {NAME} in a magic's line from the caller's variables, then runs it
    expand = lambda name, line: magics.append((name, line.format(**namespace)))  # noqa: E731
    shell = types.SimpleNamespace(run_line_magic=expand)
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "check_call", commands.append)
    namespace["get_ipython"] = lambda: shell
    exec(compile(source, notebook, "exec"), namespace)
    source_url = "git+https://github.com/noisy-keras/noisy_keras"
    assert magics == [("pip", f'install -q --no-deps "noisy_keras @ {source_url}"')]
    (command,) = commands
    assert command[:5] == [sys.executable, "-m", "pip", "install", "-q"]
    plan = install.requirements(f"noisy_keras[all] @ {source_url}")
    assert command[5:] == list(plan.requirements)
    assert "kept the installed tensorflow==" in capsys.readouterr().out
    monkeypatch.delitem(sys.modules, "google.colab")
    magics.clear()
    namespace.clear()
    namespace["get_ipython"] = lambda: shell
    exec(compile(source, notebook, "exec"), namespace)  # elsewhere: nothing
    assert magics == [] and len(commands) == 1


def test_what_the_quickstart_says_of_clipping_and_accumulation_is_what_the_wrapper_does():
    import keras

    from noisy_keras import NoisyOptimizer

    cells = json.load(open(os.path.join(REPO, "colab", "quickstart.ipynb")))["cells"]
    text = " ".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    text = " ".join(text.split())
    assert "is taken over by the wrapper, which clips the global batch's data gradient" in text
    assert "`gradient_accumulation_steps` is refused" in text
    inner = keras.optimizers.SGD(0.1, clipnorm=1.0)
    wrapper = NoisyOptimizer(inner, seed=0)
    assert inner.clipnorm is None and wrapper.get_config()["clipnorm"] == 1.0  # taken over
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        NoisyOptimizer(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), seed=0)
