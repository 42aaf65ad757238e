"""The engine's strategies and device-policy choices by name, without TensorFlow.

`engine.distribute` makes the strategies and resolves the choices; `run.config`
validates `--strategy`, `--xla`, `--deterministic` and `--precision` against these.
"""

STRATEGY_NAMES = ("default", "mirrored", "multiworker")
XLA_CHOICES = ("auto", "true", "false")
DETERMINISM_CHOICES = ("auto", "true", "false")
PRECISION_CHOICES = ("float32", "mixed_float16", "mixed_bfloat16")

__all__ = ["DETERMINISM_CHOICES", "PRECISION_CHOICES", "STRATEGY_NAMES", "XLA_CHOICES"]
