"""fxattr: functional attribution for PyTorch.

A model becomes a pure function ``f(params, x)`` of one example (:func:`functionalize`); every
attribution method is a transformation ``method(f, **config) -> explain``, called
``explain(params, x, target)``, that composes with ``torch.vmap``, ``torch.func.grad`` (exact
higher-order derivatives) and ``torch.compile``::

    f, params = fxattr.functionalize(model.eval())
    explain = fxattr.integrated_gradients(f, steps=32)
    batch_explain = torch.compile(torch.vmap(explain, in_dims=(None, 0, 0)))
    attributions = batch_explain(params, images, labels)
"""

from fxattr import graph, viz
from fxattr.analyzer import Analyzer, create_analyzer, list_analyzers
from fxattr.cams import cam, gradcam, gradcam_plus_plus, guided_gradcam, layercam, scorecam, xgradcam
from fxattr.errors import FxattrError
from fxattr.functional import FunctionalModel, functionalize
from fxattr.gradients import (QUADRATURES, expected_gradients, gradient, gradient_shap, input,
                              input_x_gradient, integrated_gradients, noise_tunnel, quadrature,
                              random, smoothgrad, smoothgrad_sq, vargrad)
from fxattr.perturbation import (feature_ablation, kernel_shap, lime, occlusion, rise, rise_masks,
                                 shapley_value_sampling, shapley_values)
from fxattr.propagation import crp, crp_reference_samples
from fxattr.propagation import (beta_smooth, deconvnet, deep_taylor, deep_taylor_bounded, deeplift, deeplift_shap,
                                guided_backprop, load_patterns, lrp, pattern_attribution, patternnet,
                                save_patterns)
from fxattr.targets import select
from fxattr.runner import attribute_dataset, load_attributions
from fxattr import text  # noqa: E402  (after the explainers it wraps)
from fxattr import layers  # noqa: E402  (after the explainers it cuts the model for)
from fxattr import metrics  # noqa: E402  (after the explainers its metrics re-run)

__version__ = "0.1.0"

__all__ = [
    "Analyzer",
    "attribute_dataset",
    "beta_smooth",
    "cam",
    "create_analyzer",
    "crp",
    "crp_reference_samples",
    "deconvnet",
    "deep_taylor",
    "deep_taylor_bounded",
    "deeplift",
    "deeplift_shap",
    "expected_gradients",
    "feature_ablation",
    "functionalize",
    "FunctionalModel",
    "FxattrError",
    "gradcam",
    "gradcam_plus_plus",
    "gradient",
    "gradient_shap",
    "graph",
    "guided_backprop",
    "guided_gradcam",
    "input",
    "input_x_gradient",
    "integrated_gradients",
    "kernel_shap",
    "layercam",
    "layers",
    "lime",
    "list_analyzers",
    "load_attributions",
    "load_patterns",
    "lrp",
    "metrics",
    "noise_tunnel",
    "occlusion",
    "pattern_attribution",
    "patternnet",
    "quadrature",
    "QUADRATURES",
    "random",
    "rise",
    "rise_masks",
    "save_patterns",
    "scorecam",
    "select",
    "shapley_value_sampling",
    "shapley_values",
    "smoothgrad",
    "smoothgrad_sq",
    "text",
    "vargrad",
    "viz",
    "xgradcam",
]
