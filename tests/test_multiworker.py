"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train in lock step.

Each worker is `tests/training_worker.py` with its own TF_CONFIG; both take
free loopback ports. XLA dumps its compiled modules per worker, which shows
that the per-replica function, and only it, was compiled by XLA. A third
process runs the same training with MirroredStrategy over two logical CPU
devices: two workers of one replica each must train as one process with two
replicas.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "training_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _mirrored_reference(tmp_path):
    """The same run in one process with two replicas (MirroredStrategy, 2 logical CPUs)."""
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    argv = [sys.executable, WORKER, "--strategy", "mirrored", "--num-devices", "2"]
    argv += ["--workdir", str(tmp_path / "mirrored"), "--out", str(tmp_path / "mirrored.npz")]
    argv += ["--epochs", "2", "--steps-per-epoch", "3"]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_workers_end_with_identical_weights(tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    try:
        processes.append(_mirrored_reference(tmp_path))
        for index in range(2):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            env["XLA_FLAGS"] = f"--xla_dump_to={tmp_path / f'xla-{index}'}"
            env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
            env["CUDA_VISIBLE_DEVICES"] = ""
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        WORKER,
                        "--strategy",
                        "multiworker",
                        "--workdir",
                        str(tmp_path / "run"),
                        "--out",
                        str(tmp_path / f"w{index}.npz"),
                        "--epochs",
                        "2",
                        "--steps-per-epoch",
                        "3",
                    ],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(processes, outputs, strict=True):
        assert p.returncode == 0, output[-3000:]
    reference = _result(outputs.pop(0))
    results = [_result(o) for o in outputs]
    assert results[0]["status"] == results[1]["status"] == "done"
    assert results[0]["loss"] == results[1]["loss"]

    first, second = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert int(first["iterations"]) == 6

    # Two workers of one replica each = one process with two replicas: same batches per
    # replica, same noise, same dropout masks (replica ids 0 and 1 either way), same sums.
    mirrored = np.load(tmp_path / "mirrored.npz")
    assert sorted(mirrored.files) == sorted(first.files)
    assert reference["status"] == "done"
    # Bit for bit: a SUM of two values does not depend on the order of its operands.
    assert results[0]["loss"] == reference["loss"]
    for name in first.files:
        np.testing.assert_array_equal(first[name], mirrored[name], err_msg=name)

    # Only the chief's checkpoints remain; the other worker's were temporary.
    checkpoints = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert checkpoints == [
        "checkpoint",
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
    ]
    for index in range(2):
        compiled = {
            name.split(".")[1]
            for name in os.listdir(tmp_path / f"xla-{index}")
            if name.startswith("module_")
        }
        assert compiled, index
        assert all("loss_and_gradients" in name for name in compiled), compiled
