"""Kill-and-resume: a run killed with SIGKILL mid-epoch and restarted ends where an
uninterrupted run ends, bit for bit (op determinism on; see tests/engine/training_worker.py)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "training_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 180


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(workdir, out, *extra):
    """Runs the worker to the end; returns its RESULT."""
    completed = subprocess.run(
        [sys.executable, WORKER, "--workdir", str(workdir), "--out", str(out), *extra],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :])


def _run_until_paused_then_kill(workdir, out, pause_at, *extra):
    process = subprocess.Popen(
        [
            sys.executable,
            WORKER,
            "--workdir",
            str(workdir),
            "--out",
            str(out),
            "--pause-at",
            pause_at,
            *extra,
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        for line in process.stdout:  # the worker sleeps after printing PAUSED
            seen.append(line)
            if line.strip() == "PAUSED":
                break
        assert seen and seen[-1].strip() == "PAUSED", "".join(seen)[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    return seen


def _kill_resume_and_compare(tmp_path, *extra):
    reference = _run(tmp_path / "reference", tmp_path / "reference.npz", *extra)
    assert reference["status"] == "done" and reference["initial_epoch"] == 0

    seen = _run_until_paused_then_kill(tmp_path / "killed", tmp_path / "unused.npz", "1,2", *extra)
    assert "BATCH 1 2\n" in seen
    assert not (tmp_path / "unused.npz").exists()
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert "ckpt-1.index" in os.listdir(checkpoints)
    assert not [f for f in os.listdir(checkpoints) if f.startswith("ckpt-2")]

    resumed = _run(tmp_path / "killed", tmp_path / "resumed.npz", *extra)
    assert resumed["status"] == "done"
    assert resumed["initial_epoch"] == 1
    assert resumed["loss"] == reference["loss"][1:]

    expected, actual = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(expected.files) == sorted(actual.files)
    for name in expected.files:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_sigkill_mid_epoch_then_restart_matches_uninterrupted_run(tmp_path):
    _kill_resume_and_compare(tmp_path)


def test_sigkill_then_restart_is_exact_on_a_streamed_folder(tmp_path):
    """The same on images read from disk every epoch, with per-example random-resized crops."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for label in range(3):
        (tmp_path / "images" / f"c{label}").mkdir(parents=True)
        for i in range(8):
            image = rng.integers(0, 256, size=(9 + i, 14 - i, 3), dtype=np.uint8)
            path = tmp_path / "images" / f"c{label}" / f"{i}.png"
            tf.io.write_file(str(path), tf.io.encode_png(image))
    # 18 training images (6 of each class), batches of 4: 4 steps per epoch.
    _kill_resume_and_compare(
        tmp_path,
        "--folder",
        str(tmp_path / "images"),
        "--preprocess",
        "resnet",
        "--batch-size",
        "4",
    )
