"""Expected gradients (Erion et al. 2021) / gradient SHAP (Lundberg and Lee 2017, captum's GradientShap).

Integrated gradients averaged over baselines drawn from a reference set, with the integral itself
estimated by one random point per draw::

    EG_i(x) = E_{b ~ B, a ~ U(0, 1)} [ (x_i - b_i) * d f(b + a (x - b))[target] / dx_i ]

estimated by the mean over ``samples`` draws of a baseline index, an ``a`` and (optionally) Gaussian
input noise. The draws are evaluated with ``torch.vmap`` (``chunk_size`` at a time); they come from
torch's global generator, so ``torch.manual_seed`` reproduces a run,
``torch.vmap(..., randomness="different")`` gives each example its own draws, and
``explain(..., noise=draws)`` replays given draws exactly.
"""

from __future__ import annotations

import inspect

import optree
import torch
from torch import Tensor

from fxattr._explainer import (
    check_int,
    check_model,
    explainer,
    fixed_target,
    grad_of_target,
    tree_map,
)
from fxattr.errors import FxattrError, api_boundary, check_finite, fail
from fxattr.targets import check_target, is_concrete, readable, select

__all__ = ["expected_gradients", "gradient_shap"]

_WHERE = "expected_gradients"


def _check_baselines(where, baselines):
    leaves = optree.tree_leaves(baselines, namespace="torch")
    if not leaves or not all(isinstance(b, Tensor) for b in leaves):
        raise fail(where, "baselines must be a tensor of shape (N, *x.shape) holding the reference "
                          f"set (or a pytree of those matching x), got {type(baselines).__name__}")
    for b in leaves:
        plain = readable(b)  # returned by a callable under vmap: read under the wrappers
        if b.dtype.is_floating_point and b.numel() and plain is not None and not bool(torch.isfinite(plain).all()):
            raise fail(where, "baselines hold NaN or Inf values")
        if not b.dtype.is_floating_point:
            raise fail(where, f"baselines must be floating-point, got dtype {b.dtype}")
    sizes = {b.shape[0] if b.ndim else None for b in leaves}
    if None in sizes or 0 in sizes or len(sizes) != 1:
        raise fail(where, "baselines must have a leading axis of N >= 1 reference examples, the same "
                          f"N for every leaf; got shapes {[tuple(b.shape) for b in leaves]}")
    return sizes.pop()


def _match_baselines(where, baselines, x):
    """Baselines in x's dtype and device, their shapes checked against x's."""
    try:
        return tree_map(lambda b, t: _one_baseline(where, b, t), baselines, x)
    except FxattrError:
        raise
    except ValueError as error:
        raise fail(where, f"baselines' structure does not match x's: {error}") from error


def _one_baseline(where, b, t):
    if tuple(b.shape[1:]) != tuple(t.shape):
        raise fail(where, f"baselines has shape {tuple(b.shape)}, expected (N, *x.shape) = "
                          f"(N, {', '.join(map(str, t.shape))})")
    return b.to(dtype=t.dtype, device=t.device)


def _check_noise(where, noise, x, samples, count, sigma):
    if not isinstance(noise, dict) or not {"index", "alpha"} <= set(noise) or set(noise) - {"index", "alpha", "normal"}:
        raise fail(where, "noise must be a dict with keys 'index' (samples,) baseline indices, "
                          "'alpha' (samples,) path positions and, when sigma > 0, 'normal' "
                          f"(samples, *x.shape) standard-normal draws; got {noise!r:.80}")
    index, alpha = noise["index"], noise["alpha"]
    if not isinstance(index, Tensor) or index.dtype.is_floating_point or tuple(index.shape) != (samples,):
        raise fail(where, f"noise['index'] must be an integer tensor of shape ({samples},), got "
                          f"{getattr(index, 'dtype', type(index).__name__)} {tuple(getattr(index, 'shape', ()))}")
    if not isinstance(alpha, Tensor) or not alpha.dtype.is_floating_point or tuple(alpha.shape) != (samples,):
        raise fail(where, f"noise['alpha'] must be a float tensor of shape ({samples},), got "
                          f"{getattr(alpha, 'dtype', type(alpha).__name__)} {tuple(getattr(alpha, 'shape', ()))}")
    if is_concrete(index) and index.numel() and not (0 <= int(index.min()) and int(index.max()) < count):
        raise fail(where, f"noise['index'] must lie in [0, {count}) (the number of baselines)")
    if sigma > 0 and "normal" not in noise:
        raise fail(where, "noise needs 'normal' (samples, *x.shape) draws when sigma > 0")
    if "normal" in noise:
        normal_leaves, normal_tree = optree.tree_flatten(noise["normal"], namespace="torch")
        x_leaves, x_tree = optree.tree_flatten(x, namespace="torch")
        if normal_tree != x_tree:
            raise fail(where, f"noise['normal']'s structure {normal_tree} does not match x's {x_tree}")
        for e, t in zip(normal_leaves, x_leaves):
            if not isinstance(e, Tensor) or tuple(e.shape) != (samples, *t.shape):
                shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
                raise fail(where, f"noise['normal'] has shape {shape}, expected (samples, *x.shape) "
                                  f"= {(samples, *t.shape)}")


