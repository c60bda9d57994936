"""PatternNet and PatternAttribution (Kindermans et al. 2017, "Learning how to explain neural
networks"), with the patterns fitted in one streaming pass over data.

For a kernel layer ``y = W x`` (a linear layer, or a convolution on its input patches) the signal
``s`` of the input is estimated by a *pattern* ``a_j`` per output neuron ``j``:

- ``pattern_type="linear"``: ``a_j = cov(x, y_j) / (w_j^T cov(x, y_j))``;
- ``pattern_type="relu"`` (the two-component estimator, the default as in iNNvestigate): the same
  with the statistics taken only over the samples where the neuron is active (``y_j > 0``, ``y``
  the layer's output including its bias, i.e. the pre-activation of the ReLU that follows).
  iNNvestigate 1.x takes ``E[y]`` over all samples there; fxattr follows the paper and takes
  every statistic over the active samples (``E+[x y] - E+[x] E+[y]``).

Patterns are kept as a params-like dict ``{layer name: pattern shaped like the layer's weight}``
(the layer name is the module's qualified name, e.g. ``"features.0"``), saved and loaded with
:func:`save_patterns` / :func:`load_patterns` (safetensors: no pickle).

Explanations run on the one engine's program of the graph (:class:`fxattr.graph.Program`): one forward pass, then the
output's value (iNNvestigate's seed) is passed back, through kernel layers by their transpose with
the weight replaced by the pattern (PatternNet: the signal) or by ``pattern * weight``
(PatternAttribution: its contributions), through ReLUs and max pooling by their gradient (gating
and routing as in the forward pass), through other linear ops by their gradient. iNNvestigate's
optional rescaling of bottleneck layers to [-1, 1] is not applied.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import optree
import torch
from torch import Tensor

from fxattr._explainer import check_choice, check_model, explainer, upcast
from fxattr.errors import FxattrError, fail
from fxattr.graph import Program
from fxattr.graph._capture import bind
from fxattr.propagation._engine import BUILTIN_KINDS, load_op_rules
from fxattr.targets import check_target, select

__all__ = ["PATTERN_TYPES", "load_patterns", "pattern_attribution", "patternnet", "save_patterns"]

PATTERN_TYPES = ("relu", "linear")


def _program(where: str, f) -> Program:
    load_op_rules()  # the registered kinds, before classifying
    try:
        program = Program(f, where)
    except FxattrError as error:
        message = str(error)
        if message.startswith(f"fxattr.{where}:"):
            raise
        raise fail(where, message.removeprefix("fxattr.")) from error

    def supported(node, info):
        # ``x * x`` is not a scaling by a constant (one distinct data input, two references)
        return info.kind in BUILTIN_KINDS and not (info.kind == "scale" and program.data_refs(node) > 1)
    program.check("PatternNet", supported, "Supported: linear and convolution layers, batch norm, "
                  "element-wise activations, max/average pooling, additions, scaling by constants and "
                  "routing ops (cat, view, ...)")
    return program


def _kernels(program: Program) -> list:
    return [st for st in program.steps if st.kind == "kernel" and st.on_path]


def _layer_names(program: Program) -> dict:
    """Each kernel call site's pattern name: the module's qualified name (``"features.0"``), or,
    for a module called several times, the graph node's name (each call its own pattern)."""
    kernels = _kernels(program)
    counts: dict = {}
    for st in kernels:
        counts[st.module_name] = counts.get(st.module_name, 0) + 1
    return {st.slot: st.module_name if st.module_name is not None and counts[st.module_name] == 1
            else st.name for st in kernels}


def _check_patterns(where: str, patterns) -> dict:
    if not isinstance(patterns, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in patterns.items()):
        raise fail(where, "patterns must be a dict {layer name: pattern tensor}, as returned by "
                          f"explain.fit(params, data) or fxattr.load_patterns; got {type(patterns).__name__}")
    for name, pattern in patterns.items():
        if not pattern.dtype.is_floating_point:
            raise fail(where, f"the pattern of layer {name!r} has dtype {pattern.dtype}; patterns are "
                              "floating-point")
        if pattern.numel() and not bool(torch.isfinite(pattern).all()):
            raise fail(where, f"the pattern of layer {name!r} holds NaN or Inf values")
    return dict(patterns)


