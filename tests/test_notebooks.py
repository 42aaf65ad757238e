"""Executes every notebook in colab/ top to bottom with small parameters, in a real kernel.

Like papermill: the cell tagged `parameters` gets an assignment of small values (and a WORKDIR
in pytest's temporary directory) after its defaults, then nbclient runs every cell in a Jupyter
kernel of this interpreter and fails on the first cell error. A probe cell appended
at the end reports values from the kernel as JSON, which the tests check.
"""

import json
import os
import pathlib
import sys

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
KERNEL_NAME = "noisy-keras-test"
CELL_TIMEOUT_S = 300

SMALL_PARAMETERS = {
    "quickstart": {
        "SMALL_BATCH_SIZE": 64,
        "LARGE_BATCH_SIZE": 256,
        "ALPHA": 1e-5,
        "EPOCHS": 2,
        "SEED": 0,
    },
    "generalization_gap": {
        "DATASET": "digits",
        "MODEL": "mlp",
        "BATCH_SIZES": (64, 512),
        "ALPHAS": (0.0, 1e-3),
        "SEEDS": 1,
        "EPOCHS": 2,
        "INTERPOLATION_POINTS": 4,
        "GRADIENT_EXAMPLES": 32,
    },
    "multi_gpu_xla": {
        "NUM_CPU_REPLICAS": 2,
        "BATCH_SIZE": 128,
        "EPOCHS": 1,
        "MORE_EPOCHS": 1,
        "ALPHA": 1e-5,
        "SEED": 0,
        "SHOW_KERAS_JIT_COMPILE_FAILURE": True,
    },
}

