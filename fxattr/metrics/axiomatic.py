"""Axiomatic metrics (Quantus 0.6.0 names): does the attribution satisfy an axiom?

Every metric is built ``metric = fxattr.metrics.NAME(f, **config)`` and called per example
``metric(params, x, target, attribution)``; batch it with
``torch.vmap(metric, in_dims=(None, 0, 0, 0))``. The attribution is preprocessed as Quantus does
(``normalise``: divided by its maximum absolute value, per example; then ``abs``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fxattr.errors import api_boundary, fail
from fxattr.metrics.common import (
    baseline_value,
    check_attribution,
    check_baseline,
    check_bool,
    check_float,
    check_int,
    check_metric_input,
    check_model,
    check_target_index,
    is_concrete,
    model_output,
    prepare_attribution,
    resolve_target,
    target_scores,
)
from fxattr.metrics.common import metric as named_metric

__all__ = ["completeness", "input_invariance", "non_sensitivity"]


def select_target(out: Tensor, target) -> Tensor:
    return out.reshape(-1)[torch.as_tensor(target, device=out.device)]


@api_boundary("metrics.completeness")
def completeness(f, *, abs: bool = False, normalise: bool = True,  # noqa: A002 - Quantus's name
                 output_func=None, perturb_baseline="black", softmax: bool = False,
                 rtol: float = 0.0, atol: float = 0.0):
    """Completeness (Sundararajan et al. 2017, "Axiomatic attribution for deep networks", ICML;
    Bach et al. 2015's conservation).

    Whether the attribution sums to the change of the target's output from the baseline input to x:
    ``sum(a) == output_func(f(x)[t] - f(x_0)[t])``, ``x_0`` filled with the baseline (``"black"``:
    x's minimum; Quantus's ``batch_baseline_replacement_by_indices`` over all features). Quantus
    compares with exact float equality (the defaults ``rtol = atol = 0``); pass a tolerance to
    test the axiom up to rounding (``torch.isclose``). Note Quantus's default ``normalise=True``
    divides the attribution by its maximum absolute value first, which breaks completeness for any
    method that has it: use ``normalise=False`` for a meaningful test.

    Args:
        f: the model function of ``fxattr.functionalize``.
        abs, normalise: attribution preprocessing (Quantus's defaults False, True).
        output_func: a function of the output difference (default: identity).
        perturb_baseline: ``"black"``, ``"white"``, ``"mean"``, ``"uniform"``, a number or a tensor.
        softmax: compare probabilities instead of logits (Quantus's call keyword, default False).
        rtol, atol: the tolerance of the comparison (``torch.isclose``).

    Returns:
        ``metric(params, x, target, attribution)`` -> a 0-d bool tensor.

    Example:
        >>> metric = fxattr.metrics.completeness(f, normalise=False, rtol=1e-4)
        >>> a = torch.vmap(fxattr.integrated_gradients(f), in_dims=(None, 0, 0))(params, x, y)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    """
    check_model(f)
    check_bool("abs", abs)
    check_bool("normalise", normalise)
    if output_func is not None and not callable(output_func):
        raise fail(None, f"output_func must be a callable of the output difference, got {output_func!r}")
    check_baseline(perturb_baseline)
    check_bool("softmax", softmax)
    check_float("rtol", rtol, 0.0)
    check_float("atol", atol, 0.0)

    def metric(params, x, target, attribution):
        check_attribution(x, attribution)
        check_target_index(f, params, x, target)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs)
        target = resolve_target(f, params, x, target)
        # "uniform": one draw per example, as Quantus's batched baseline
        fill = baseline_value(perturb_baseline, x)
        x_baseline = torch.zeros_like(x) + fill
        difference = (select_target(model_output(f, params, x, softmax), target)
                      - select_target(model_output(f, params, x_baseline, softmax), target))
        if output_func is not None:
            difference = output_func(difference)
        total = a.sum()
        if rtol == 0 and atol == 0:
            return total == difference
        return (total - difference).abs() <= atol + rtol * difference.abs()

    config = dict(abs=abs, normalise=normalise, output_func=output_func,
                  perturb_baseline=perturb_baseline, softmax=softmax, rtol=rtol, atol=atol)
    return named_metric("completeness", f, config, metric)


@api_boundary("metrics.non_sensitivity")
def non_sensitivity(f, *, eps: float = 1e-5, features_in_step: int = 1, abs: bool = True,  # noqa: A002
                    normalise: bool = True, perturb_baseline="black", softmax: bool = True,
                    chunk_size: int | None = 16):
    """Non-sensitivity (Nguyen & Martínez 2020, "On quantitative aspects of model
    interpretability", arXiv:2007.07584), as Quantus 0.6.0's ``NonSensitivity``.

    The number of features violating "zero attribution <=> no effect on the output": a feature has
    zero attribution when ``a < eps`` (after ``normalise``/``abs``); it has no effect when setting
    it (with the others of its step: the features are taken ``features_in_step`` at a time in
    flattened order, each step from the clean x) to the baseline changes the target's
    probability (``softmax=True``, Quantus's default) by less than ``eps``. The score counts the
    features where exactly one holds (lower is better). The attribution is broadcast to x's shape
    first. The perturbed copies are evaluated with one vmapped, chunked forward.

    Difference from Quantus 0.6.0: with ``features_in_step > 1`` Quantus XORs a per-step array with a
    per-feature array (a broadcasting error unless there is one step); here each feature takes its
    step's verdict, the paper's count.

    Returns:
        ``metric(params, x, target, attribution)`` -> a 0-d int64 tensor.

    Example:
        >>> metric = fxattr.metrics.non_sensitivity(f)
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    """
    check_model(f)
    check_float("eps", eps, 0.0, strict_minimum=True)
    check_int("features_in_step", features_in_step)
    check_bool("abs", abs)
    check_bool("normalise", normalise)
    check_baseline(perturb_baseline)
    check_bool("softmax", softmax)
    check_int("chunk_size", chunk_size, allow_none=True)

    def metric(params, x, target, attribution):
        check_metric_input(x, name="x")
        a = prepare_attribution(attribution, normalise=normalise, abs=abs, x=x).reshape(-1)
        target = resolve_target(f, params, x, target)
        n = a.shape[0]
        steps = math.ceil(n / features_in_step)
        step_of_feature = torch.arange(n, device=x.device) // features_in_step
        x_flat = x.reshape(-1)

        def perturbed(k):
            # "black" etc. from the clean x; "uniform": one draw per step, as Quantus's batched baseline
            fill = baseline_value(perturb_baseline, x_flat)
            return torch.where(step_of_feature == k, fill, x_flat).reshape(x.shape)

        copies = torch.vmap(perturbed, randomness="different")(torch.arange(steps, device=x.device))
        scores = target_scores(f, params, copies, target, softmax=softmax, chunk_size=chunk_size)
        clean = select_target(model_output(f, params, x, softmax), target)
        insensitive = ((scores - clean).abs() < eps)[step_of_feature]
        return (insensitive ^ (a < eps)).sum()

    config = dict(eps=eps, features_in_step=features_in_step, abs=abs, normalise=normalise,
                  perturb_baseline=perturb_baseline, softmax=softmax, chunk_size=chunk_size)
    return named_metric("non_sensitivity", f, config, metric)


def first_layer_of(f, name: str | None) -> tuple[str, nn.Module]:
    module = getattr(f, "module", None)
    if not isinstance(module, nn.Module):
        raise fail(None, "input_invariance shifts the first layer's bias, so it needs the module behind "
                          "f: pass the f of fxattr.functionalize(model)")
    layers = dict(module.named_modules())
    if name is None:
        for candidate, layer in module.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                name = candidate
                break
        else:
            raise fail(None, f"{type(module).__name__} has no Linear or Conv layer to shift")
    if name not in layers:
        raise fail(None, f"first_layer {name!r} is not a module of {type(module).__name__}")
    layer = layers[name]
    if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise fail(None, f"first_layer {name!r} is a {type(layer).__name__}; the input shift is absorbed "
                          "by the bias of a Linear or Conv layer")
    if layer.bias is None:
        raise fail(None, f"first_layer {name!r} has no bias to absorb the input shift")
    return name, layer


@api_boundary("metrics.input_invariance")
def input_invariance(f, *, explain=None, input_shift: float = -1, first_layer: str | None = None,
                     abs: bool = False, normalise: bool = False):  # noqa: A002 - Quantus's name
    """Input invariance (Kindermans et al. 2019, "The (un)reliability of saliency methods",
    Explainable AI, LNCS 11700), as Quantus 0.6.0's ``InputInvariance``.

    Whether the explanation is unchanged when the input is shifted by a constant, ``x + input_shift``,
    and the model compensates exactly: the first layer's bias becomes ``b - W m`` (``m`` the shift),
    so the shifted model's output equals the original's. True when every element of the two
    (preprocessed) explanations agrees within ``atol=1e-4`` (``np.isclose``'s ``rtol=1e-5``).

    ``first_layer`` names the layer applied to the input (default: the first ``nn.Linear`` /
    ``nn.ConvNd`` in ``named_modules`` order; Quantus takes ``named_modules()[1]``, the same for a
    flat ``nn.Sequential``). Its parameters ``<first_layer>.weight`` / ``.bias`` are read from the
    ``params`` given at call time; the module is never modified.

    Differences from Quantus 0.6.0: Quantus's ``perturb_batch`` passes ``indices[i][1:]``, so its
    shifted input leaves the first feature unshifted (not ``x + m``; a ReLU near zero can then flip
    and the explanation change); here every feature is shifted. Quantus handles only convolutions
    (it reads ``out_channels``; a ``Linear`` first layer raises), here both. For a padded
    convolution the shift is not a constant per channel at the borders, and no bias can absorb it; Quantus then subtracts each channel's
    smallest value (so the "compensated" model differs from the original), here it is an error.

    Returns:
        ``metric(params, x, target, attribution)`` -> a 0-d bool tensor.

    Example:
        >>> metric = fxattr.metrics.input_invariance(f, explain=fxattr.gradient(f))
        >>> torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    """
    check_model(f)
    if explain is None or not callable(explain):
        raise fail(None, "explain must be an explainer explain(params, x, target) to re-run on the "
                          f"shifted input, e.g. explain=fxattr.gradient(f); got {explain!r}")
    check_float("input_shift", input_shift)
    if first_layer is not None and not isinstance(first_layer, str):
        raise fail(None, f"first_layer must be a module name (str) or None, got {first_layer!r}")
    check_bool("abs", abs)
    check_bool("normalise", normalise)
    name, layer = first_layer_of(f, first_layer)
    weight_name, bias_name = f"{name}.weight", f"{name}.bias"

    def shifted_params(params, shape, dtype, device):
        weight, bias = params[weight_name], params[bias_name]
        delta = torch.full((1, *shape), float(input_shift), dtype=dtype, device=device)
        response = torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (delta,))[0]
        channels = response.reshape(response.shape[0], -1)  # (out, positions): W m + b per position
        if is_concrete(channels) and not torch.equal(channels.amin(-1), channels.amax(-1)):
            raise fail(None, f"the response of {name!r} to a constant shift varies across positions "
                              "(padding): no bias can absorb the shift; name an unpadded first layer")
        shifted = dict(params)
        shifted[bias_name] = 2 * bias - channels.amin(-1)
        return shifted

    def metric(params, x, target, attribution):
        check_attribution(x, attribution)
        for needed in (weight_name, bias_name):
            if needed not in params:
                raise fail(None, f"params has no {needed!r}; pass the params of fxattr.functionalize(model)")
        target = resolve_target(f, params, x, target)
        a = prepare_attribution(attribution, normalise=normalise, abs=abs)
        shifted = explain(shifted_params(params, tuple(x.shape), x.dtype, x.device), x + input_shift, target)
        if shifted.shape != a.shape:
            shifted = shifted.sum(0, keepdim=True)
        shifted = prepare_attribution(shifted, normalise=normalise, abs=abs)
        # np.isclose(a, shifted, atol=1e-4): |a - b| <= atol + rtol * |b|
        return ((a - shifted).abs() <= 1e-4 + 1e-5 * shifted.abs()).all()

    config = dict(explain=explain, input_shift=input_shift, first_layer=name, abs=abs, normalise=normalise)
    return named_metric("input_invariance", f, config, metric)
