"""DeepLIFT (Shrikumar et al. 2017) as an explicit reverse pass over the traced graph.

DeepLIFT propagates *multipliers* ``m = d(delta out) / d(delta in)`` from the explained output back
to the input and returns ``m * (x - baseline)``. Linear nodes (convolutions, linear layers, batch
norm, pooling by averages, additions, routing) pass multipliers as the gradient does, because for
them ``delta out = J delta in`` exactly; non-linearities use the differences of one forward pass at
``x`` and one at the baseline (both evaluated by ``torch.vmap`` in one call):

- ``rule="rescale"``: ``m_in = m_out * delta y / delta x`` element-wise, falling back to the
  gradient where ``|delta x| < eps`` (captum's convention, ``eps = 1e-10``);
- ``rule="reveal_cancel"``: for an activation fed by a kernel layer (linear, convolution, batch
  norm), the positive and negative parts of the layer's input differences get separate multipliers
  (the paper's Sec. 3.5.3); other activations use rescale;
- max pooling as captum's DeepLift does it: the output difference is split at
  ``max(pool(x), pool(baseline))`` and routed back through the winners at ``x`` and at the
  baseline, divided by the input difference.

Summation-to-delta holds for both rules: the attributions sum to ``f(x)[t] - f(baseline)[t]`` (for
a callable target, to the change of its linearisation at ``x``).

The reverse pass is plain torch ops and ``torch.func.vjp`` over :class:`fxattr.lrp.graph.Plan`'s
classification of the graph (no hooks, no custom autograd functions), so the explanation composes
with ``torch.vmap``, ``torch.func.grad`` and ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import optree
import torch
import torch.fx as fx
from torch import Tensor
from torch.fx.node import map_arg
from torch.utils import _pytree as pytree

from fxattr._explainer import check_choice, check_int, check_model, explainer, tree_map
from fxattr.errors import FxattrError, fail
from fxattr.functional import _batch_norm
from fxattr.integrated import _check_baseline, make_baseline
from fxattr.targets import check_target, select

__all__ = ["deeplift", "deeplift_shap"]

RULES = ("rescale", "reveal_cancel")
_LINEAR_LAYERS = ("kernel", "batchnorm")


def _plan(where: str, f):
    from fxattr.lrp.graph import Plan  # the engine: graph classification and forward pass

    check_model(where, f)
    try:
        return Plan(f, where)
    except FxattrError as error:
        message = str(error)
        if message.startswith(f"fxattr.{where}:"):
            raise
        raise fail(where, message.removeprefix("fxattr.")) from error


def _describe(plan, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(plan.gm.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"function {getattr(node.target, '__name__', repr(node.target))}"


class _Walk:
    """A reverse pass over ``Plan``'s classified graph with per-kind overrides.

    ``values`` (the forward values at the explained point, with a batch axis of 1) come from
    ``Plan.forward`` or from :meth:`pair_values`; ``reverse`` pushes a cotangent from the output
    back to the inputs: linear nodes by their vector-Jacobian product, kernel layers by their
    transpose (with the layer's own or replaced parameters), and whatever ``override`` returns for
    the other nodes.
    """

    def __init__(self, f, where: str, what: str):
        self.f = f
        self.where = where
        self.plan = _plan(where, f)
        self.nodes = self.plan.nodes
        self.order = self.plan.graph_nodes
        self.path = self._on_path()
        for node in self.order:
            kind = self.nodes[node].kind
            # the engine takes x * x for a scaling by a constant (one distinct data input); it is not
            bilinear = kind == "scale" and sum(
                isinstance(a, fx.Node) and self.nodes[a].data for a in node.args) > 1
            if node in self.path and (kind == "unsupported" or bilinear):
                raise fail(where, f"no {what} rule for graph node {node.name!r}: "
                                  f"{_describe(self.plan, node)}. Supported: linear and convolution "
                                  "layers, batch norm, element-wise activations, max/average pooling, "
                                  "additions, scaling by constants and routing ops (cat, view, ...)")
        self.data_nodes = [n for n in self.order if self.nodes[n].data and n.op != "placeholder"]

    def _on_path(self) -> set:
        keep: set = set()
        stack = list(self.plan.output.all_input_nodes)
        while stack:
            node = stack.pop()
            if node in keep or not self.nodes[node].data:
                continue
            keep.add(node)
            stack.extend(self.nodes[node].data_args)
        return keep

    # forward values

    def pair_values(self, params, x, base):
        """Forward values at ``x`` and at ``base`` from ONE vmapped forward pass."""
        pair = tree_map(lambda a, b: torch.stack([a, b]), x, base)

        def one(xi):
            values, _, _ = self.plan.forward(params, xi)
            return [values[n] for n in self.data_nodes]

        stacked = torch.vmap(one)(pair)
        at_x = {ph: t.unsqueeze(0) for ph, t in self._placeholders(x).items()}
        at_b = {ph: t.unsqueeze(0) for ph, t in self._placeholders(base).items()}
        for node, v in zip(self.data_nodes, stacked):
            at_x[node] = tree_map(lambda t: t[0], v)
            at_b[node] = tree_map(lambda t: t[1], v)
        self._constants(params, at_x)
        for node, v in at_x.items():  # shapes and constants are the same at both points
            at_b.setdefault(node, v)
        return at_x, at_b

    def _placeholders(self, x) -> dict:
        phs = self.plan.placeholders
        if isinstance(x, dict):
            return {ph: x[ph.target] for ph in phs if ph.target in x}
        if isinstance(x, tuple):
            return dict(zip(phs, x))
        return {phs[0]: x}

    def _constants(self, params, values) -> None:
        """Values of the nodes that do not depend on the data (shapes, constants, attributes)."""
        for node in self.order:
            if node in values or node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                values[node] = params[node.target] if node.target in params else self._attr(node.target)
                continue
            values[node] = self.call(node, map_arg(node.args, values.__getitem__),
                                     map_arg(node.kwargs, values.__getitem__), params)

    def _attr(self, target: str):
        obj = self.plan.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def call(self, node: fx.Node, args, kwargs, params):
        if node.op == "call_module":
            module = self.plan.gm.get_submodule(node.target)
            names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
            own = {n: params[f"{node.target}.{n}"] for n in names if f"{node.target}.{n}" in params}
            if own:
                return torch.func.functional_call(module, own, args, kwargs)
            return module(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.target is torch.nn.functional.batch_norm:
            return _batch_norm(*args, **kwargs)
        return node.target(*args, **kwargs)

    def bound(self, node: fx.Node, values: dict, params) -> tuple[Callable, list]:
        """The node as a function of its data inputs, the rest read from ``values``."""
        data = self.nodes[node].data_args

        def fn(*vals):
            lookup = dict(zip(data, vals))

            def value(n):
                return lookup[n] if n in lookup else values[n]
            return self.call(node, map_arg(node.args, value), map_arg(node.kwargs, value), params)
        return fn, [values[a] for a in data]

    def vjp(self, node, values, params, g):
        fn, primals = self.bound(node, values, params)
        out, back = torch.func.vjp(fn, *primals)
        return list(zip(self.nodes[node].data_args, back(_fill(g, out))))

    def kernel_params(self, node, params, values) -> dict:
        info = self.nodes[node]
        if getattr(info.params, "needs_values", False):
            return info.params(params, values)
        return info.params(params)

    # the reverse pass

    def seed(self, values, target) -> dict:
        """d output[target] / d (each data leaf of the graph's output) at the explained point."""
        spec = self.plan.output.args[0]
        leaves, tree = pytree.tree_flatten(spec)
        data = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node) and self.nodes[leaf].data]
        current = [values[leaf] if isinstance(leaf, fx.Node) else leaf for leaf in leaves]

        def selected(*vals):
            leaf_values = list(current)
            for i, v in zip(data, vals):
                leaf_values[i] = v
            raw = pytree.tree_unflatten(leaf_values, tree)
            out = self.f.output(raw) if self.f.output is not None else raw
            if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
                raise fail(self.where, "the model must return a tensor with a batch axis (pass "
                                       "output=callable to functionalize to choose one)")
            return select(self.where, out[0], target)

        grads = torch.func.grad(selected, argnums=tuple(range(len(data))))(*[current[i] for i in data])
        seeds: dict = {}
        for i, g in zip(data, grads):
            _accumulate(seeds, leaves[i], g)
        return seeds

    def reverse(self, params, values, seeds: dict, override=None, kernel_params=None) -> dict:
        """Pushes ``seeds`` back to the placeholders; returns {placeholder: cotangent}.

        ``override(node, info, g)`` may return a list of ``(input node, cotangent)`` for a node
        (``None``: the default). ``kernel_params(node, p)`` may replace a kernel layer's parameters
        in its transpose.
        """
        g_of = dict(seeds)
        for node in reversed(self.order):
            if node not in g_of or node.op == "placeholder":
                continue
            g = g_of.pop(node)
            info = self.nodes[node]
            incoming = override(node, info, g) if override is not None else None
            if incoming is None:
                if info.kind == "folded":
                    incoming = [(node.args[0], g)]
                elif info.kind in _LINEAR_LAYERS:
                    x_node = node.args[0]
                    p = self.kernel_params(node, params, values)
                    if kernel_params is not None and info.kind == "kernel":
                        p = kernel_params(node, p)
                    incoming = [(x_node, info.layer.transpose(g, p, values[x_node]))]
                else:
                    incoming = self.vjp(node, values, params, g)
            for arg, r in incoming:
                if self.nodes[arg].data:
                    _accumulate(g_of, arg, r)
        return {ph: g_of.get(ph) for ph in self.plan.placeholders}

    def to_input(self, x, values, grads: dict, combine):
        """``combine(cotangent, placeholder)`` per input of ``x``'s structure (batch axis removed)."""
        def one(ph):
            g = grads.get(ph)
            g = torch.zeros_like(values[ph][0]) if g is None else g[0]
            return combine(g, ph)
        phs = self.plan.placeholders
        if isinstance(x, dict):
            return {ph.target: one(ph) for ph in phs if ph.target in x}
        if isinstance(x, tuple):
            return tuple(one(ph) for ph in phs[:len(x)])
        return one(phs[0])


