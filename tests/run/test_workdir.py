"""The run-directory contract: what is created, resumed, replaced or refused (no TensorFlow)."""

import dataclasses
import os
import subprocess
import sys

import pytest

from noisy_keras.engine import rundir as workdir_lib
from noisy_keras.run import config as config_lib
from noisy_keras.run import rundir_rules
from noisy_keras.run.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _snapshot(directory) -> dict:
    """{relative path: bytes} of every file under `directory`."""
    files = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def _make_run(workdir, config=None) -> dict:
    """A run directory as the main job leaves it (every file it writes, small contents)."""
    config = config or TrainConfig()
    plan = rundir_rules.prepare_workdir(str(workdir), config)
    assert plan.action == "create"
    workdir_lib.RunDir(str(workdir)).write_status("running", epochs_completed=0)
    (workdir / "summary.json").write_text('{"status": "diverged"}')
    for name in ("model.keras", "accuracy.png"):
        (workdir / name).write_text(f"{name} of the run")
    (workdir / "metrics.csv").write_text(",".join(workdir_lib.METRICS_COLUMNS) + "\n")
    for directory in ("checkpoints", "tensorboard"):
        (workdir / directory).mkdir()
        (workdir / directory / "file").write_text("x")
    return _snapshot(workdir)


def test_a_new_directory_gets_the_marker_and_the_flags(tmp_path):
    workdir = tmp_path / "runs" / "a"
    plan = rundir_rules.prepare_workdir(str(workdir), TrainConfig(batch_size=256))
    assert plan == rundir_rules.WorkdirPlan(str(workdir), "create")
    assert sorted(os.listdir(workdir)) == [".noisy_keras_run", "flags.txt"]
    flags = config_lib.read_flagfile(str(workdir / "flags.txt"))
    assert flags["batch_size"] == "256" and flags["workdir"] == str(workdir)
    # An existing empty directory is a new run too.
    (tmp_path / "empty").mkdir()
    assert rundir_rules.check_workdir(str(tmp_path / "empty"), TrainConfig()).action == "create"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_directory_with_a_users_file_is_refused_and_kept(tmp_path, overwrite):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a run directory .* it holds thesis.txt") as error:
        rundir_rules.prepare_workdir(str(tmp_path / "d"), TrainConfig(), overwrite=overwrite)
    assert "nothing was deleted" in str(error.value)
    assert _snapshot(tmp_path) == {"d/thesis.txt": b"x"}


def test_overwrite_refuses_the_current_directory_even_when_it_is_a_run(tmp_path, monkeypatch):
    before = _make_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    for name in (".", "./", os.path.join("..", "run")):
        with pytest.raises(ValueError, match=r"refuses --workdir=.*: it is the current directory"):
            rundir_rules.prepare_workdir(name, TrainConfig(), overwrite=True)
    assert _snapshot(tmp_path / "run") == before


def test_overwrite_refuses_a_parent_of_the_current_directory(tmp_path, monkeypatch):
    before = _make_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "deeper").mkdir()
    monkeypatch.chdir(tmp_path / "run" / "checkpoints" / "deeper")
    with pytest.raises(ValueError, match="it is a parent of the current directory"):
        rundir_rules.prepare_workdir(str(tmp_path / "run"), TrainConfig(), overwrite=True)
    assert _snapshot(tmp_path / "run") == before