def _check_flags(where, multiply_by_inputs, return_convergence_delta):
    for name, value in (("multiply_by_inputs", multiply_by_inputs),
                        ("return_convergence_delta", return_convergence_delta)):
        if not isinstance(value, bool):
            raise fail(where, f"{name} must be True or False, got {value!r}")


def _baseline_function(where, baselines):
    """A callable ``baselines`` as ``x -> reference set``; captum's zero-argument form included."""
    try:
        parameters = [p for p in inspect.signature(baselines).parameters.values()
                      if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        parameters = [None]
    if len(parameters) > 1:
        raise fail(where, f"a callable baselines must take x (one example) or nothing, it takes "
                          f"{len(parameters)} arguments")
    return (lambda x: baselines(x)) if parameters else (lambda x: baselines())


@api_boundary("expected_gradients")
def expected_gradients(f, *, baselines, samples: int = 16, sigma: float = 0.0,
                       chunk_size: int | None = None, multiply_by_inputs: bool = True,
                       return_convergence_delta: bool = False):
    """Expected gradients: IG with baselines drawn from a set and one random path point per draw.

    For ``k = 1..samples``: draw a baseline ``b_k`` uniformly from ``baselines``, ``a_k ~ U(0, 1)``
    and, when ``sigma > 0``, a noisy input ``x_k = x + sigma * eps_k`` (``eps_k ~ N(0, 1)``; an
    absolute standard deviation, as captum's ``stdevs``). The attribution is the mean over k of
    ``(x_k - b_k) * d f(b_k + a_k (x_k - b_k))[target] / dx``. With ``sigma=0`` this is Erion et
    al.'s expected gradients; with ``sigma > 0`` it is captum's ``GradientShap(stdevs=sigma)``
    (same estimator, same draws -- see ``noise`` below -- same numbers). In expectation the
    attributions sum to ``f(x) - mean_b f(b)`` exactly for a linear model, and approximately
    otherwise (completeness of IG, averaged over the baselines).

    ``target=None`` explains the argmax of the output at the clean x, held fixed over the draws.

    The returned explainer is ``explain(params, x, target=None, *, noise=None)``. Without
    ``noise`` the draws come from torch's global generator, in this order: ``index =
    torch.randint(N, (samples,))``, ``alpha = torch.rand(samples)``, then (``sigma > 0`` only)
    ``normal = torch.randn(samples, *x.shape)``; so ``torch.manual_seed`` reproduces a run and, under
    ``torch.vmap``, ``randomness="different"`` gives each example its own draws (``"same"``
    shares them). ``noise=dict(index=..., alpha=..., normal=...)`` (``normal`` only with ``sigma >
    0``; a pytree like x for a pytree x) replays given draws exactly.

    Args:
        f: the function of ``fxattr.functionalize``.
        baselines: the reference set, a tensor of shape ``(N, *x.shape)`` (e.g. a batch of training
            examples), or a pytree of those matching x; or a callable returning it, called with
            x (one example) or with nothing (captum's callable baselines).
        samples: number of draws (>= 1).
        sigma: standard deviation of the Gaussian noise added to x (>= 0; 0 = no noise).
        chunk_size: how many draws are evaluated at once (``None``: all).
        multiply_by_inputs: ``False`` returns the mean of the gradients at the drawn points,
            without the factor ``x_k - b_k`` (captum's ``GradientShap(multiply_by_inputs=False)``).
        return_convergence_delta: also return the ``(samples,)`` errors ``sum((x_k - b_k) * g_k)
            - (f(x_k)[t] - f(b_k)[t])``, one per draw, of the attributions with the factor
            (captum's deltas: ``(B * samples,)`` over a batch, this ``(B, samples)`` flattened).

    Returns:
        ``explain(params, x, target)`` -> attributions of x's structure, or
        ``(attributions, delta)`` with ``return_convergence_delta``.

    Example:
        >>> explain = fxattr.expected_gradients(f, baselines=train_images[:100], samples=32)
        >>> torch.manual_seed(0)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, images, labels)
    """
    return _build(_WHERE, f, baselines, samples, sigma, chunk_size, multiply_by_inputs,
                  return_convergence_delta)


def _build(where, f, baselines, samples, sigma, chunk_size, multiply_by_inputs, return_convergence_delta):
    check_model(where, f)
    check_int(where, "samples", samples, 1)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    sigma = check_finite(where, "sigma", sigma, minimum=0)
    _check_flags(where, multiply_by_inputs, return_convergence_delta)
    given = callable(baselines) and not isinstance(baselines, Tensor)
    if given:
        reference_set = _baseline_function(where, baselines)
    else:
        _check_baselines(where, baselines)
    sigma = float(sigma)

    def explain(params, x, target=None, *, noise=None):
        check_target(where, target)
        if given:
            drawn_from = reference_set(x)
            count = _check_baselines(where, drawn_from)
        else:
            drawn_from, count = baselines, optree.tree_leaves(baselines, namespace="torch")[0].shape[0]
        refs = _match_baselines(where, drawn_from, x)
        like = optree.tree_leaves(x, namespace="torch")[0]
        if noise is None:
            index = torch.randint(count, (samples,), device=like.device)
            alpha = torch.rand(samples, dtype=like.dtype, device=like.device)
            noise = {"index": index, "alpha": alpha}
            if sigma > 0:
                noise["normal"] = tree_map(
                    lambda t: torch.randn((samples, *t.shape), dtype=t.dtype, device=t.device), x)
        else:
            _check_noise(where, noise, x, samples, count, sigma)
        target = fixed_target(f, params, x, target)
        # Gather the drawn baselines once, outside the vmap: (samples, *x.shape).
        drawn = tree_map(lambda b: b.index_select(0, noise["index"].to(b.device)), refs)
        alpha = noise["alpha"].to(dtype=like.dtype)
        normal = noise.get("normal") if sigma > 0 else None

        def one(b, a, eps):
            xk = x if eps is None else tree_map(lambda t, e: t + sigma * e, x, eps)
            diff = tree_map(torch.sub, xk, b)
            point = tree_map(lambda b_, d: b_ + a * d, b, diff)
            grads = grad_of_target(where, f, params, point, target)
            attributions = tree_map(torch.mul, diff, grads)
            result = attributions if multiply_by_inputs else grads
            if not return_convergence_delta:
                return result
            total = sum(t.sum() for t in optree.tree_leaves(attributions, namespace="torch"))
            change = select(where, f(params, xk), target) - select(where, f(params, b), target)
            return result, total - change

        if normal is None:
            result = torch.vmap(lambda b, a: one(b, a, None), chunk_size=chunk_size)(drawn, alpha)
        else:
            result = torch.vmap(one, chunk_size=chunk_size)(drawn, alpha, normal)
        if return_convergence_delta:
            attributions, delta = result
            return tree_map(lambda a: a.mean(0), attributions), delta
        return tree_map(lambda a: a.mean(0), result)

    config = {"baselines": baselines if given else tuple(
                  b.shape for b in optree.tree_leaves(baselines, namespace="torch")),
              "samples": samples, "sigma": sigma, "chunk_size": chunk_size,
              "multiply_by_inputs": multiply_by_inputs, "return_convergence_delta": return_convergence_delta}
    return explainer(where, f, config, explain)


@api_boundary("gradient_shap")
def gradient_shap(f, *, baselines, samples: int = 16, sigma: float = 0.0,
                  chunk_size: int | None = None, multiply_by_inputs: bool = True,
                  return_convergence_delta: bool = False):
    """Gradient SHAP: :func:`expected_gradients` under captum's name (``sigma`` = captum's ``stdevs``,
    ``samples`` = ``n_samples``; captum's default ``stdevs`` is 0 too). ``baselines`` may be a
    callable, ``multiply_by_inputs`` and ``return_convergence_delta`` are captum's options (see
    :func:`expected_gradients`).

    Example:
        >>> explain = fxattr.gradient_shap(f, baselines=torch.zeros(1, 3, 32, 32), samples=8, sigma=0.1)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, images, labels)
    """
    return _build("gradient_shap", f, baselines, samples, sigma, chunk_size, multiply_by_inputs,
                  return_convergence_delta)
