"""The noise: schedule, draw, the NoisyOptimizer wrapper, the matched and multiplicative kinds."""
