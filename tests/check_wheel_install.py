"""The built wheel, installed alone in a new virtual environment: the core, and every recipe.

CI (`.ci/run`, leg 1) builds the sdist and the wheel, installs the wheel with
`pip install dist/noisy_keras-*.whl` into a new virtual environment, and runs this
script with that environment's Python from an empty directory:

    python tests/check_wheel_install.py

It checks that
1. noisy_keras comes from the wheel (not the source tree), with its licence, `py.typed`,
   the shipped digits and the recipes;
2. the environment holds the core only: the wheel requires the five packages the project is
   built on and what they fail to declare (importlib-resources, which tensorflow-datasets
   imports; tensorboard, which tf.summary needs), and none of an extra's packages is
   installed;
3. every shipped recipe takes its first step from an empty directory
   (`--recipe=NAME --epochs=1 --updates_per_epoch=1`): the digits recipes train; a recipe
   whose data needs an extra, a download or files of one's own stops before writing
   anything, with the one-line error that says so.

It is not a pytest file (pytest runs in the development install, where the extras are
installed); it prints one line per check and exits 1 if any failed.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CORE = {
    *("tensorflow", "keras", "tensorflow-datasets", "numpy", "absl-py"),
    *("importlib-resources", "tensorboard"),  # what those fail to declare
}
EXTRAS = {"analysis", "study", "all", "docs", "test"}
EXTRA_PACKAGES = ("matplotlib", "scipy", "mnist1d", "scikit-learn", "pytest", "mkdocs")


def _name(requirement: str) -> str:
    for stop in "<>=!~;[ (":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower().replace("_", "-")


def check_the_package_comes_from_the_wheel() -> None:
    distribution = importlib.metadata.distribution("noisy_keras")
    origin = json.loads(distribution.read_text("direct_url.json") or "{}")
    assert origin.get("url", "").endswith(".whl"), f"not installed from a wheel: {origin}"
    import noisy_keras

    assert os.path.realpath(noisy_keras.__file__).startswith(os.path.realpath(sys.prefix)), (
        noisy_keras.__file__
    )
    assert noisy_keras.__version__ == distribution.version, distribution.version
    files = {str(path).replace(os.sep, "/") for path in distribution.files}
    for shipped in (
        "noisy_keras/py.typed",
        "noisy_keras/_data/digits.npz",
        "noisy_keras/flagfiles/repro_digits.flags",
        f"noisy_keras-{distribution.version}.dist-info/licenses/LICENSE",
    ):
        assert shipped in files, shipped


def check_the_environment_holds_the_core_only() -> None:
    distribution = importlib.metadata.distribution("noisy_keras")
    requirements = distribution.requires or []
    core = {_name(r) for r in requirements if "extra ==" not in r}
    assert core == CORE, sorted(core)
    assert set(distribution.metadata.get_all("Provides-Extra")) == EXTRAS
    installed = {_name(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    present = [package for package in EXTRA_PACKAGES if package in installed]
    assert not present, f"extras' packages installed with the core: {present}"
    print(f"  {len(installed)} distributions installed (pip list counts pip too)")


def _expected(recipe: str) -> tuple[int, str]:
    """(exit status, what the output must hold) for a recipe's first step on the core."""
    from noisy_keras.run import config as config_lib
    from noisy_keras.run import flagfile

    dataset = config_lib.read_flagfile(flagfile.resolve(recipe)).get("dataset", "digits")
    if dataset == "digits":
        return 0, "noisy_keras.train: done | 1 epochs in "
    if dataset == "mnist1d":
        return 2, (
            "noisy_keras.train: error: dataset='mnist1d' needs mnist1d, which is not installed: "
            'pip install "noisy_keras[study]"'
        )
    if dataset.startswith("tfds:"):
        return 2, f"noisy_keras.train: error: dataset {dataset!r} is not prepared in data_dir="
    if dataset.startswith("folder:"):
        path = dataset[len("folder:") :]
        return 2, f"noisy_keras.train: error: Image folder {path!r} does not exist"
    raise AssertionError(f"recipe {recipe}: no expectation for dataset={dataset!r}")


def _first_step(recipe: str, root: str) -> str | None:
    """Runs the recipe's first step in a new empty directory; None if it behaved, else why."""
    status, expected = _expected(recipe)
    directory = os.path.join(root, recipe)
    os.mkdir(directory)
    data_dir = os.path.join(root, f"{recipe}-tfds")  # outside the run's directory
    command = [
        sys.executable,
        "-m",
        "noisy_keras.train",
        f"--recipe={recipe}",
        "--epochs=1",
        "--updates_per_epoch=1",
        f"--data_dir={data_dir}",
    ]
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    if result.returncode != status:
        return f"exit status {result.returncode}, expected {status}: {output[-1500:]}"
    lines = (result.stdout if status == 0 else result.stderr).strip().splitlines()
    if not lines or not lines[-1].startswith(expected):
        return f"last line {lines[-1:]!r}, expected it to start with {expected!r}"
    if status != 0:
        if "Traceback" in output:
            return f"a traceback: {output[-1500:]}"
        if os.listdir(directory):
            return f"refused but wrote {os.listdir(directory)}"
    return None


def check_every_recipe_takes_its_first_step_from_an_empty_directory() -> None:
    from noisy_keras.run import flagfile

    recipes = flagfile.recipe_names()
    assert len(recipes) >= 20, recipes
    with tempfile.TemporaryDirectory() as root:
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            outcomes = dict(zip(recipes, pool.map(lambda r: _first_step(r, root), recipes)))
    for recipe, problem in outcomes.items():
        print(f"  {recipe}: {problem or 'as expected'}")
    failed = {recipe: problem for recipe, problem in outcomes.items() if problem}
    assert not failed, f"{len(failed)} of {len(recipes)} recipes: {sorted(failed)}"


if __name__ == "__main__":
    failures = 0
    for name, check in list(globals().items()):
        if name.startswith("check_") and callable(check):
            try:
                check()
                print(f"passed: {name}")
            except Exception as error:  # report every check, then fail
                failures += 1
                print(f"FAILED: {name}: {type(error).__name__}: {error}")
    sys.exit(1 if failures else 0)
