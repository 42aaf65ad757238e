"""The engine: per-replica XLA steps under tf.distribute, noise hooks, fit, checkpoints."""
