"""The models by name, and their traits, without TensorFlow.

`models.zoo` builds each name (a test keeps `zoo`'s builders and `MODEL_NAMES`
equal); `run.config` validates `--model` against these names; the noise kinds
read the traits (matched noise without accumulation would split a batch-norm
model's batches in halves; the determinism policy reads max pooling).
"""

MODEL_NAMES = ("mlp", "cnn", "cnn1d", "cnn1d_bn", "resnet20", "resnet50")
MODELS_WITH_BATCH_NORM = ("cnn1d_bn", "resnet20", "resnet50")
MODELS_WITH_RESIDUAL_BN = ("resnet20", "resnet50")
# Max pooling, whose gradient XLA cannot compute deterministically (the determinism policy).
MODELS_WITH_MAX_POOLING = ("cnn", "resnet50")

__all__ = [
    "MODELS_WITH_BATCH_NORM",
    "MODELS_WITH_MAX_POOLING",
    "MODELS_WITH_RESIDUAL_BN",
    "MODEL_NAMES",
]
