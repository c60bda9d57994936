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

from fxattr.analyzer import Analyzer, create_analyzer, list_analyzers
from fxattr.cam import cam, gradcam, gradcam_plus_plus, guided_gradcam, layercam, scorecam, xgradcam
from fxattr.deeplift import deeplift, deeplift_shap
from fxattr.errors import FxattrError
from fxattr.expected import expected_gradients, gradient_shap
from fxattr.functional import FunctionalModel, functionalize
from fxattr.gradient import gradient, input, input_x_gradient, random
from fxattr.integrated import QUADRATURES, integrated_gradients, quadrature
from fxattr.lrp import deconvnet, deep_taylor, deep_taylor_bounded, guided_backprop, lrp
from fxattr.noise import noise_tunnel, smoothgrad, smoothgrad_sq, vargrad
from fxattr.pattern import pattern_attribution, patternnet
from fxattr.perturbation import feature_ablation, occlusion, rise, rise_masks
from fxattr.targets import select
from fxattr import viz

__version__ = "0.1.0"

__all__ = [
    "Analyzer",
    "QUADRATURES",
    "FunctionalModel",
    "FxattrError",
    "cam",
    "create_analyzer",
    "deconvnet",
    "deeplift",
    "deeplift_shap",
    "deep_taylor",
    "deep_taylor_bounded",
    "expected_gradients",
    "feature_ablation",
    "functionalize",
    "gradcam",
    "gradcam_plus_plus",
    "gradient",
    "gradient_shap",
    "guided_backprop",
    "guided_gradcam",
    "input",
    "input_x_gradient",
    "integrated_gradients",
    "layercam",
    "list_analyzers",
    "lrp",
    "noise_tunnel",
    "occlusion",
    "pattern_attribution",
    "patternnet",
    "quadrature",
    "random",
    "rise",
    "rise_masks",
    "scorecam",
    "select",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "viz",
    "xgradcam",
]
