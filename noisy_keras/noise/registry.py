"""The noise kinds by name, the paper's constants and the seed range, without TensorFlow.

`run.recipe` builds each kind; `run.config` validates `--noise`, `--noise_alpha`,
`--noise_gamma` and `--seed` with these.
"""

NOISE_KINDS = ("none", "white", "matched", "multiplicative")
PAPER_ALPHA = 1e-5
"""alpha of the paper's schedule sigma_t^2 = alpha / (1 + t)^gamma (Jaiswal & Taura, Sec. 3.1)."""
PAPER_GAMMA = 0.55
"""gamma of the paper's schedule: the noise's variance decays as (1 + t)^-0.55."""
SEED_MAX = 2**31 - 1  # seeds of the noise draw are < 2**31

__all__ = ["NOISE_KINDS", "PAPER_ALPHA", "PAPER_GAMMA", "SEED_MAX"]
