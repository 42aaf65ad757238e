"""Learning-rate rules and optimizers for large batches (LARS)."""
