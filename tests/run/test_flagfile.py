"""Flagfiles and recipes: includes beside the including file, recipes by name, argv expansion."""

import os
import subprocess
import sys

import pytest

from noisy_keras.run import config as config_lib
from noisy_keras.run import flagfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_shipped_recipe_is_listed_and_reads_into_a_valid_config():
    names = flagfile.recipe_names()
    assert names == sorted(
        name[: -len(".flags")]
        for name in os.listdir(os.path.join(REPO, "flags"))
        if name.endswith(".flags")
    )
    assert "digits_b1024_noise" in names and len(names) == len(flagfile.recipes())
    for name in names:
        values = config_lib.read_flagfile(flagfile.resolve(name))
        assert "flagfile" not in values, name
        config_lib.config_from_strings(values)  # raises on an unknown or invalid flag


def test_an_include_is_found_beside_the_including_file_before_the_working_directory(
    tmp_path, monkeypatch
):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "base.flags").write_text(
        "# the base\n--batch_size=64\n// also a comment\n--epochs=3\n"
    )
    (recipes / "cell.flags").write_text("--flagfile=base.flags\n--batch_size=256\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "base.flags").write_text("--batch_size=1\n")  # same name in the cwd: not used
    monkeypatch.chdir(elsewhere)
    path = str(recipes / "cell.flags")
    assert flagfile.flag_lines(path) == ["--batch_size=64", "--epochs=3", "--batch_size=256"]
    assert config_lib.read_flagfile(path) == {"batch_size": "256", "epochs": "3"}
    entries = flagfile.flag_entries(path)
    assert [(os.path.basename(f), n) for f, n, _ in entries] == [
        ("base.flags", 2),
        ("base.flags", 4),
        ("cell.flags", 2),
    ]


def test_a_shipped_recipe_may_be_included_by_name_from_a_file_of_ones_own(tmp_path):
    mine = tmp_path / "mine.flags"
    mine.write_text("--flagfile=repro_digits\n--epochs=2\n")
    values = config_lib.read_flagfile(str(mine))
    assert (values["dataset"], values["model"], values["epochs"]) == ("digits", "mlp", "2")


def test_missing_files_unknown_recipes_and_cycles_are_refused_with_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"flagfile '.*missing.flags' does not exist"):
        config_lib.read_flagfile(str(tmp_path / "missing.flags"))
    with pytest.raises(
        flagfile.FlagfileNotFoundError,
        match=r"--recipe='digits_b999' is not a recipe shipped with the package; recipes: "
        r"caltech101_resnet50_b128, .*digits_b1024_noise, ",
    ):
        flagfile.resolve("digits_b999", argument="recipe")
    with pytest.raises(
        flagfile.FlagfileNotFoundError, match=r"--flagfile='nope/x.flags' is neither"
    ):
        flagfile.resolve("nope/x.flags")
    a, b = tmp_path / "a.flags", tmp_path / "b.flags"
    a.write_text("--flagfile=b.flags\n")
    b.write_text("--flagfile=a.flags\n")
    with pytest.raises(
        flagfile.FlagfileError, match=r"includes itself: a.flags -> b.flags -> a.flags"
    ):
        flagfile.flag_lines(str(a))
    bad = tmp_path / "bad.flags"
    bad.write_text("--flagfile=missing_include.flags\n")
    with pytest.raises(FileNotFoundError, match=r"--flagfile='missing_include.flags' is neither"):
        config_lib.read_flagfile(str(bad))


def test_expand_argv_puts_a_recipe_in_place_so_later_flags_override_it(tmp_path):
    base = flagfile.flag_lines(flagfile.resolve("digits_b1024_noise"))
    argv = ["prog", "--seed=3", "--recipe=digits_b1024_noise", "--epochs=2", "--", "--recipe=x"]
    assert flagfile.expand_argv(argv) == [
        "prog",
        "--seed=3",
        "--recipe=digits_b1024_noise",
        *base,
        "--epochs=2",
        "--",
        "--recipe=x",  # after --: not a flag, left alone
    ]
    assert flagfile.expand_argv(["prog", "--recipe", "digits_b32"]) == [
        "prog",
        "--recipe=digits_b32",
        *flagfile.flag_lines(flagfile.resolve("digits_b32")),
    ]
    mine = tmp_path / "mine.flags"
    mine.write_text("--flagfile=repro_digits.flags\n--epochs=2\n")
    assert flagfile.expand_argv(["prog", f"--flagfile={mine}"]) == [
        "prog",
        *flagfile.flag_lines(flagfile.resolve("repro_digits")),
        "--epochs=2",
    ]


def _cli_env():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    return env


def test_the_main_job_runs_a_recipe_by_name_from_any_directory_with_overrides(tmp_path):
    command = [
        sys.executable,
        "-m",
        "noisy_keras.train",
        "--recipe=digits_b1024_noise",
        "--epochs=2",
        "--updates_per_epoch=1",
        "--workdir=run",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=_cli_env(), timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("noisy_keras.train: done | 2 epochs")
    saved = config_lib.read_flagfile(str(tmp_path / "run" / "flags.txt"))
    recipe = config_lib.read_flagfile(flagfile.resolve("digits_b1024_noise"))
    assert (saved["model"], saved["batch_size"], saved["noise_alpha"]) == ("mlp", "1024", "1e-05")
    assert saved["epochs"] == "2" != recipe["epochs"]  # given after the recipe: it wins
    assert saved.pop("workdir") == "run"
    overridden = {"epochs": "2", "updates_per_epoch": "1"}
    assert config_lib.config_from_strings(saved) == config_lib.config_from_strings(
        {**recipe, **overridden}
    )

    unknown = subprocess.run(
        [sys.executable, "-m", "noisy_keras.train", "--recipe=digits_b999"],
        capture_output=True,
        text=True,
        cwd=tmp_path / "run",
        env=_cli_env(),
        timeout=300,
    )
    assert unknown.returncode == 2
    assert unknown.stderr.startswith(
        "noisy_keras.train: error: --recipe='digits_b999' is not a recipe shipped with the "
        "package; recipes: caltech101_resnet50_b128, "
    ), unknown.stderr[-2000:]
    assert len(unknown.stderr.strip().splitlines()) == 1
