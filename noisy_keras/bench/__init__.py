"""Benchmarks: what the noise costs, what the engine gains, time to accuracy, memory.

Run `python -m noisy_keras.bench --help`; see `noisy_keras.bench.cli`. Modules:
`harness` (interleaved timing, peak memory), `workloads` (models, data, a train
step), one module per part (`noise_overhead`, `engine`, `time_to_accuracy`,
`memory`), `report` (Markdown tables) and `cli` (the command line).
"""

from noisy_keras.bench.cli import PART_NAMES, run, run_benchmarks
from noisy_keras.bench.harness import interleaved_step_times, peak_rss_bytes

__all__ = ["PART_NAMES", "interleaved_step_times", "peak_rss_bytes", "run", "run_benchmarks"]