# Values each probe reports: the expression is evaluated in the kernel after the notebook ran.
PROBES = {
    "quickstart": {
        "labels": "list(results)",
        "epochs": "{k: len(h.history['val_accuracy']) for k, h in histories.items()}",
        "updates": "{k: r['updates'] for k, r in results.items()}",
        "steps_per_epoch": "{b: digits.steps_per_epoch(b) for b in (SMALL_BATCH_SIZE, "
        "LARGE_BATCH_SIZE)}",
        "val_accuracy": "{k: float(r['val_accuracy']) for k, r in results.items()}",
        "files": "sorted(os.listdir(WORKDIR))",
    },
    "generalization_gap": {
        "rows": "[(r['batch_size'], r['alpha'], r['seed'], r['status']) for r in rows]",
        "sharpness": "[float(r['sharpness']) for r in rows]",
        "interpolation_shapes": "{k: list(v.val_accuracy.shape) for k, v in "
        "interpolations.items()}",
        "gradient_shape": "list(gradients.shape)",
        "variance_ratio": "float(variance.variance[0] / variance.predicted[0])",
        "files": "sorted(os.listdir(WORKDIR))",
    },
    "multi_gpu_xla": {
        "replicas": "strategy.num_replicas_in_sync",
        "max_replica_difference": "max_replica_difference",
        "mirrored_variables": "len(mirrored)",
        "iterations": "int(np.asarray(model.optimizer.iterations))",
        "steps_per_epoch": "steps_per_epoch",
        "tracing_count": "replica_xla_functions(model)['train'].experimental_get_tracing_count()",
        "first_status": "first.status",
        "resumed_initial_epoch": "resumed.initial_epoch",
        "resumed_epochs_completed": "resumed.epochs_completed",
        "keras_jit_error": "keras_jit_error",
    },
}


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
    """A kernelspec that runs ipykernel in this interpreter, whatever else is registered."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec.joinpath("kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    return str(root)


def _parameter_source(values: dict) -> str:
    return "\n".join(f"{name} = {value!r}" for name, value in values.items()) + "\n"


def _execute(name: str, workdir: pathlib.Path, kernel_dir: str):
    """Runs colab/<name>.ipynb with small parameters; returns (notebook, probe values)."""
    notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters', found {len(tagged)}"
    defaults = tagged[0].source
    assert "WORKDIR" in defaults, f"{name}: the parameters cell must set WORKDIR"
    for parameter in SMALL_PARAMETERS[name]:
        assert f"{parameter} =" in defaults, f"{name}: no parameter {parameter} to override"
    tagged[0].source = (
        defaults
        + "\n\n# Small parameters for the test\n"
        + _parameter_source({"WORKDIR": str(workdir / "out"), **SMALL_PARAMETERS[name]})
    )
    entries = ", ".join(f"{key!r}: {expression}" for key, expression in PROBES[name].items())
    probe = "import json\nprint(json.dumps({" + entries + "}))"
    notebook.cells.append(nbformat.v4.new_code_cell(probe))
    manager = KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]),
        connection_file=str(workdir / "connection.json"),
    )
    (workdir / "cwd").mkdir()
    env = {
        **os.environ,
        "KERAS_BACKEND": "tensorflow",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "IPYTHONDIR": str(workdir / "ipython"),
    }
    nbclient.NotebookClient(
        notebook,
        km=manager,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir / "cwd")}},
    ).execute(env=env)
    text = "".join(
        output.get("text", "")
        for output in notebook.cells[-1].outputs
        if output.get("name") == "stdout"
    )
    return notebook, json.loads(text.strip().splitlines()[-1])


def _images(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def _error_outputs(notebook) -> list:
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]


@pytest.mark.parametrize("name", sorted(SMALL_PARAMETERS))
def test_notebook_shape(name):
    """Badge, Colab-only install cell, one parameters cell, and saved outputs with plots."""
    notebook = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    badge = f"colab.research.google.com/github/noisy-keras/noisy_keras/blob/main/colab/{name}.ipynb"
    assert badge in notebook.cells[0].source
    first_code = next(c for c in notebook.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in first_code.source
    assert "%pip install" in first_code.source
    assert _images(notebook) >= 1, f"{name}: saved without plot outputs"
    assert not _error_outputs(notebook), f"{name}: saved with an error output"
    assert all(c.execution_count is not None for c in notebook.cells if c.cell_type == "code"), (
        f"{name}: saved without running every cell"
    )


def test_quickstart(tmp_path, kernel_dir):
    notebook, probe = _execute("quickstart", tmp_path, kernel_dir)
    assert probe["labels"] == ["B=64", "B=256", "B=256 + noise"]
    assert probe["epochs"] == dict.fromkeys(probe["labels"], 2)
    per_epoch = probe["steps_per_epoch"]
    assert probe["updates"] == {
        "B=64": 2 * per_epoch["64"],
        "B=256": 2 * per_epoch["256"],
        "B=256 + noise": 2 * per_epoch["256"],
    }
    # Two epochs of the small CNN learn something on ten classes (chance is 0.1).
    assert all(accuracy > 0.2 for accuracy in probe["val_accuracy"].values()), probe
    assert {"accuracy.png", "gap.png"} <= set(probe["files"])
    assert _images(notebook) >= 3


def test_generalization_gap(tmp_path, kernel_dir):
    notebook, probe = _execute("generalization_gap", tmp_path, kernel_dir)
    assert sorted(map(tuple, probe["rows"])) == [
        (64, 0.0, 0, "done"),
        (64, 1e-3, 0, "done"),
        (512, 0.0, 0, "done"),
        (512, 1e-3, 0, "done"),
    ]
    assert all(value > 0 for value in probe["sharpness"]), probe["sharpness"]
    assert probe["interpolation_shapes"] == {
        "B=64 -> B=512": [4],
        "B=64 -> B=512, alpha=0.001": [4],
    }
    assert probe["gradient_shape"][0] == 32
    # At B=1 the measured mini-batch variance is tr(Sigma) (Eq. 6) up to sampling error.
    assert 0.5 < probe["variance_ratio"] < 2.0, probe["variance_ratio"]
    for name in ("table.md", "parametric.png", "sharpness.png", "gap_digits_mlp.png"):
        assert name in probe["files"], name
    assert _images(notebook) >= 6


def test_multi_gpu_xla(tmp_path, kernel_dir):
    notebook, probe = _execute("multi_gpu_xla", tmp_path, kernel_dir)
    assert probe["replicas"] == 2
    assert probe["mirrored_variables"] > 0
    assert probe["max_replica_difference"] == 0.0
    assert probe["iterations"] == probe["steps_per_epoch"]  # EPOCHS = 1
    assert probe["tracing_count"] == probe["replicas"]  # once per replica, then reused
    assert probe["first_status"] == "done"
    assert probe["resumed_initial_epoch"] == 1
    assert probe["resumed_epochs_completed"] == 2
    assert "Trying to access resource" in probe["keras_jit_error"]
    assert _images(notebook) >= 1
