"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train in lock step.

Each worker is `tests/training_worker.py` with its own TF_CONFIG; both take
free loopback ports. XLA dumps its compiled modules per worker, which shows
that the per-replica function, and only it, was compiled by XLA.
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


def test_two_workers_end_with_identical_weights(tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    try:
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
    results = [_result(o) for o in outputs]
    assert results[0]["status"] == results[1]["status"] == "done"
    assert results[0]["loss"] == results[1]["loss"]

    first, second = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert int(first["iterations"]) == 6

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