def _fit(where: str, program: Program, params, data: Iterable, pattern_type: str) -> dict:
    kernels = _kernels(program)
    names = _layer_names(program)
    params = bind(program.gm, params)
    static = {st: _static_params(where, program, st, params) for st in kernels}
    one_input = len(program.placeholders) == 1

    def activations(params, x):
        vals = program.forward(params, x)[0]
        return [vals[st.x] for st in kernels], [vals[st.slot] for st in kernels]

    stats: dict = {}
    seen = 0
    for batch in data:
        if one_input and isinstance(batch, (tuple, list)):
            batch = batch[0]  # (inputs, labels) batches of a DataLoader
        leaves = optree.tree_leaves(batch, namespace="torch")
        if not leaves or not all(isinstance(t, Tensor) and t.ndim >= 1 for t in leaves):
            raise fail(where, "data must be an iterable of batches: tensors with the examples "
                              f"along the first axis; got a {type(batch).__name__}")
        try:
            with torch.no_grad():  # half precision: the rounded weights and data in float32 (upcast)
                xs, zs = torch.vmap(activations, in_dims=(None, 0))(*upcast(params, batch)[:2])
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
            shapes = optree.tree_map(lambda t: tuple(t.shape), batch, namespace="torch")
            raise fail(where, f"the model failed on a batch of shape {shapes} (examples along the first "
                              f"axis): {type(error).__name__}: {error}. data must be an iterable of "
                              "batches; a tensor of examples is iterated example by example, so pass "
                              "[x] or a DataLoader") from error
        seen += leaves[0].shape[0]
        for node, x, z in zip(kernels, xs, zs):
            layer = node.layer
            p = static[node]
            x, z = x.flatten(0, 1).double(), z.flatten(0, 1).double()  # (batch, 1, ...) -> batch
            weight = p["weight"].detach().double()
            mask = (z > 0).double() if pattern_type == "relu" else torch.ones_like(z)
            _, back = torch.func.vjp(lambda w: layer.forward(x, {"weight": w, "bias": None}), weight)
            # d/dW <c, W x> = sum over samples and positions of c_j x_patch: the neuron-wise sums
            (sum_x,), (sum_xy,) = back(mask), back(mask * z)
            reduce = [0] + list(range(2, z.ndim))
            entry = (sum_x, sum_xy, (mask * z).sum(reduce), mask.sum(reduce))
            key = names[node.slot]
            stats[key] = entry if key not in stats else tuple(a + b for a, b in zip(stats[key], entry))
    if seen == 0:
        raise fail(where, "data gave no examples to fit the patterns on")
    patterns = {}
    for node in kernels:
        key = names[node.slot]
        if key in patterns:
            continue
        sum_x, sum_xy, sum_y, count = stats[key]
        weight = static[node]["weight"].detach()
        shape = (-1,) + (1,) * (weight.ndim - 1)
        n = _safe(count).reshape(shape)
        cov = sum_xy / n - (sum_x / n) * (sum_y.reshape(shape) / n)
        scale = (weight.double() * cov).flatten(1).sum(1)  # w_j^T cov(x, y_j)
        # kept in float32 for a half-precision model: explanations run in float32 (upcast)
        patterns[key] = (cov / _safe(scale).reshape(shape)).to(torch.promote_types(weight.dtype, torch.float32))
    return patterns


def _static_params(where: str, program: Program, st, params) -> dict:
    """The kernel layer's (batch-norm folded) weight and bias, read from ``params``."""
    if not st.needs_values:
        return st.params(params)
    values = {}
    for arg in st.value_slots:
        if arg is not None and arg.op == "get_attr" and arg.target in params:
            values[arg] = params[arg.target]
        elif program.nodes[arg].is_data:
            continue
        else:
            raise fail(where, f"the weight of functional layer {st.name!r} is computed in the "
                              "forward pass; patterns are fitted for layers whose weight is a parameter")
    return st.params(params, values)


def _safe(t: Tensor) -> Tensor:
    return t + (t == 0).to(t.dtype)  # iNNvestigate's safe division: 0 / 0 -> 0


