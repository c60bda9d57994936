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

The reverse pass is plain torch ops and ``torch.func.vjp`` over :class:`fxattr.propagation._engine.Plan`'s
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
from fxattr.functional import elementwise_batch_norm
from fxattr.gradients._integrated import check_baseline, make_baseline
from fxattr.targets import check_target, select
from fxattr.propagation._engine import ArgRef, resolve_args  # the engine's argument templates

__all__ = ["deeplift", "deeplift_shap"]

RULES = ("rescale", "reveal_cancel")
_LINEAR_LAYERS = ("kernel", "batchnorm")


def _plan(where: str, f):
    from fxattr.propagation._engine import Plan  # the engine: graph classification and forward pass

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


class _Step:
    """One graph node as plain data: what the passes need at run time, without torch.fx (dynamo
    does not trace ``fx.Node`` attributes, so nothing below reads them while explaining)."""

    __slots__ = ("i", "name", "kind", "is_data", "x", "args", "kwargs", "call", "layer", "params",
                 "needs_values", "value_slots", "module_name")


class Walk:
    """A forward and a reverse pass over ``Plan``'s classified graph, with per-kind overrides.

    Construction reads the graph once (kinds, kernel layers, folded batch norms from
    :class:`fxattr.propagation._engine.Plan`) into a list of :class:`_Step`; values live in a list indexed
    by node position. ``reverse`` pushes a cotangent from the output back to the inputs: linear
    nodes by their vector-Jacobian product, kernel layers by their transpose (with the layer's own
    or replaced parameters), and whatever ``override`` returns for the other nodes.
    """

    def __init__(self, f, where: str, what: str):
        self.f = f
        self.where = where
        self.plan = plan = _plan(where, f)
        nodes = plan.nodes
        order = plan.graph_nodes
        self.index = {node: i for i, node in enumerate(order)}
        path = self._on_path()
        for node in order:
            kind = nodes[node].kind
            # the engine takes x * x for a scaling by a constant (one distinct data input); it is not
            bilinear = kind == "scale" and sum(
                isinstance(a, fx.Node) and nodes[a].is_data for a in node.args) > 1
            if node in path and (kind == "unsupported" or bilinear):
                raise fail(where, f"no {what} rule for graph node {node.name!r}: "
                                  f"{_describe(plan, node)}. Supported: linear and convolution "
                                  "layers, batch norm, element-wise activations, max/average pooling, "
                                  "additions, scaling by constants and routing ops (cat, view, ...)")
        self.size = len(order)
        self._data_args = [[self.index[a] for a in nodes[node].data_args] for node in order]
        self.steps: list[_Step] = [self._step(node) for node in order]
        self.placeholders = [self.index[ph] for ph in plan.placeholders]
        self.placeholder_names = [ph.target for ph in plan.placeholders]
        self.placeholder_defaults = [ph.args[0] if ph.args else None for ph in plan.placeholders]
        self.on_path = frozenset(self.index[n] for n in path)
        runnable = [st for st in self.steps if st.kind not in ("placeholder", "output")]
        self.forward_steps = runnable
        self.constant_steps = [st for st in runnable if not st.is_data]
        self.data_steps = [st.i for st in runnable if st.is_data]
        self.reverse_steps = [st for st in reversed(self.steps)
                              if st.is_data and st.kind not in ("placeholder", "output")]
        out = plan.output.args[0]
        leaves, self.out_tree = pytree.tree_flatten(out)
        self.out_leaves = [ArgRef(self.index[leaf]) if isinstance(leaf, fx.Node) else leaf for leaf in leaves]
        self.out_data = [j for j, leaf in enumerate(leaves)
                         if isinstance(leaf, fx.Node) and nodes[leaf].is_data]

    def _on_path(self) -> set:
        keep: set = set()
        stack = list(self.plan.output.all_input_nodes)
        while stack:
            node = stack.pop()
            if node in keep or not self.plan.nodes[node].is_data:
                continue
            keep.add(node)
            stack.extend(self.plan.nodes[node].data_args)
        return keep

    def _step(self, node: fx.Node) -> _Step:
        info = self.plan.nodes[node]
        st = _Step()
        st.i, st.name = self.index[node], node.name
        st.kind = node.op if node.op in ("placeholder", "output") else info.kind
        st.is_data = bool(info.is_data)
        st.x = self.index[node.args[0]] if node.args and isinstance(node.args[0], fx.Node) else None
        slot = lambda n: ArgRef(self.index[n])  # noqa: E731
        st.args = map_arg(node.args, slot)
        st.kwargs = map_arg(node.kwargs, slot)
        st.layer, st.params, st.needs_values, st.value_slots = info.layer, info.params, False, {}
        st.module_name = node.target if node.op == "call_module" else None
        if info.kind in ("kernel", "batchnorm") and info.params is not None:
            st.needs_values = getattr(info.params, "needs_values", False)
            if st.needs_values:  # functional layer: its weight and bias are values of the graph
                st.value_slots = {n: self.index[n] for n in node.all_input_nodes}
        st.call = self._caller(node)
        return st

    def _caller(self, node: fx.Node):
        if node.op == "get_attr":
            target = node.target
            obj = self.plan.gm
            for part in target.split("."):
                obj = getattr(obj, part, None)
            value = obj

            def get(args, kwargs, params):
                return params[target] if target in params else value
            return get
        if node.op == "call_module":
            module = self.plan.gm.get_submodule(node.target)
            prefix = node.target
            names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]

            def call_module(args, kwargs, params):
                own = {n: params[f"{prefix}.{n}"] for n in names if f"{prefix}.{n}" in params}
                if own:
                    return torch.func.functional_call(module, own, args, kwargs)
                return module(*args, **kwargs)
            return call_module
        if node.op == "call_method":
            method = node.target
            return lambda args, kwargs, params: getattr(args[0], method)(*args[1:], **kwargs)
        if node.op == "call_function":
            fn = elementwise_batch_norm if node.target is torch.nn.functional.batch_norm else node.target
            return lambda args, kwargs, params: fn(*args, **kwargs)
        return None

    # forward values

    def kernel_params(self, st: _Step, params, vals) -> dict:
        if st.needs_values:
            return st.params(params, {n: vals[i] for n, i in st.value_slots.items()})
        return st.params(params)

    def _run(self, st: _Step, vals, params):
        if st.kind == "kernel" or (st.kind == "batchnorm" and st.layer is not None):
            return st.layer.forward(vals[st.x], self.kernel_params(st, params, vals))
        if st.kind == "folded":
            return vals[st.x]
        return st.call(resolve_args(st.args, vals), resolve_args(st.kwargs, vals), params)

    def _inputs(self, x) -> list:
        vals: list = [None] * self.size
        batched = tree_map(lambda t: t.unsqueeze(0), x)
        for k, (i, name, default) in enumerate(zip(self.placeholders, self.placeholder_names,
                                                   self.placeholder_defaults)):
            if isinstance(batched, dict):
                vals[i] = batched[name] if name in batched else default
            elif isinstance(batched, tuple):
                vals[i] = batched[k] if k < len(batched) else default
            else:
                vals[i] = batched if k == 0 else default
        return vals

    def forward(self, params, x) -> list:
        """Every node's value at ``x`` (with a batch axis of 1), as a list by node position."""
        vals = self._inputs(x)
        for st in self.forward_steps:
            vals[st.i] = self._run(st, vals, params)
        return vals

    def pair_values(self, params, x, base):
        """Forward values at ``x`` and at ``base`` from ONE vmapped forward pass."""
        pair = tree_map(lambda a, b: torch.stack([a, b]), x, base)

        def one(xi):
            vals = self.forward(params, xi)
            return [vals[i] for i in self.data_steps]

        stacked = torch.vmap(one)(pair)
        at_x, at_b = self._inputs(x), self._inputs(base)
        for i, v in zip(self.data_steps, stacked):
            at_x[i] = tree_map(lambda t: t[0], v)
            at_b[i] = tree_map(lambda t: t[1], v)
        # shapes, constants and attributes do not depend on the data: the same at both points
        for st in self.constant_steps:
            at_x[st.i] = at_b[st.i] = self._run(st, at_x, params)
        return at_x, at_b

    def bound(self, st: _Step, vals, params) -> tuple[Callable, list]:
        """The node as a function of its data inputs, the rest read from ``vals``."""
        data = self.data_args(st)

        def fn(*dv):
            local = dict(zip(data, dv))
            return st.call(resolve_args(st.args, vals, local), resolve_args(st.kwargs, vals, local),
                           params)
        return fn, [vals[i] for i in data]

    def data_args(self, st: _Step) -> list:
        return self._data_args[st.i]

    def vjp(self, st: _Step, vals, params, g):
        fn, primals = self.bound(st, vals, params)
        out, back = torch.func.vjp(fn, *primals)
        return list(zip(self.data_args(st), back(_fill(g, out))))

    # the reverse pass

    def seed(self, vals, target) -> dict:
        """d output[target] / d (each data leaf of the graph's output) at the explained point."""
        current = [resolve_args(leaf, vals) for leaf in self.out_leaves]

        def selected(*dv):
            leaf_values = list(current)
            for j, v in zip(self.out_data, dv):
                leaf_values[j] = v
            raw = pytree.tree_unflatten(leaf_values, self.out_tree)
            out = self.f.output(raw) if self.f.output is not None else raw
            if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
                raise fail(self.where, "the model must return a tensor with a batch axis (pass "
                                       "output=callable to functionalize to choose one)")
            return select(self.where, out[0], target)

        grads = torch.func.grad(selected, argnums=tuple(range(len(self.out_data))))(
            *[current[j] for j in self.out_data])
        seeds: dict = {}
        for j, g in zip(self.out_data, grads):
            _accumulate(seeds, self.out_leaves[j].slot, g)
        return seeds

    def reverse(self, params, vals, seeds: dict, override=None, kernel_params=None) -> dict:
        """Pushes ``seeds`` ({node position: cotangent}) back to the inputs.

        ``override(step, g)`` may return a list of ``(input position, cotangent)`` for a node
        (``None``: the default). ``kernel_params(step, p)`` may replace a kernel layer's parameters
        in its transpose.
        """
        g_of = dict(seeds)
        for st in self.reverse_steps:
            if st.i not in g_of:
                continue
            g = g_of.pop(st.i)
            incoming = override(st, g) if override is not None else None
            if incoming is None:
                if st.kind == "folded":
                    incoming = [(st.x, g)]
                elif st.kind in _LINEAR_LAYERS and st.layer is not None:
                    p = self.kernel_params(st, params, vals)
                    if kernel_params is not None and st.kind == "kernel":
                        p = kernel_params(st, p)
                    incoming = [(st.x, st.layer.transpose(g, p, vals[st.x]))]
                else:
                    incoming = self.vjp(st, vals, params, g)
            for i, r in incoming:
                _accumulate(g_of, i, r)
        return {i: g_of.get(i) for i in self.placeholders}

    def to_input(self, x, vals, grads: dict, combine):
        """``combine(cotangent, position)`` per input of ``x``'s structure (batch axis removed)."""
        def one(i):
            g = grads.get(i)
            g = torch.zeros_like(vals[i][0]) if g is None else g[0]
            return combine(g, i)
        if isinstance(x, dict):
            return {name: one(i) for i, name in zip(self.placeholders, self.placeholder_names) if name in x}
        if isinstance(x, tuple):
            return tuple(one(i) for i in self.placeholders[:len(x)])
        return one(self.placeholders[0])


