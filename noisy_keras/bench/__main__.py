"""`python -m noisy_keras.bench`: see `noisy_keras.bench.cli`."""

from noisy_keras.bench.cli import run

run()
