"""The learning-rate rules and optimizers by name, without TensorFlow.

`optim.lr` implements the rules and `run.recipe` builds the optimizers (tests keep
both equal to these); `run.config` validates `--lr_scaling` and `--optimizer`.
"""

LR_SCALING_RULES = ("linear", "sqrt", "none")
# LARS (You et al. 2017) is for batches of 8k-32k.
OPTIMIZER_NAMES = (
    "sgd",
    "momentum",
    "nesterov",
    "adam",
    "adamw",
    "lamb",
    "rmsprop",
    "lion",
    "lars",
)
DEFAULT_LARS_EETA = 0.001  # LARS' trust coefficient (You et al. 2017)

__all__ = ["DEFAULT_LARS_EETA", "LR_SCALING_RULES", "OPTIMIZER_NAMES"]