def _fill(g, out):
    if isinstance(out, Tensor):
        return g
    return type(out)(_fill(r, o) if r is not None else torch.zeros_like(o) for r, o in zip(g, out))


def _accumulate(store: dict, key, r) -> None:
    if key in store:
        store[key] = optree.tree_map(torch.add, store[key], r, namespace="torch")
    else:
        store[key] = r


def _safe_ratio(num: Tensor, den: Tensor, fallback: Tensor, eps: float) -> Tensor:
    """``num / den`` where ``|den| >= eps``, ``fallback`` elsewhere (no inf/nan in either branch,
    so derivatives through ``torch.where`` stay finite). ``eps`` is raised to ``finfo.max ** -0.5``
    in float16 (1e-10 rounds to 0 there and the ratio would overflow)."""
    small = den.abs() < max(eps, torch.finfo(den.dtype).max ** -0.5)
    return torch.where(small, fallback, num / torch.where(small, torch.ones_like(den), den))


class _DeepLift:
    def __init__(self, f, where: str, rule: str, eps: float):
        self.walk = walk = Walk(f, where, "DeepLIFT")
        self.rule = rule
        self.eps = eps
        self.where = where
        plan, nodes = walk.plan, walk.plan.nodes
        # reveal-cancel pairs: activation -> the kernel layer feeding it (through a folded batch norm)
        self.pairs: dict = {}
        if rule == "reveal_cancel":
            for node in plan.graph_nodes:
                if nodes[node].kind != "activation" or walk.index[node] not in walk.on_path:
                    continue
                source = node.args[0]
                if nodes[source].kind == "folded" and len(source.users) == 1:
                    source = source.args[0]
                if nodes[source].kind in _LINEAR_LAYERS and len(source.users) == 1 \
                        and nodes[source].layer is not None:
                    self.pairs[walk.index[node]] = walk.steps[walk.index[source]]

    def __call__(self, params, x, base, target):
        walk = self.walk
        at_x, at_b = walk.pair_values(params, x, base)

        def override(st, g):
            if st.kind == "activation":
                if st.i in self.pairs:
                    return self._reveal_cancel(st, self.pairs[st.i], params, at_x, at_b, g)
                return self._rescale(st, params, at_x, at_b, g)
            if st.kind == "maxpool":
                return self._maxpool(st, params, at_x, at_b, g)
            return None

        grads = walk.reverse(params, at_x, walk.seed(at_x, target), override)
        return walk.to_input(x, at_x, grads, lambda g, i: g * (at_x[i][0] - at_b[i][0]))

    def _rescale(self, st, params, at_x, at_b, g):
        (_, gradient), = self.walk.vjp(st, at_x, params, g)
        dx = at_x[st.x] - at_b[st.x]
        dy = at_x[st.i] - at_b[st.i]
        return [(st.x, _safe_ratio(g * dy, dx, gradient, self.eps))]

    def _maxpool(self, st, params, at_x, at_b, g):
        # captum's rule: split the output difference at the cross maximum and route each part
        # through the winners of its own forward pass.
        x = self.walk.data_args(st)[0]
        out, ref = at_x[st.i], at_b[st.i]
        cross = torch.maximum(out, ref)
        (_, gradient), = self.walk.vjp(st, at_x, params, g)
        (_, via_x), = self.walk.vjp(st, at_x, params, g * (cross - ref))
        (_, via_b), = self.walk.vjp(st, at_b, params, g * (out - cross))
        dx = at_x[x] - at_b[x]
        return [(x, _safe_ratio(via_x + via_b, dx, gradient, self.eps))]

    def _reveal_cancel(self, st, layer_st, params, at_x, at_b, g):
        walk, eps = self.walk, self.eps
        inp = layer_st.x
        layer = layer_st.layer
        w = walk.kernel_params(layer_st, params, at_x)["weight"]
        plus = {"weight": w.clamp(min=0), "bias": None}
        minus = {"weight": w.clamp(max=0), "bias": None}
        dx = at_x[inp] - at_b[inp]
        dx_pos, dx_neg = dx.clamp(min=0), dx.clamp(max=0)
        # the positive and negative parts of the pre-activation's difference
        dz_pos = layer.forward(dx_pos, plus) + layer.forward(dx_neg, minus)
        dz_neg = layer.forward(dx_pos, minus) + layer.forward(dx_neg, plus)
        act, (z0,) = walk.bound(st, at_b, params)
        y0, y1 = at_b[st.i], at_x[st.i]
        y_pos, y_neg = act(z0 + dz_pos), act(z0 + dz_neg)
        dy_pos = 0.5 * (y_pos - y0) + 0.5 * (y1 - y_neg)
        dy_neg = 0.5 * (y_neg - y0) + 0.5 * (y1 - y_pos)
        # where a part vanishes its multiplier does not matter: the activation's slope at x
        (_, slope), = walk.vjp(st, at_x, params, torch.ones_like(g))
        g_pos = g * _safe_ratio(dy_pos, dz_pos, slope, eps)
        g_neg = g * _safe_ratio(dy_neg, dz_neg, slope, eps)
        x_in = at_x[inp]
        up = layer.transpose(g_pos, plus, x_in) + layer.transpose(g_neg, minus, x_in)
        down = layer.transpose(g_pos, minus, x_in) + layer.transpose(g_neg, plus, x_in)
        return [(inp, torch.where(dx >= 0, up, down))]


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
        check_baseline(baseline)
    except FxattrError as error:
        raise fail(where, str(error).split(": ", 1)[1]) from error
    engine = _DeepLift(f, where, rule, eps)

    def explain(params, x, target=None):
        check_target(where, target)
        base = make_baseline(where, baseline, x)
        return f.guarded(x, lambda: engine(params, x, base, target), where)

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
