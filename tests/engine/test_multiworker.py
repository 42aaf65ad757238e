"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1 train in lock step.

Each worker is `tests/engine/training_worker.py` with its own TF_CONFIG; both take
free loopback ports. XLA dumps its compiled modules per worker, which shows
that the per-replica function, and only it, was compiled by XLA.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from noisy_keras.data.epochs import epoch_permutation

WORKER = os.path.join(os.path.dirname(__file__), "training_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _mirrored_reference(tmp_path, extra_args):
    """The same run in one process with two replicas (MirroredStrategy, 2 logical CPUs)."""
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    argv = [sys.executable, WORKER, "--strategy", "mirrored", "--num-devices", "2"]
    argv += ["--workdir", str(tmp_path / "mirrored"), "--out", str(tmp_path / "mirrored.npz")]
    argv += extra_args
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _run_two_workers(tmp_path, extra_args, reference=False):
    """Runs two training_worker.py processes as a cluster; returns their outputs.

    With `reference`, a third process runs the same training in one process with two
    replicas at the same time; its output comes first.
    """
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    processes = []
    try:
        if reference:
            processes.append(_mirrored_reference(tmp_path, extra_args))
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
                        *[arg.format(index=index) for arg in extra_args],
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
    return outputs


def _assert_identical_weights(tmp_path, iterations):
    first, second = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "w1.npz")
    assert sorted(first.files) == sorted(second.files)
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert int(first["iterations"]) == iterations


def test_two_workers_end_with_identical_weights(tmp_path):
    outputs = _run_two_workers(
        tmp_path, ["--epochs", "2", "--steps-per-epoch", "3"], reference=True
    )
    reference = _result(outputs.pop(0))
    results = [_result(o) for o in outputs]
    assert results[0]["status"] == results[1]["status"] == "done"
    assert results[0]["loss"] == results[1]["loss"]
    _assert_identical_weights(tmp_path, 6)

    # Two workers of one replica each = one process with two replicas: same batches per
    # replica, same noise, same dropout masks (replica ids 0 and 1 either way), same sums.
    first, mirrored = np.load(tmp_path / "w0.npz"), np.load(tmp_path / "mirrored.npz")
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


def _write_identity_folder(root, classes: int, per_class: int) -> None:
    """PNGs of one color each: pixel value red + 256 x green is the image's identity."""
    import tensorflow as tf

    identity = 0
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            color = np.array([identity % 256, identity // 256, 7], np.uint8)
            image = np.broadcast_to(color, (5 + i % 3, 6, 3))
            tf.io.write_file(str(root / f"class{label}" / f"{i}.png"), tf.io.encode_png(image))
            identity += 1


def test_two_workers_read_disjoint_shards_of_a_streamed_folder(tmp_path):
    """Each worker reads only its replica's half of every global batch; together, every
    training image exactly once per epoch; the weights stay identical."""
    from noisy_keras.data import datasets

    folder = tmp_path / "images"
    _write_identity_folder(folder, classes=4, per_class=12)  # 36 training images, 12 validation
    batch_size, steps = 12, 3
    outputs = _run_two_workers(
        tmp_path,
        [
            "--folder",
            str(folder),
            "--batch-size",
            str(batch_size),
            "--epochs",
            "2",
            "--steps-per-epoch",
            str(steps),
            "--reads",
            str(tmp_path / "reads-{index}.json"),
        ],
    )
    results = [_result(o) for o in outputs]
    assert results[0]["status"] == results[1]["status"] == "done"
    _assert_identical_weights(tmp_path, 2 * steps)

    images = datasets.load_dataset(f"folder:{folder}", image_size=8, seed=0, streaming="true")
    stored_ids = [_identity(path) for path in images.source.train_paths]
    assert len(set(stored_ids)) == images.num_train == batch_size * steps
    reads = [json.loads((tmp_path / f"reads-{i}.json").read_text()) for i in range(2)]
    per_worker = [[i for _, ids in worker for i in ids] for worker in reads]
    assert [len(ids) for ids in per_worker] == [steps * batch_size // 2] * 2
    assert not set(per_worker[0]) & set(per_worker[1])
    assert sorted(per_worker[0] + per_worker[1]) == sorted(stored_ids)
    # Step k's global batch is worker 0's half then worker 1's: the epoch order of (seed, 0).
    order = epoch_permutation(images.num_train, seed=5, epoch=0)
    for step in range(steps):
        expected = [stored_ids[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        assert reads[0][step][1] + reads[1][step][1] == expected, step


def _identity(path: str) -> int:
    """The identity `_write_identity_folder` gave the image at .../class<label>/<i>.png."""
    class_dir, file_name = path.split(os.sep)[-2:]
    return int(class_dir[len("class") :]) * 12 + int(file_name[: -len(".png")])
