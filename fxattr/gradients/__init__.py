"""The gradient family: gradient, input x gradient, integrated gradients, noise tunnels, expected
gradients — vjps of the model, vmapped over steps and samples."""

from fxattr.gradients._expected import expected_gradients, gradient_shap
from fxattr.gradients._gradient import gradient, input, input_x_gradient, random
from fxattr.gradients._integrated import QUADRATURES, integrated_gradients, quadrature
from fxattr.gradients._noise import noise_tunnel, smoothgrad, smoothgrad_sq, vargrad

__all__ = [
    "QUADRATURES", "expected_gradients", "gradient", "gradient_shap", "input", "input_x_gradient",
    "integrated_gradients", "noise_tunnel", "quadrature", "random", "smoothgrad", "smoothgrad_sq",
    "vargrad",
]