def test_overwrite_refuses_the_home_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    before = _make_run(home)
    (home / "notes.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(ValueError, match=r"it is the home directory \(it holds .*notes.txt"):
        rundir_rules.prepare_workdir(str(home), TrainConfig(), overwrite=True)
    assert _snapshot(home) == {**before, "notes.txt": b"mine"}


def test_overwrite_refuses_a_run_holding_other_files(tmp_path):
    before = _make_run(tmp_path / "run")
    (tmp_path / "run" / "notes.md").write_text("mine")
    with pytest.raises(ValueError, match="files the run did not write: notes.md"):
        rundir_rules.prepare_workdir(str(tmp_path / "run"), TrainConfig(), overwrite=True)
    assert _snapshot(tmp_path / "run") == {**before, "notes.md": b"mine"}


def test_overwrite_replaces_a_run(tmp_path):
    workdir = tmp_path / "run"
    _make_run(workdir, TrainConfig(batch_size=128))
    (workdir / ".tmp-abcstatus.json").write_text("left by a killed write")
    plan = rundir_rules.prepare_workdir(str(workdir), TrainConfig(batch_size=64), overwrite=True)
    assert plan.action == "overwrite"
    assert sorted(os.listdir(workdir)) == [".noisy_keras_run", "flags.txt"]
    assert config_lib.read_flagfile(str(workdir / "flags.txt"))["batch_size"] == "64"


def _other_value(field: dataclasses.Field):
    """A value of `field` different from its default (validity is not needed here)."""
    default = getattr(TrainConfig(), field.name)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int | float):
        return default + 1
    if isinstance(default, tuple):
        return (*default, 99)
    return f"{default}-other"


RESUMABLE = config_lib.RESUMABLE_FIELDS
REFUSED = [f for f in dataclasses.fields(TrainConfig) if f.name not in RESUMABLE]


def test_the_fields_allowed_to_differ_on_resume_are_exactly_these():
    assert set(RESUMABLE) == {"epochs", "verbose", "data_dir", "noise_log_every"}


@pytest.mark.parametrize("field", REFUSED, ids=[f.name for f in REFUSED])
def test_every_other_field_is_refused_on_resume(tmp_path, field):
    before = _make_run(tmp_path / "run")
    changed = dataclasses.replace(TrainConfig(), **{field.name: _other_value(field)})
    wanted = changed.flag_strings()[field.name]
    with pytest.raises(ValueError, match="holds a run with a different configuration") as error:
        rundir_rules.prepare_workdir(str(tmp_path / "run"), changed)
    assert f"{field.name}: saved {TrainConfig().flag_strings()[field.name]!r}, now {wanted!r}" in (
        str(error.value)
    )
    assert _snapshot(tmp_path / "run") == before


@pytest.mark.parametrize(
    "changes", [{"epochs": 41}, {"verbose": 2}, {"data_dir": "/elsewhere/tfds"}], ids=str
)
def test_resumable_fields_may_differ(tmp_path, changes):
    _make_run(tmp_path / "run")
    plan = rundir_rules.prepare_workdir(str(tmp_path / "run"), TrainConfig(**changes))
    assert plan.action == "resume"
    saved = config_lib.read_flagfile(str(tmp_path / "run" / "flags.txt"))
    for name, value in changes.items():  # flags.txt records the new value
        assert saved[name] == str(value)


def test_a_finished_run_is_done_unless_more_epochs_are_asked(tmp_path):
    workdir = tmp_path / "run"
    _make_run(workdir, TrainConfig(epochs=3))
    summary = {"status": "done", "epochs": 3, "val_accuracy": 0.5}
    workdir_lib.write_json(str(workdir / "summary.json"), summary)
    (workdir / "metrics.csv").write_text(
        ",".join(workdir_lib.METRICS_COLUMNS) + "\n" + "".join(f"{e},,,,,,,,\n" for e in (1, 2, 3))
    )
    before = _snapshot(workdir)
    plan = rundir_rules.prepare_workdir(str(workdir), TrainConfig(epochs=3, verbose=2))
    assert plan == rundir_rules.WorkdirPlan(str(workdir), "done", summary=summary)
    assert _snapshot(workdir) == before  # not even flags.txt is rewritten
    assert rundir_rules.check_workdir(str(workdir), TrainConfig(epochs=5)).action == "resume"
    with pytest.raises(ValueError, match="already trained for 3 epochs; epochs=2 would not"):
        rundir_rules.check_workdir(str(workdir), TrainConfig(epochs=2))


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        rundir_rules.check_workdir(str(tmp_path / "f"), TrainConfig(), overwrite=True)


def test_statuses_are_checked(tmp_path):
    workdir_lib.RunDir(str(tmp_path)).write_status("interrupted", epochs_completed=2)
    expected = {"status": "interrupted", "epochs_completed": 2}
    assert workdir_lib.RunDir(str(tmp_path)).read_status() == expected
    with pytest.raises(ValueError, match=r"status must be one of .*'failed'\); received 'ok'"):
        workdir_lib.RunDir(str(tmp_path)).write_status("ok")


def test_a_run_dir_names_only_the_files_a_run_writes(tmp_path):
    run = workdir_lib.RunDir(tmp_path / "run")  # any path-like
    assert run.path == str(tmp_path / "run")
    assert run.metrics_path == os.path.join(run.path, "metrics.csv")
    assert (run.read_status(), run.read_summary(), run.epochs_recorded()) == (None, None, 0)
    with pytest.raises(ValueError, match=r"name must be one of \(.*\); received 'notes.txt'"):
        run.file("notes.txt")
    assert not (tmp_path / "run").exists()  # naming and reading write nothing


@pytest.mark.parametrize(
    "module", ["noisy_keras.train", "noisy_keras.experiments", "noisy_keras.bench"]
)
def test_help_imports_neither_tensorflow_nor_keras(module):
    """`--help` must not load TensorFlow (it took seconds and printed C++ log lines)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "flags:" in completed.stdout
    imported = {line.split("|")[-1].strip() for line in completed.stderr.splitlines()}
    heavy = sorted(m for m in imported if m.split(".")[0] in ("tensorflow", "keras"))
    assert heavy == [], heavy[:5]
    assert len(imported) > 10  # -X importtime did report the imports
