"""Kill-and-resume: a run killed with SIGKILL mid-epoch and restarted ends where an
uninterrupted run ends, bit for bit (op determinism on; see tests/training_worker.py)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "training_worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(workdir, out, *extra):
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


def _run_until_paused_then_kill(workdir, out, pause_at):
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


def test_sigkill_mid_epoch_then_restart_matches_uninterrupted_run(tmp_path):
    reference = _run(tmp_path / "reference", tmp_path / "reference.npz")
    assert reference["status"] == "done" and reference["initial_epoch"] == 0

    seen = _run_until_paused_then_kill(tmp_path / "killed", tmp_path / "unused.npz", "1,2")
    assert "BATCH 1 2\n" in seen
    assert not (tmp_path / "unused.npz").exists()
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert "ckpt-1.index" in os.listdir(checkpoints)
    assert not [f for f in os.listdir(checkpoints) if f.startswith("ckpt-2")]

    resumed = _run(tmp_path / "killed", tmp_path / "resumed.npz")
    assert resumed["status"] == "done"
    assert resumed["initial_epoch"] == 1
    assert resumed["loss"] == reference["loss"][1:]

    expected, actual = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(expected.files) == sorted(actual.files)
    for name in expected.files:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