def _fill(g, out):
    if isinstance(out, Tensor):
        return g
    return type(out)(_fill(r, o) if r is not None else torch.zeros_like(o) for r, o in zip(g, out))


def _accumulate(store: dict, node, r) -> None:
    if node in store:
        store[node] = optree.tree_map(torch.add, store[node], r, namespace="torch")
    else:
        store[node] = r


def _safe_ratio(num: Tensor, den: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """``num / den`` where ``|den| >= eps``, ``fallback`` elsewhere (no inf/nan in either branch,
    so derivatives through ``torch.where`` stay finite)."""
    small = den.abs() < eps
    return torch.where(small, fallback, num / torch.where(small, torch.ones_like(den), den))


class _DeepLift:
    def __init__(self, f, where: str, rule: str, eps: float):
        self.walk = _Walk(f, where, "DeepLIFT")
        self.rule = rule
        self.eps = eps
        self.where = where
        nodes = self.walk.nodes
        # reveal-cancel pairs: activation -> the kernel layer feeding it (through a folded batch norm)
        self.pairs: dict = {}
        if rule == "reveal_cancel":
            for node in self.walk.order:
                if nodes[node].kind != "activation" or node not in self.walk.path:
                    continue
                source = node.args[0]
                if nodes[source].kind == "folded" and len(source.users) == 1:
                    source = source.args[0]
                if nodes[source].kind in _LINEAR_LAYERS and len(source.users) == 1:
                    self.pairs[node] = source

    def __call__(self, params, x, base, target):
        walk = self.walk
        at_x, at_b = walk.pair_values(params, x, base)

        def override(node, info, g):
            if info.kind == "activation":
                if node in self.pairs:
                    return self._reveal_cancel(node, self.pairs[node], params, at_x, at_b, g)
                return self._rescale(node, params, at_x, at_b, g)
            if info.kind == "maxpool":
                return self._maxpool(node, params, at_x, at_b, g)
            return None

        grads = walk.reverse(params, at_x, walk.seed(at_x, target), override)
        return walk.to_input(x, at_x, grads, lambda g, ph: g * (at_x[ph][0] - at_b[ph][0]))

    def _rescale(self, node, params, at_x, at_b, g):
        x_node = node.args[0]
        (_, gradient), = self.walk.vjp(node, at_x, params, g)
        dx = at_x[x_node] - at_b[x_node]
        dy = at_x[node] - at_b[node]
        return [(x_node, _safe_ratio(g * dy, dx, gradient, self.eps))]

    def _maxpool(self, node, params, at_x, at_b, g):
        # captum's rule: split the output difference at the cross maximum and route each part
        # through the winners of its own forward pass.
        x_node = self.walk.nodes[node].data_args[0]
        out, ref = at_x[node], at_b[node]
        cross = torch.maximum(out, ref)
        (_, gradient), = self.walk.vjp(node, at_x, params, g)
        (_, via_x), = self.walk.vjp(node, at_x, params, g * (cross - ref))
        (_, via_b), = self.walk.vjp(node, at_b, params, g * (out - cross))
        dx = at_x[x_node] - at_b[x_node]
        return [(x_node, _safe_ratio(via_x + via_b, dx, gradient, self.eps))]

    def _reveal_cancel(self, node, layer_node, params, at_x, at_b, g):
        walk, eps = self.walk, self.eps
        info = walk.nodes[layer_node]
        in_node = layer_node.args[0]
        p = walk.kernel_params(layer_node, params, at_x)
        layer = info.layer
        w = p["weight"]
        plus = {"weight": w.clamp(min=0), "bias": None}
        minus = {"weight": w.clamp(max=0), "bias": None}
        dx = at_x[in_node] - at_b[in_node]
        dx_pos, dx_neg = dx.clamp(min=0), dx.clamp(max=0)
        # the positive and negative parts of the pre-activation's difference
        dz_pos = layer.forward(dx_pos, plus) + layer.forward(dx_neg, minus)
        dz_neg = layer.forward(dx_pos, minus) + layer.forward(dx_neg, plus)
        act, (z0,) = walk.bound(node, at_b, params)
        y0, y1 = at_b[node], at_x[node]
        y_pos, y_neg = act(z0 + dz_pos), act(z0 + dz_neg)
        dy_pos = 0.5 * (y_pos - y0) + 0.5 * (y1 - y_neg)
        dy_neg = 0.5 * (y_neg - y0) + 0.5 * (y1 - y_pos)
        # where a part vanishes its multiplier does not matter: the activation's slope at x
        (_, slope), = walk.vjp(node, at_x, params, torch.ones_like(g))
        g_pos = g * _safe_ratio(dy_pos, dz_pos, slope, eps)
        g_neg = g * _safe_ratio(dy_neg, dz_neg, slope, eps)
        x_in = at_x[in_node]
        up = layer.transpose(g_pos, plus, x_in) + layer.transpose(g_neg, minus, x_in)
        down = layer.transpose(g_pos, minus, x_in) + layer.transpose(g_neg, plus, x_in)
        return [(in_node, torch.where(dx >= 0, up, down))]


def _check_eps(where, eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise fail(where, f"eps must be a positive number, got {eps!r}")


def deeplift(f, *, baseline=0.0, rule: str = "rescale", eps: float = 1e-10):
    """DeepLIFT attributions ``m * (x - baseline)`` with multipliers ``m`` from a reverse pass.

    One vmapped forward pass evaluates the model at ``x`` and at the baseline; the reverse pass
    treats linear nodes by their gradient and non-linearities by ``rule`` (see the module doc).
    The attributions sum to ``f(x)[target] - f(baseline)[target]`` (summation-to-delta). With the
    rescale rule, values match captum's ``DeepLift`` on models of ReLU/Tanh/Sigmoid/... modules and
    max pooling. ``target=None`` explains the argmax at ``x``.

    Args:
        f: the function of ``fxattr.functionalize`` (the model must be traceable by ``torch.fx``).
        baseline: a number, a tensor of x's shape, a pytree of those matching x, or a callable
            ``x -> baseline`` (as in :func:`fxattr.integrated_gradients`).
        rule: ``"rescale"`` or ``"reveal_cancel"``.
        eps: below this ``|delta x|`` a non-linearity passes its gradient (captum: 1e-10).

    Example:
        >>> explain = fxattr.deeplift(f, baseline=0.0)
        >>> attributions = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
        >>> fast = torch.compile(torch.vmap(explain, in_dims=(None, 0, 0)))
    """
    where = "deeplift"
    check_model(where, f)
    check_choice(where, "rule", rule, RULES)
    _check_eps(where, eps)
    try:
        _check_baseline(baseline)
    except FxattrError as error:
        raise fail(where, str(error).split(": ", 1)[1]) from error
    engine = _DeepLift(f, where, rule, eps)

    def explain(params, x, target=None):
        check_target(where, target)
        if not torch.compiler.is_compiling():
            f.check_input(x, where)
        base = make_baseline(where, baseline, x)
        return engine(params, x, base, target)

    config = {"baseline": baseline, "rule": rule, "eps": eps}
    return explainer(where, f, config, explain)


def deeplift_shap(f, *, baselines, rule: str = "rescale", eps: float = 1e-10,
                  chunk_size: int | None = None):
    """DeepLIFT averaged over a set of baselines (captum's ``DeepLiftShap``).

    Each baseline gets its own DeepLIFT explanation (vmapped over the baselines, ``chunk_size`` at a
    time), and the mean is returned; the attributions sum to ``f(x)[t] - mean_k f(b_k)[t]``.

    Args:
        f: the function of ``fxattr.functionalize``.
        baselines: a tensor ``(K, *x.shape)`` of K >= 1 baselines (a pytree of those for pytree
            inputs), or a callable ``x -> baselines``.
        rule, eps: as in :func:`deeplift`.
        chunk_size: how many baselines are explained at once (``None``: all).

    Example:
        >>> explain = fxattr.deeplift_shap(f, baselines=background[:16])
        >>> attributions = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "deeplift_shap"
    check_model(where, f)
    check_choice(where, "rule", rule, RULES)
    _check_eps(where, eps)
    check_int(where, "chunk_size", chunk_size, 1, allow_none=True)
    leaves = optree.tree_leaves(baselines, namespace="torch")
    if not (callable(baselines) and not isinstance(baselines, Tensor)) and (
            not leaves or not all(isinstance(t, Tensor) and t.ndim >= 1 and t.shape[0] >= 1 for t in leaves)):
        raise fail(where, "baselines must be a tensor (K, *x.shape) of K >= 1 baselines, a pytree of "
                          f"those, or a callable x -> baselines; got {type(baselines).__name__}")
    engine = _DeepLift(f, where, rule, eps)

    def explain(params, x, target=None):
        check_target(where, target)
        if not torch.compiler.is_compiling():
            f.check_input(x, where)
        bases = baselines(x) if callable(baselines) and not isinstance(baselines, Tensor) else baselines

        def check(b, xi):
            if tuple(b.shape[1:]) != tuple(xi.shape):
                raise fail(where, f"baselines have shape {tuple(b.shape)}; expected (K, "
                                  f"{', '.join(map(str, xi.shape))}) for x of shape {tuple(xi.shape)}")
            return b.to(dtype=xi.dtype, device=xi.device)
        bases = tree_map(check, bases, x)
        if target is None:  # the argmax at x, the same for every baseline
            target = f(params, x).detach().reshape(-1).argmax()
        attributions = torch.vmap(lambda b: engine(params, x, b, target),
                                  chunk_size=chunk_size)(bases)
        return tree_map(lambda a: a.mean(0), attributions)

    config = {"baselines": baselines, "rule": rule, "eps": eps, "chunk_size": chunk_size}
    return explainer(where, f, config, explain)
