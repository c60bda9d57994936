"""Noise tunnel: averaging an explainer over noisy copies of the input.

``noise_tunnel`` is a transformation of explainers (method -> method), in the spirit of optax's
combinators: ``smoothgrad(f) = noise_tunnel(gradient(f))``. The noisy copies are evaluated with
``torch.vmap`` (``chunk_size`` at a time); the noise comes from torch's global generator, so
``torch.manual_seed`` reproduces a run, ``torch.vmap(..., randomness="different")`` gives each
example its own noise, and ``explain(..., noise=eps)`` replays given standard-normal draws exactly.
"""

from __future__ import annotations

import optree
import torch

from fxattr._explainer import check_choice, check_int, explainer, fixed_target, tree_map
from fxattr.errors import api_boundary, check_finite, fail
from fxattr.gradients._gradient import gradient
from fxattr.targets import check_target

__all__ = ["noise_tunnel", "smoothgrad", "smoothgrad_sq", "vargrad"]

KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")

_REDUCE = {
    "smoothgrad": lambda a: a.mean(0),
    "smoothgrad_sq": lambda a: a.square().mean(0),
    # Population variance, as captum's vargrad: E[a^2] - E[a]^2.
    "vargrad": lambda a: a.var(0, correction=0),
}


@api_boundary("noise_tunnel")
def noise_tunnel(explain, *, kind: str = "smoothgrad", samples: int = 16, sigma: float = 0.15,
                 relative: bool = True, chunk_size: int | None = 4):
    """Averages ``explain`` over ``samples`` copies of x with Gaussian noise added.

    The returned explainer is ``explain(params, x, target=None, *, noise=None)``. Each copy is
    ``x + s * eps`` with ``eps ~ N(0, 1)`` and ``s = sigma * (max(x) - min(x))`` when ``relative``
    (Smilkov et al.'s noise level, per example) or ``s = sigma`` otherwise. The results are reduced
    by ``kind``: ``"smoothgrad"`` (mean), ``"smoothgrad_sq"`` (mean of squares) or ``"vargrad"``
    (population variance). ``target=None`` is resolved to the argmax at the clean x, so every copy
    explains the same output.

    Args:
        explain: any explainer ``explain(params, x, target)`` (gradient, IG, LRP, ...).
        kind: the reduction, one of ``"smoothgrad"``, ``"smoothgrad_sq"``, ``"vargrad"``.
        samples: number of noisy copies (>= 1).
        sigma: noise standard deviation, relative to the input's range or absolute.
        relative: whether ``sigma`` is relative to ``max(x) - min(x)``.
        chunk_size: how many copies are evaluated at once, per example (``None``: all). Under
            ``torch.vmap`` over a batch, one forward holds ``batch x chunk_size`` rows; on CPU
            8-16 rows were fastest. 4 by measurement (resnet18, batch 2, 224 px): 16 samples cost
            16.8x the floor in chunks of 4, 18.7x in chunks of 8 and 19.0x all at once, and memory
            grows with the chunk (bench/RESULTS.md). On a GPU larger chunks pay.

    The noise can be passed in explicitly: ``noise`` is a tensor (a pytree for a pytree x) of shape
    ``(samples, *x.shape)`` of standard-normal draws, scaled by ``s`` as above.

    Example:
        >>> explain = fxattr.noise_tunnel(fxattr.integrated_gradients(f, steps=8), samples=4)
        >>> torch.manual_seed(0)
        >>> torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, images, labels)
    """
    where = "noise_tunnel"
    if not callable(explain):
        raise fail(where, f"explain must be an explainer explain(params, x, target), got {explain!r}")
    check_choice(where, "kind", kind, KINDS)
    check_int(where, "samples", samples, 1)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    sigma = check_finite(where, "sigma", sigma, minimum=0)
    if not isinstance(relative, bool):
        raise fail(where, f"relative must be True or False, got {relative!r}")
    reduce = _REDUCE[kind]
    f = getattr(explain, "model", None)
    name = getattr(explain, "__name__", "explainer")

    def tunneled(params, x, target=None, *, noise=None):
        check_target(where, target)
        if noise is None:
            noise = tree_map(lambda t: torch.randn((samples, *t.shape), dtype=t.dtype, device=t.device), x)
        else:
            _check_noise(noise, x, samples)
        if f is not None:
            target = fixed_target(f, params, x, target)

        def scale(t):
            return sigma * (t.max() - t.min()).detach() if relative else sigma

        def one(eps):
            return explain(params, tree_map(lambda t, e: t + scale(t) * e, x, eps), target)

        attributions = torch.vmap(one, chunk_size=chunk_size)(noise)
        return tree_map(reduce, attributions)

    config = {"explain": name, "kind": kind, "samples": samples, "sigma": sigma,
              "relative": relative, "chunk_size": chunk_size}
    return explainer(f"{kind}({name})", f, config, tunneled, boundary=where)


def _check_noise(noise, x, samples) -> None:
    noise_leaves, noise_tree = optree.tree_flatten(noise, namespace="torch")
    x_leaves, x_tree = optree.tree_flatten(x, namespace="torch")
    if noise_tree != x_tree:
        raise fail("noise_tunnel", f"noise's structure {noise_tree} does not match x's {x_tree}")
    for e, t in zip(noise_leaves, x_leaves):
        if not isinstance(e, torch.Tensor) or tuple(e.shape) != (samples, *t.shape):
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise fail("noise_tunnel", f"noise has shape {shape}, expected (samples, *x.shape) "
                                       f"= {(samples, *t.shape)}")


@api_boundary("smoothgrad")
def smoothgrad(f, *, samples: int = 16, sigma: float = 0.15, relative: bool = True,
               chunk_size: int | None = 4):
    """SmoothGrad (Smilkov et al. 2017): ``noise_tunnel(gradient(f), kind="smoothgrad", ...)``.

    Example:
        >>> torch.vmap(fxattr.smoothgrad(f, samples=32), in_dims=(None, 0, 0),
        ...            randomness="different")(params, images, labels)
    """
    return noise_tunnel(gradient(f), kind="smoothgrad", samples=samples, sigma=sigma,
                        relative=relative, chunk_size=chunk_size)


@api_boundary("smoothgrad_sq")
def smoothgrad_sq(f, *, samples: int = 16, sigma: float = 0.15, relative: bool = True,
                  chunk_size: int | None = 4):
    """SmoothGrad-squared: ``noise_tunnel(gradient(f), kind="smoothgrad_sq", ...)``."""
    return noise_tunnel(gradient(f), kind="smoothgrad_sq", samples=samples, sigma=sigma,
                        relative=relative, chunk_size=chunk_size)


@api_boundary("vargrad")
def vargrad(f, *, samples: int = 16, sigma: float = 0.15, relative: bool = True,
            chunk_size: int | None = 4):
    """VarGrad (Adebayo et al. 2018): ``noise_tunnel(gradient(f), kind="vargrad", ...)``."""
    return noise_tunnel(gradient(f), kind="vargrad", samples=samples, sigma=sigma,
                        relative=relative, chunk_size=chunk_size)
