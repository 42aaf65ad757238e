"""Measurements behind the paper's argument, as pure functions; plots kept separate.

* `interpolation`: the parametric plot between a small-batch and a large-batch
  minimum (Keskar et al. 2017, Fig. 2; Jaiswal & Taura, Fig. 6).
* `hessian`: sharpness as the top Hessian eigenvalues of the training loss, and
  the Hessian trace (Jastrzebski et al. 2018; Jaiswal & Taura, Fig. 3).
* `sharpness`: Keskar et al.'s epsilon-sharpness in a random subspace (Metric 2.1).
* `gradient_noise`: per-example gradients, tr(Sigma), the 1/B law of the
  mini-batch gradient variance (Jaiswal & Taura, Eq. 3-6) and McCandlish et al.'s
  simple noise scale.
* `noise_temperature`: the noise temperature each noise kind produces at a
  large batch against small-batch SGD's (Jaiswal & Taura, Eq. 6-7).
* `stats`: mean, standard deviation and Student-t confidence interval over seeds.
* `plots`: accuracy curves, parametric plot, noise comparison, gap vs batch size.
"""

from noisy_keras import _extras

# The [analysis] extra: checked here, so any part of the package names it when missing.
for _module in ("matplotlib", "scipy"):
    _extras.require(_module, "noisy_keras.analysis")

from noisy_keras.analysis.gradient_noise import (
    MinibatchVariance,
    NoiseScaleEstimate,
    covariance_trace,
    exact_simple_noise_scale,
    minibatch_gradient_variance,
    per_example_gradients,
    simple_noise_scale,
    simple_noise_scale_from_norms,
    variance_factor,
)
from noisy_keras.analysis.hessian import (
    HessianOperator,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)
from noisy_keras.analysis.interpolation import (
    InterpolationResult,
    evaluate_loss_accuracy,
    interpolate_weights,
    interpolated_model,
    parametric_interpolation,
    recompute_batchnorm_statistics,
)
from noisy_keras.analysis.noise_temperature import (
    NoiseTemperature,
    measure_noise_temperatures,
    noise_temperatures,
)
from noisy_keras.analysis.plots import (
    history_columns,
    metric_label,
    plot_accuracy_curves,
    plot_gap_vs_batch_size,
    plot_noise_comparison,
    plot_parametric,
)
from noisy_keras.analysis.sharpness import (
    SharpnessResult,
    epsilon_sharpness,
    loss_and_gradient_function,
    random_subspace,
    sharpness_of_function,
)
from noisy_keras.analysis.spectral import (
    EigenResult,
    TraceEstimate,
    hutchinson_trace,
    lanczos,
    power_iteration,
    top_eigenvalue_power,
)
from noisy_keras.analysis.stats import Summary, summarize

__all__ = [
    "EigenResult",
    "HessianOperator",
    "InterpolationResult",
    "MinibatchVariance",
    "NoiseScaleEstimate",
    "NoiseTemperature",
    "SharpnessResult",
    "Summary",
    "TraceEstimate",
    "covariance_trace",
    "epsilon_sharpness",
    "evaluate_loss_accuracy",
    "exact_simple_noise_scale",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "history_columns",
    "metric_label",
    "hutchinson_trace",
    "interpolate_weights",
    "interpolated_model",
    "lanczos",
    "loss_and_gradient_function",
    "measure_noise_temperatures",
    "minibatch_gradient_variance",
    "noise_temperatures",
    "parametric_interpolation",
    "per_example_gradients",
    "plot_accuracy_curves",
    "plot_gap_vs_batch_size",
    "plot_noise_comparison",
    "plot_parametric",
    "power_iteration",
    "random_subspace",
    "recompute_batchnorm_statistics",
    "sharpness_of_function",
    "simple_noise_scale",
    "simple_noise_scale_from_norms",
    "summarize",
    "top_eigenvalue_power",
    "variance_factor",
]
