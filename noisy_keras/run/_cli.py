"""What the command lines share: quiet TensorFlow start-up, and Ctrl-C at a batch boundary.

Only the command-line entry points (`noisy_keras.train`, `noisy_keras.experiments`,
`noisy_keras.bench`) call these; importing the library changes neither logging
nor signal handling.

* `quiet_tensorflow()`: TensorFlow's C++ start-up lines (oneDNN, CUDA drivers,
  cuInit, CPU features, "All log messages before absl::InitializeLog()") are
  printed before TensorFlow's own log level applies, so the import runs with
  file descriptor 2 pointed at /dev/null, and TF_CPP_MIN_LOG_LEVEL=3 (unless set)
  silences the rest. Python exceptions still propagate; Python's stderr works
  as usual afterwards. `NOISY_KERAS_TF_LOGS=1` turns all of it off.
* `run_app(main, program)`: `absl.app.run` with `--help` (also `-h`, `-?`,
  `--helpshort`) and `--helpfull` printing to stdout and exiting 0, as a help
  request should (absl's own help flags exit 1), and every `--flagfile=` and
  `--recipe=` expanded by `noisy_keras.run.flagfile.expand_argv` (includes relative
  to the including file, recipes by name) before absl parses the flags.
* `sigint_at_batch_boundaries()` + `interrupt_callback`: the first Ctrl-C
  (SIGINT) only sets a flag while training, and the callback raises
  KeyboardInterrupt at the end of the current batch, so no checkpoint or
  metrics row is cut in half; outside training, or on a second Ctrl-C, it
  raises at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

TF_LOGS_ENV = "NOISY_KERAS_TF_LOGS"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C

__all__ = [
    "EXIT_INTERRUPTED",
    "TF_LOGS_ENV",
    "interrupt_callback",
    "help_requested",
    "parse_flags",
    "run_app",
    "defer_interrupts",
    "quiet_tensorflow",
    "sigint_at_batch_boundaries",
    "tensorflow_logs_wanted",
]


SHORT_HELP = ("-h", "-help", "--help", "-?", "--helpshort", "-helpshort")
FULL_HELP = ("--helpfull", "-helpfull")


def _flag_arguments(argv) -> list[str]:
    arguments = list(argv[1:])
    return arguments[: arguments.index("--")] if "--" in arguments else arguments


def help_requested(argv) -> bool:
    """Whether a command line (`argv`, the program first) asks for its help."""
    return any(a in SHORT_HELP or a in FULL_HELP for a in _flag_arguments(argv))


def parse_flags(argv: list[str], program: str) -> list[str]:
    """absl's flag parsing for `app.run`: help on stdout with exit 0, flagfiles expanded.

    Arguments after a bare `--` are not flags and are not looked at. A flagfile or
    recipe that cannot be found ends the program with one line and exit status 2.
    """
    from absl import app

    from noisy_keras.run import flagfile

    for argument in _flag_arguments(argv):
        if argument in SHORT_HELP or argument in FULL_HELP:
            app.usage(shorthelp=argument in SHORT_HELP, writeto_stdout=True)
            if argument in SHORT_HELP:
                print("\nTry --helpfull to get a list of all flags.")
            sys.stdout.flush()
            raise SystemExit(0)
    try:
        argv = flagfile.expand_argv(argv)
    except flagfile.FlagfileError as error:
        print(f"{program}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return app.parse_flags_with_usage(argv)


def run_app(main, program: str) -> None:
    """`absl.app.run(main)` with `parse_flags` (help exits 0, flagfiles expanded)."""
    from absl import app

    app.run(main, flags_parser=lambda argv: parse_flags(argv, program))


def tensorflow_logs_wanted() -> bool:
    """Whether `NOISY_KERAS_TF_LOGS` asks for TensorFlow's C++ logs (1, true, yes)."""
    return os.environ.get(TF_LOGS_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_tensorflow() -> None:
    """Imports TensorFlow and Keras without their C++ start-up lines (see the module doc).

    Does nothing but the import when `NOISY_KERAS_TF_LOGS=1`, and nothing at all
    when TensorFlow is already imported.
    """
    if tensorflow_logs_wanted():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    with _stderr_to_devnull():
        import keras  # noqa: F401  (imports TensorFlow and registers our classes)
        import tensorflow  # noqa: F401


class _InterruptState:
    handler_installed = False
    deferring = False
    requested = False


_state = _InterruptState()


def _on_sigint(signum, frame):
    if _state.deferring and not _state.requested:
        _state.requested = True  # interrupt_callback raises at the end of this batch
        return
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigint_at_batch_boundaries():
    """Installs the Ctrl-C handler of the command lines for the duration of the block."""
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _state.handler_installed = True
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _state.handler_installed = False
        _state.deferring = _state.requested = False


@contextlib.contextmanager
def defer_interrupts():
    """Within the block (training), a first Ctrl-C waits for `interrupt_callback`.

    Has no effect unless `sigint_at_batch_boundaries` is active.
    """
    _state.deferring, _state.requested = True, False
    try:
        yield
    finally:
        _state.deferring = False
    if _state.requested:  # asked during the last batch, after the callback's last look
        _state.requested = False
        raise KeyboardInterrupt


def interrupt_callback():
    """A Keras callback raising KeyboardInterrupt at a batch end after a deferred Ctrl-C."""
    import keras

    class _Interrupt(keras.callbacks.Callback):
        def _check(self, batch=None, logs=None):
            if _state.requested:
                _state.requested = False
                raise KeyboardInterrupt

        on_train_batch_end = _check
        on_test_batch_end = _check

    return _Interrupt()
