"""Gradient-family explainers: saliency, input x gradient, and the input and random baselines."""

from __future__ import annotations

import optree
import torch

from fxattr._explainer import (
    check_choice,
    check_model,
    explainer,
    grad_of_target,
    tree_map,
)
from fxattr.errors import api_boundary, check_finite, fail
from fxattr.targets import check_target

__all__ = ["gradient", "input", "input_x_gradient", "random"]

_POSTPROCESS = {None: lambda g: g, "abs": torch.abs, "square": torch.square}


@api_boundary("gradient")
def gradient(f, *, postprocess=None):
    """Saliency: the gradient of the target output with respect to the input.

    ``explain(params, x, target)`` returns ``d f(params, x)[target] / dx`` (seeded with 1, as
    iNNvestigate's ``gradient`` and captum's ``Saliency(abs=False)``), optionally post-processed.

    Args:
        f: the function of ``fxattr.functionalize``.
        postprocess: ``None`` (the signed gradient), ``"abs"`` (Simonyan et al.; captum's default)
            or ``"square"``, applied to every tensor of the gradient; or a callable ``gradient ->
            attributions`` (PyTorch-Explanations' ``SimpleGradient(post_process=...)``) called with
            the gradient of one example (x's structure), so it must work under ``torch.vmap`` and
            should be differentiable for second-order use (e.g. ``lambda g: g.abs().amax(0)``, the
            channel maximum).

    Example:
        >>> f, params = fxattr.functionalize(model)
        >>> explain = fxattr.gradient(f)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    check_model("gradient", f)
    custom = callable(postprocess) and not isinstance(postprocess, (str, torch.Tensor))
    if not custom:
        if not isinstance(postprocess, (str, type(None))):
            raise fail("gradient", "postprocess must be None, 'abs', 'square' or a callable gradient -> "
                                   f"attributions; got {postprocess!r:.80}")
        check_choice("gradient", "postprocess", postprocess, tuple(_POSTPROCESS))

    def explain(params, x, target=None):
        grads = grad_of_target("gradient", f, params, x, target)
        if not custom:
            return tree_map(_POSTPROCESS[postprocess], grads)
        result = postprocess(grads)
        leaves = optree.tree_leaves(result, namespace="torch")
        if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
            raise fail("gradient", "postprocess must return a tensor or a pytree of tensors, got "
                                   f"{type(result).__name__}")
        return result

    # a callable may change the shape: an empty batch then runs it on a zero example
    return explainer("gradient", f, {"postprocess": postprocess}, explain, empty="run" if custom else "like_x")


@api_boundary("input_x_gradient")
def input_x_gradient(f):
    """Input times gradient: ``x * d f(params, x)[target] / dx`` (iNNvestigate's ``input_t_gradient``).

    Example:
        >>> explain = fxattr.input_x_gradient(f)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    check_model("input_x_gradient", f)

    def explain(params, x, target=None):
        grads = grad_of_target("input_x_gradient", f, params, x, target)
        return tree_map(torch.mul, x, grads)

    return explainer("input_x_gradient", f, {}, explain)


@api_boundary("input")
def input(f):
    """The input itself, as an attribution: a sanity-check baseline (iNNvestigate's ``input``).

    Example:
        >>> torch.vmap(fxattr.input(f), in_dims=(None, 0, 0))(params, images, labels)
    """
    check_model("input", f)

    def explain(params, x, target=None):
        check_target("input", target)
        return x

    return explainer("input", f, {}, explain)


@api_boundary("random")
def random(f, *, stddev: float = 1.0):
    """Gaussian noise of the input's shape: the chance-level baseline (iNNvestigate's ``random``).

    Draws from torch's global generator, so ``torch.manual_seed`` makes it reproducible; under
    ``torch.vmap`` pass ``randomness="different"`` (or ``"same"``).

    Example:
        >>> torch.manual_seed(0)
        >>> torch.vmap(fxattr.random(f), in_dims=(None, 0, 0), randomness="different")(params, images, labels)
    """
    check_model("random", f)
    stddev = check_finite("random", "stddev", stddev, minimum=0)

    def explain(params, x, target=None):
        check_target("random", target)
        return tree_map(lambda t: stddev * torch.randn_like(t), x)

    return explainer("random", f, {"stddev": stddev}, explain)
