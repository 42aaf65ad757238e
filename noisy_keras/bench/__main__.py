"""`python -m noisy_keras.bench`: see `noisy_keras.bench.cli`."""

from absl import flags

from noisy_keras.bench import cli

__doc__ = cli.__doc__  # absl prints the main module's docstring as the usage
cli.define_flags()
flags.adopt_module_key_flags(cli)  # --help lists the benchmark's flags, defined in cli
cli.run()