def _pattern_explainer(where: str, f, patterns, pattern_type: str, attribution: bool):
    check_model(where, f)
    check_choice(where, "pattern_type", pattern_type, PATTERN_TYPES)
    program = _program(where, f)
    kernels = _kernels(program)
    names = _layer_names(program)
    if patterns is not None:
        patterns = _check_patterns(where, patterns)
        for node in kernels:
            if names[node.slot] not in patterns:
                raise fail(where, f"patterns have no entry for layer {names[node.slot]!r}; "
                                  f"they cover {', '.join(map(repr, patterns)) or 'nothing'}")

    def kernel_params(node, p):
        name = names[node.slot]
        pattern = patterns[name].to(dtype=p["weight"].dtype, device=p["weight"].device)
        if pattern.shape != p["weight"].shape:
            raise fail(where, f"the pattern of layer {name!r} has shape {tuple(pattern.shape)}, its "
                              f"weight {tuple(p['weight'].shape)}")
        return {"weight": pattern * p["weight"] if attribution else pattern, "bias": None}

    def explain(params, x, target=None):
        check_target(where, target)
        if patterns is None:
            raise fail(where, "no patterns: fit them first, explain = explain.fit(params, data), or "
                              "pass patterns=fxattr.load_patterns(path)")
        vals, cache, raw = f.guarded(x, lambda: program.forward(params, x), where)
        y = program.output_of(raw)[0]
        grad = torch.func.grad(lambda t: select(where, t, target))(y)
        seeds = program.seed(vals, y * grad)
        grads = program.reverse(params, vals, cache, seeds, kernel_params=kernel_params)
        return program.to_input(x, vals, grads)

    def fit(params, data):
        """Fits the patterns on ``data`` (an iterable of batches) in one pass; returns a new
        explainer holding them (this one is unchanged)."""
        return _pattern_explainer(where, f, _fit(where, program, params, data, pattern_type),
                                  pattern_type, attribution)

    config = {"patterns": patterns, "pattern_type": pattern_type}
    fn = explainer(where, f, config, explain)
    fn.fit = fit
    fn.patterns = patterns
    return fn


def patternnet(f, *, patterns: Mapping[str, Tensor] | None = None, pattern_type: str = "relu"):
    """PatternNet: the signal of the input that the explained output responds to.

    ``explain = fxattr.patternnet(f)`` has no patterns yet; ``explain = explain.fit(params, data)``
    fits them in one pass over ``data`` (an iterable of batches, e.g. a DataLoader; ``(x, label)``
    batches are read as ``x``) and returns a new explainer. ``explain(params, x, target)`` passes the
    target output's value back with every kernel layer's weight replaced by its pattern, ReLUs and
    max pooling gating as in the forward pass.

    Args:
        f: the function of ``fxattr.functionalize`` (traceable by ``torch.fx``).
        patterns: ``{layer name: pattern}`` from a previous fit or :func:`load_patterns`, or ``None``.
        pattern_type: ``"relu"`` (two-component estimator) or ``"linear"``.

    Example:
        >>> explain = fxattr.patternnet(f).fit(params, loader)
        >>> fxattr.save_patterns(explain.patterns, "patterns.safetensors")
        >>> signal = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    return _pattern_explainer("patternnet", f, patterns, pattern_type, attribution=False)


def pattern_attribution(f, *, patterns: Mapping[str, Tensor] | None = None, pattern_type: str = "relu"):
    """PatternAttribution: the contributions of the signal, with weights replaced by
    ``pattern * weight`` in the backward pass (see :func:`patternnet` for fitting and arguments).

    Example:
        >>> explain = fxattr.pattern_attribution(f).fit(params, loader)
        >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    return _pattern_explainer("pattern_attribution", f, patterns, pattern_type, attribution=True)


def save_patterns(patterns: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Saves patterns to a safetensors file (tensors only, no pickle)."""
    from safetensors.torch import save_file

    if not isinstance(patterns, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in patterns.items()):
        raise fail("save_patterns", "patterns must be a dict {layer name: tensor}")
    save_file({k: v.detach().contiguous() for k, v in patterns.items()}, os.fspath(path))


def load_patterns(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Loads patterns saved by :func:`save_patterns`, validated: a readable safetensors file of
    finite floating-point tensors (layer names and shapes are checked against the model when the
    explainer is built and called)."""
    from safetensors.torch import load_file

    try:
        patterns = load_file(os.fspath(path), device=str(device))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types for corrupt files
        raise fail("load_patterns", f"cannot read patterns from {os.fspath(path)!r}: "
                                    f"{type(error).__name__}: {error}") from error
    return _check_patterns("load_patterns", patterns)
