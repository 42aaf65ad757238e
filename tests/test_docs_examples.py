"""Every code block of the docs and of the README runs, the way a reader would run it.

Python blocks: the blocks of one page run in order in one new interpreter, in an empty
directory, as a reader pasting them one after the other would run them. Shell blocks:
every command of the package (`python -m noisy_keras.train`, `.experiments`, `.bench`) is
parsed by that command's own flag parser, flagfiles and recipes expanded, and a main-job
command is validated as a `TrainConfig` (nothing trains: the study's commands take hours,
CI runs the README's first command itself); the other commands a block may hold are the
installs and test runs `.ci/run` performs.

A Python block that cannot run here says why on the line before it,
`<!-- docs-test: skip: needs ... -->`, naming a GPU, a downloaded data set, several machines
or a package CI does not install; it is still compiled.
"""

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
) + ["README.md"]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!-- docs-test: skip: (.+?) -->\s*$")
SKIP_REASONS = re.compile(r"^needs (a GPU|GPUs|a downloaded data set|several machines|keras-hub)\b")
COMMANDS = {  # python -m noisy_keras.X and its console script -> the module defining its flags
    "noisy_keras.train": "noisy_keras.run.train",
    "noisy-keras-train": "noisy_keras.run.train",
    "noisy_keras.experiments": "noisy_keras.study.experiments",
    "noisy-keras-experiments": "noisy_keras.study.experiments",
    "noisy_keras.bench": "noisy_keras.bench.cli",
    "noisy-keras-bench": "noisy_keras.bench.cli",
}
OTHER_COMMANDS = {"pip", "venv", ".", "export", "pytest", "tensorboard", "git", "cd"}


def blocks(page: str):
    """(language, code, skip reason or None) of every fenced block of `page`."""
    text = open(os.path.join(REPO, page)).read()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append((match.group(1), match.group(2), skip.group(1) if skip else None))
    return found


def shell_commands(code: str):
    """The package's commands of a shell block: (command, arguments) pairs."""
    variables, found, lines, pending = {}, [], [], ""
    for line in code.replace("\\\n", " ").split("\n"):  # a quoted value may span lines
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:
            continue
        lines.append(pending)
        pending = ""
    assert pending == "", f"unclosed quote in {code!r}"
    for line in lines:
        assignment = re.match(r'^(\w+)="([^"]*)"\s*$', line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        for command in line.split("&&"):
            words = shlex.split(command, comments=True)
            if not words:
                continue
            if words[0] in ("python", "python3") and words[1:2] == ["-c"]:
                compile(words[2], "python -c", "exec")  # what it runs is tested where it lives
                continue
            if words[0] in ("python", "python3") and words[1:2] == ["-m"]:
                program, arguments = words[2], words[3:]
            else:
                program, arguments = words[0], words[1:]
            if program in COMMANDS:
                found.append((program, arguments))
            else:
                assert program in OTHER_COMMANDS, f"unknown command {command!r}"
    return found


def test_every_page_has_blocks_and_every_skip_names_an_allowed_reason():
    assert any(language == "python" for language, _, _ in blocks("docs/index.md"))
    for page in PAGES:
        for language, code, skip in blocks(page):
            assert language in ("python", "bash", "text"), (page, language, code[:80])
            if skip is not None:
                assert language == "python", (page, "a shell block is checked, never skipped")
                assert SKIP_REASONS.search(skip), (page, skip)
            if language == "python":
                compile(code, page, "exec")


PYTHON_PAGES = [p for p in PAGES if any(b[0] == "python" and b[2] is None for b in blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES)
def test_the_python_blocks_of_a_page_run_in_a_new_interpreter(page, tmp_path):
    code = "\n\n".join(c for language, c, skip in blocks(page) if language == "python" and not skip)
    script = tmp_path / "page.py"
    script.write_text(code)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(script)], cwd=work, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{page}:\n{result.stderr[-4000:]}"


_CHECK = textwrap.dedent(
    """
    import importlib, json, sys
    from absl import flags
    from noisy_keras.run import flagfile
    module = importlib.import_module(sys.argv[1])
    module.define_flags()
    errors = []
    for program, arguments in json.loads(sys.stdin.read()):
        flags.FLAGS.unparse_flags()
        try:
            flags.FLAGS(flagfile.expand_argv([program, *arguments]))
            if sys.argv[1] == "noisy_keras.run.train":
                module.config_from_flags(flags.FLAGS)
        except (flags.Error, ValueError, flagfile.FlagfileError) as error:
            errors.append(f"{program} {' '.join(arguments)}: {error}")
    print(json.dumps(errors))
    """
)


def test_every_command_in_a_shell_block_parses_with_its_own_flags():
    by_module = {}
    for page in PAGES:
        for language, code, _ in blocks(page):
            if language == "bash":
                for program, arguments in shell_commands(code):
                    by_module.setdefault(COMMANDS[program], []).append((program, arguments))
    assert set(by_module) == set(COMMANDS.values())  # the docs show every command
    for module, commands in by_module.items():
        result = subprocess.run(
            [sys.executable, "-c", _CHECK, module],
            input=json.dumps(commands),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == [], module
