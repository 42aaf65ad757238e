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
# The gradient methods of the training step (optim.sharpness, engine.methods).
GRADIENT_METHOD_NAMES = ("none", "sam", "gradient_norm_penalty")
PENALTY_GRADIENTS = ("finite_difference", "double_backprop")
DEFAULT_SAM_RHO = 0.05  # Foret et al. 2021

__all__ = [
    "DEFAULT_LARS_EETA",
    "DEFAULT_SAM_RHO",
    "GRADIENT_METHOD_NAMES",
    "LR_SCALING_RULES",
    "OPTIMIZER_NAMES",
    "PENALTY_GRADIENTS",
]
