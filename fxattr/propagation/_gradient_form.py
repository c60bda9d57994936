"""AttnLRP / CP-LRP as ONE vector-Jacobian product of a modified forward pass.

Every rule of :mod:`fxattr.propagation._transformers` keeps ``R = value * modified gradient`` at
every node (LXT's efficient mode rests on the same fact), so the relevance at the input is
``x * g``, with ``g`` the vector-Jacobian product of a *modified forward*: the captured program
re-run with every node replaced by a function of the same value whose Jacobian is the rule's
(``R`` = relevance, ``g`` = the cotangent arriving at a node, ``z`` = its value):

- the z rule (LRP-0: kernel layers, additions, scalings, pooling, routings) and AttnLRP's softmax
  rule are the node itself: ``x * J^T (R / z)`` with ``R = z * g`` is ``x * J^T g``, and
  ``x * (R - s * sum(R))`` with ``R = s * g`` is ``x * J^T g`` of the softmax;
- the identity rule on an activation ``a = act(z)``: ``z * c + (a - z * c)`` with
  ``c = a / (z + 1e-10)`` (LXT's ``identity_rule_implicit``); GPT-2's written-out ``gelu_new``
  likewise at the product that ends it;
- LayerNorm / GroupNorm / RMSNorm: the centring and the affine map as they are, the standard
  deviation (RMSNorm's ``rsqrt``) a constant;
- the uniform rule (matmuls and products of two data tensors): each data operand enters as
  ``(t + t_value) / 2``, which has the value ``t`` and half its gradient; in
  ``scaled_dot_product_attention`` the query and key take a quarter and the value a half (LXT's
  ``divide_gradient`` factors; the two matmuls' halves composed);
- gates (a sigmoid / softmax / ``rsqrt`` factor of a product, a quotient's divisor; CP-LRP's
  attention weights, query and key and Llama's SwiGLU gate): the factor's value, a constant.

The constants are forward values (one forward pass first, as the node-by-node walk does) closed
over by the function given to ``torch.func.vjp``: constants of that vector-Jacobian product, yet
ordinary tensors of ``(params, x)`` for every transform outside it, so ``torch.func.grad`` of a loss
of the explanation stays exact (``.detach()`` would cut them out of every level).

Where a denominator of the z rule is exactly zero the walk gives zero relevance (its stabiliser);
this form, like LXT, the gradient. A node it cannot express (an element-wise function that receives
relevance, a functional or masked multihead attention, Swin's window attention, an operation kind it does not know,
a quotient ``x / x``) keeps the explainer on the walk: :func:`gradient_form` returns the reason,
and ``fxattr.lrp`` shows it as ``explain.gradient_form``.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from fxattr.errors import fail
from fxattr.graph._capture import bind
from fxattr.graph._program import resolve_args
from fxattr.propagation import op_rules
from fxattr.targets import select

__all__ = ["GradientForm", "gradient_form", "math_attention", "multihead_arguments", "multihead_attention"]

IDENTITY_EPSILON = 1e-10  # LXT's identity_rule_implicit (as fxattr.propagation._transformers)

# kinds whose rule under both presets is the node's own Jacobian (the z rule with R = z * g, routings,
# winner-take-all pooling, AttnLRP's softmax rule)
_PLAIN = frozenset({"kernel", "folded", "batchnorm", "batchnorm_f", "add", "scale", "avgpool", "route", "maxpool",
                    "softmax", "interpolate", "route_more", "split_cast", "addmm", "swin_patch_merging_pad"})
_NORMS = frozenset({"layer_norm", "group_norm", "rms_norm"})
_SDPA_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


class _Unsupported(Exception):
    """A node the gradient form cannot express (its message says which and why)."""


def _scaled(t: Tensor, value: Tensor, factor: float) -> Tensor:
    """``t`` with its gradient scaled by ``factor`` (``value`` is ``t``'s forward value, a constant)."""
    if factor == 0.5:
        return (t + value) * 0.5
    return value + (t - value) * factor


class _Rule:
    """What the modified forward does at one node: ``run(step, new, values, params)``, and which of the
    node's data inputs its rule sends relevance to (``live``)."""

    __slots__ = ("live", "run")

    def __init__(self, run, live):
        self.run, self.live = run, tuple(live)


class GradientForm:
    """The modified forward of a :class:`fxattr.propagation._engine.Plan` whose composite is the
    ``"attnlrp"`` or ``"cp_lrp"`` preset (see the module doc). Build it with :func:`gradient_form`."""

    def __init__(self, plan, variant: str):
        from fxattr.propagation import _transformers as T

        self.plan, self.variant, self.where = plan, variant, plan.where
        self._t = T
        self.nodes = plan.graph_nodes
        rules: dict = {}
        live = set(plan.output_slots)
        for step in reversed(plan.steps):
            if step.slot not in live or not step.is_data:
                continue
            rule = self._rule(step)
            rules[step.slot] = rule
            live.update(rule.live)
        self.live_steps = [(step, rules[step.slot]) for step in plan.steps if step.slot in rules]
        self.input_slots = [slot for slot, _, _ in plan.input_slots if slot in live]

    # --- choosing the modified operation of each node ----------------------------------------------

    def _rule(self, step) -> _Rule:
        kind, node = step.kind, self.nodes[step.slot]
        data = step.data_slots
        if kind in _PLAIN:
            if kind in ("kernel", "batchnorm", "avgpool", "add", "batchnorm_f") and step.rule is not None \
                    and step.rule.name != "z":
                raise _Unsupported(f"rule {step.rule.name!r} at {step.name!r}")
            return _Rule(self._plain, data)
        if kind == "identity":
            return _Rule(self._identity, data[:1])
        if kind == "activation":
            return _Rule(self._activation, data[:1])
        if kind in _NORMS:
            return self._norm_rule(step, node)
        if kind == "bilinear":
            return self._bilinear_rule(step, node)
        if kind == "product":
            return self._product_rule(step, node)
        if kind == "quotient":
            if len(data) != 2:
                raise _Unsupported(f"the quotient {step.name!r} of one data tensor by itself")
            return _Rule(self._operands({data[1]: None}), data[:1])
        if kind == "attention":
            return self._attention_rule(step, node)
        if kind == "multihead_attention":
            return self._multihead_rule(step, node)
        raise _Unsupported(f"{step.name!r} of kind {kind!r}")

    def _operands(self, factors: dict):
        """The node called with some data inputs replaced: ``{slot: None}`` by their forward value (a
        constant), ``{slot: f}`` by ``t`` with its gradient scaled by ``f``."""
        def run(step, new, values, params):
            override = {s: values[s] if f is None else _scaled(new[s], values[s], f) for s, f in factors.items()}
            return step.call(resolve_args(step.args, new, override), resolve_args(step.kwargs, new, override),
                             params)
        return run

    def _bilinear_rule(self, step, node) -> _Rule:
        data = step.data_slots
        refs = self.plan.data_refs(node)
        if len(data) == 1:  # x @ W: LRP-0 through the map; x @ x^T: each occurrence its share
            return _Rule(self._operands({data[0]: 1.0 / refs}) if refs > 1 else self._plain, data)
        if len(data) != 2 or refs != 2:
            raise _Unsupported(f"the product {step.name!r} of {refs} data operands")
        operands = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
        if self.variant == "cp_lrp":
            if [self.plan.slot_of[a] for a in operands] != data:
                raise _Unsupported(f"CP-LRP at the product {step.name!r} of operands past its first two arguments")
            constant = tuple(self._t.is_softmax_output(n) for n in operands)
            if constant[0] != constant[1]:  # the attention weights are a constant: values take all
                frozen = data[0] if constant[0] else data[1]
                return _Rule(self._operands({frozen: None}), [s for s in data if s != frozen])
        return _Rule(self._operands({data[0]: 0.5, data[1]: 0.5}), data)

    def _product_rule(self, step, node) -> _Rule:
        data = step.data_slots
        T = self._t
        if len(data) == 1:  # x * x: relevance passes (the uniform rule per occurrence)
            return _Rule(self._operands({data[0]: 0.5}), data)
        slot_of = self.plan.slot_of
        if len(data) != 2 or not all(isinstance(a, torch.fx.Node) for a in node.args[:2]):
            raise _Unsupported(f"the product {step.name!r}")
        first, second = (slot_of[a] for a in node.args[:2])
        if self.variant == "cp_lrp" and not T.in_activation_module(node):
            constant = tuple(T.is_activation_output(n) for n in node.args[:2])
            if constant[0] != constant[1]:  # SwiGLU's gate is detached: the other factor takes all
                frozen = first if constant[0] else second
                return _Rule(self._operands({frozen: None}), [first if frozen == second else second])
        carried = T.written_out_activation_factor(node)
        if carried is not None:  # the identity rule at the end of a written-out activation
            index, constant = carried
            return _Rule(self._written_out(first if index == 0 else second, second if index == 0 else first,
                                           constant), [first if index == 0 else second])
        owner = self.plan.gm
        gates = tuple(op_rules.is_gate(a, owner.get_submodule(a.target) if a.op == "call_module" else None)
                      for a in node.args[:2])
        if gates[0] != gates[1]:
            gate = first if gates[0] else second
            return _Rule(self._operands({gate: None}), [second if gate == first else first])
        return _Rule(self._operands({first: 0.5, second: 0.5}), data)

    def _norm_rule(self, step, node) -> _Rule:
        data = step.data_slots
        module = self.plan.nodes[node].module
        if module is not None:
            if data != [step.x]:
                raise _Unsupported(f"the normalisation module {step.name!r} called with several data tensors")
            prefix = node.target
            own = dict(module.named_parameters(remove_duplicate=False))
            names = {n: f"{prefix}.{n}" if n in own else None for n in ("weight", "bias")}
            eps = getattr(module, "eps", None)
            shape = tuple(module.normalized_shape) if hasattr(module, "normalized_shape") else None
            groups = getattr(module, "num_groups", None)

            def arguments(step, values, params):
                return ({n: (params[k] if k in params else getattr(module, n)) if k else None
                         for n, k in names.items()}, shape, groups, eps)
        else:
            spec = {"layer_norm": ("input", "normalized_shape", "weight", "bias", "eps"),
                    "group_norm": ("input", "num_groups", "weight", "bias", "eps"),
                    "rms_norm": ("input", "normalized_shape", "weight", "eps")}[step.kind]
            bound = dict(zip(spec, node.args))
            bound.update(node.kwargs)
            if not node.args or bound.get("input") is not node.args[0] or data != [step.x]:
                raise _Unsupported(f"the normalisation {step.name!r} with data in its weight or bias")
            templates = {n: step.args[i] if i < len(step.args) else step.kwargs.get(n)
                         for i, n in enumerate(spec)}
            templates.update({n: step.kwargs[n] for n in spec if n in step.kwargs})
            default_eps = {"layer_norm": 1e-5, "group_norm": 1e-5, "rms_norm": None}[step.kind]

            def arguments(step, values, params):
                got = {n: resolve_args(t, values) for n, t in templates.items() if n != "input"}
                eps = got.get("eps", default_eps)
                shape = got.get("normalized_shape")
                return ({"weight": got.get("weight"), "bias": got.get("bias")},
                        tuple(shape) if shape is not None else None, got.get("num_groups"),
                        default_eps if eps is None else eps)
        centre = step.kind != "rms_norm"
        grouped = step.kind == "group_norm"

        def run(step, new, values, params):
            affine, shape, groups, eps = arguments(step, values, params)
            x, x_value = new[step.x], values[step.x]
            if eps is None:  # F.rms_norm's default
                eps = torch.finfo(x_value.dtype).eps
            if grouped:
                def mean(t):
                    g = t.reshape(t.shape[0], groups, -1)
                    return g.mean(-1, keepdim=True).expand(g.shape).reshape(t.shape)
                channel = (-1,) + (1,) * (x.ndim - 2)
                weight = None if affine["weight"] is None else affine["weight"].reshape(channel)
                bias = None if affine["bias"] is None else affine["bias"].reshape(channel)
            else:
                dims = tuple(range(x.ndim - len(shape), x.ndim))

                def mean(t):
                    return t.mean(dims, keepdim=True)
                weight, bias = affine["weight"], affine.get("bias")
            centred_value = x_value - mean(x_value) if centre else x_value
            factor = torch.rsqrt(mean(centred_value.square()) + eps)  # the frozen 1 / std
            if weight is not None:
                factor = weight * factor
            out = (x - mean(x) if centre else x) * factor
            return (out if bias is None else out + bias).to(x_value.dtype)
        return _Rule(run, data)

    def _attention_rule(self, step, node) -> _Rule:
        bound = dict(zip(_SDPA_NAMES, node.args))
        bound.update(node.kwargs)
        for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
            if isinstance(bound.get(name), torch.fx.Node):
                raise _Unsupported(f"scaled_dot_product_attention {step.name!r} with a computed {name}")
        if bound.get("dropout_p"):
            raise _Unsupported(f"scaled_dot_product_attention {step.name!r} with dropout")
        mask = bound.get("attn_mask")
        data_nodes = set(self.plan.nodes[node].data_args)
        if mask is not None and mask in data_nodes:
            raise _Unsupported(f"scaled_dot_product_attention {step.name!r} with a mask computed from the input")
        slot_of = self.plan.slot_of
        q, k, v = (bound.get(n) for n in ("query", "key", "value"))
        if not all(isinstance(t, torch.fx.Node) for t in (q, k, v)):
            raise _Unsupported(f"scaled_dot_product_attention {step.name!r}")
        slots = {n: slot_of[t] if t in data_nodes else None for n, t in (("query", q), ("key", k), ("value", v))}
        mask_template = step.args[3] if len(step.args) > 3 else step.kwargs.get("attn_mask")
        options = {n: bound.get(n, _SDPA_DEFAULTS[n]) for n in ("is_causal", "scale", "enable_gqa")}
        cp = self.variant == "cp_lrp"
        if cp and slots["value"] is not None and slots["value"] in (slots["query"], slots["key"]):
            raise _Unsupported(f"CP-LRP at {step.name!r}: the same tensor as value and query or key")
        factors = {"query": None, "key": None, "value": 1.0} if cp else {"query": 0.25, "key": 0.25, "value": 0.5}
        templates = {"query": q, "key": k, "value": v}
        const_slot = {n: slot_of[t] for n, t in templates.items()}

        def run(step, new, values, params):
            parts = []
            for name in ("query", "key", "value"):
                slot, factor = slots[name], factors[name]
                if slot is None or factor is None:
                    parts.append(values[const_slot[name]])
                else:
                    parts.append(_scaled(new[slot], values[slot], factor) if factor != 1.0 else new[slot])
            mask_value = resolve_args(mask_template, values)
            return math_attention(*parts, attn_mask=mask_value, **options)
        live = [s for n, s in slots.items() if s is not None and factors[n] is not None]
        return _Rule(run, live)

    def _multihead_rule(self, step, node) -> _Rule:
        """``nn.MultiheadAttention`` (the module; the walk's subset: no masks, no ``bias_k`` / ``bias_v``,
        no zero attention, one embedding size) written out (:func:`multihead_attention`): AttnLRP scales
        the query's and key's gradient by 1/4 and the value's by 1/2 where they enter their projections
        (the projections are linear, so this is the attention's uniform rule); CP-LRP takes query and
        key at their values (constants) and the value as it is."""
        module = self.plan.nodes[node].module
        if module is None:
            raise _Unsupported(f"the functional multihead attention {step.name!r}")
        bound = multihead_arguments(module, node.args, node.kwargs)
        if isinstance(bound, str):
            raise _Unsupported(f"multihead attention {step.name!r} with {bound}")
        slot_of, data_nodes = self.plan.slot_of, set(self.plan.nodes[node].data_args)
        inputs = [bound[n] for n in ("query", "key", "value")]
        if not all(isinstance(t, torch.fx.Node) for t in inputs):
            raise _Unsupported(f"multihead attention {step.name!r}")
        slots = [slot_of[t] for t in inputs]
        factors = (None, None, 1.0) if self.variant == "cp_lrp" else (0.25, 0.25, 0.5)
        live = [slot_of[t] if t in data_nodes and f is not None else None for t, f in zip(inputs, factors)]
        prefix, heads, batch_first = node.target, module.num_heads, module.batch_first

        def run(step, new, values, params):
            parts = []
            for slot, live_slot, factor in zip(slots, live, factors):
                if live_slot is None:  # not data, or CP-LRP's detached query / key: a constant
                    parts.append(values[slot])
                else:
                    parts.append(new[slot] if factor == 1.0 else _scaled(new[slot], values[slot], factor))
            own = {n: params[f"{prefix}.{n}"] for n in _MHA_PARAMS if f"{prefix}.{n}" in params}
            return multihead_attention(*parts, own, heads, batch_first=batch_first), values[step.slot][1]
        return _Rule(run, [s for s in live if s is not None])

    # --- the modified operations --------------------------------------------------------------------

    def _plain(self, step, new, values, params):
        return self.plan.run_step(step, new, params)

    @staticmethod
    def _identity(step, new, values, params):
        return new[step.x]

    @staticmethod
    def _activation(step, new, values, params):
        z, a = values[step.x], values[step.slot]
        ratio = a / (z + IDENTITY_EPSILON)
        return new[step.x] * ratio + (a - z * ratio)

    @staticmethod
    def _written_out(carried: int, other: int, constant):
        def run(step, new, values, params):
            t = values[carried]
            ratio = values[other] * t / (t + constant * IDENTITY_EPSILON)
            return new[carried] * ratio + (values[step.slot] - t * ratio)
        return run

    # --- the explanation -----------------------------------------------------------------------------

    def modified_output(self, params, values, slots, primals):
        """The explained output of the modified forward with the inputs ``slots`` set to ``primals``
        (their values; ``values`` holds the forward pass's values, the constants of the rules)."""
        plan = self.plan
        new = list(values)
        for slot, primal in zip(slots, primals):
            new[slot] = primal
        for step, rule in self.live_steps:
            new[step.slot] = rule.run(step, new, values, params)
        return plan.output_of(plan.raw_output(new))

    def explain(self, params, x, target, *, seed: str = "value"):
        """``x * g``: the relevance of the preset at ``x`` for ``target`` (seeded with the selected
        output's value, as :meth:`fxattr.propagation._engine.Plan.explain`)."""
        if seed != "value":
            raise fail(self.where, f"the gradient form seeds with the output's value, got seed={seed!r}")
        plan = self.plan
        values, _, raw = plan.f.guarded(x, lambda: plan.forward(params, x), self.where)
        y = plan.output_of(raw)[0]
        grad = torch.func.grad(lambda t: select(self.where, t, target))(y)
        bound = bind(plan.gm, params)
        # integer inputs (token ids, masks) carry no relevance and are no vjp primals
        slots = [s for s in self.input_slots if values[s].is_floating_point()]
        primals = [values[s] for s in slots]
        _, vjp = torch.func.vjp(lambda *p: self.modified_output(bound, values, slots, p), *primals)
        grads = vjp(grad.unsqueeze(0))
        signals = {s: values[s] * g for s, g in zip(slots, grads)}
        return plan.to_input(x, values, signals)


def math_attention(query: Tensor, key: Tensor, value: Tensor, *, attn_mask=None, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` (no dropout) written out, differentiable to every order
    (the fused CPU kernel's backward has no derivative): scores, an additive or boolean mask,
    softmax, weighted values; ``enable_gqa`` repeats the key / value heads.

    Example:
        >>> q, k, v = torch.randn(3, 8, 2, 5, 4).unbind(0)          # 8 examples, 2 heads, 5 tokens
        >>> torch.vmap(math_attention)(q, k, v).shape                 # (8, 2, 5, 4)
    """
    if enable_gqa and key.ndim >= 3 and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    length, source = query.shape[-2], key.shape[-2]
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    return torch.softmax(scores, -1) @ value


_MHA_PARAMS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def multihead_arguments(module, args, kwargs):
    """The ``(query, key, value, ...)`` of a call of the ``nn.MultiheadAttention`` ``module`` by
    name, or a string naming what the written-out :func:`multihead_attention` lacks (masks,
    ``is_causal``, ``bias_k`` / ``bias_v``, ``add_zero_attn``, kdim / vdim)."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    extras = [n for n in ("key_padding_mask", "attn_mask") if bound.get(n) is not None]
    extras += ["is_causal"] if bound.get("is_causal") else []
    if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
        extras.append("kdim / vdim, bias_k / bias_v or add_zero_attn")
    return ", ".join(extras) if extras else bound


def multihead_attention(query: Tensor, key: Tensor, value: Tensor, params: dict, num_heads: int, *,
                        batch_first: bool = False) -> Tensor:
    """``nn.MultiheadAttention``'s output (eval, no masks) written out, differentiable to every
    order: the in-projections, :func:`math_attention` per head, the out-projection. ``params``:
    ``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias`` (the module's names).

    Example:
        >>> mha = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        >>> params = dict(mha.named_parameters())
        >>> x = torch.randn(8, 1, 5, 4)                                # 8 examples of (1, 5, 4)
        >>> torch.vmap(lambda t: multihead_attention(t, t, t, params, 2, batch_first=True))(x)
    """
    parts = [t.transpose(0, 1) if batch_first else t for t in (query, key, value)]  # (L, N, E)
    dim = parts[0].shape[-1]
    weight, bias = params["in_proj_weight"], params.get("in_proj_bias")
    biases = (None,) * 3 if bias is None else bias.split(dim)
    q, k, v = (F.linear(t, w, b).reshape(t.shape[0], t.shape[1], num_heads, dim // num_heads).permute(1, 2, 0, 3)
               for t, w, b in zip(parts, weight.split(dim), biases))
    attended = math_attention(q, k, v)  # (N, heads, L, d)
    merged = attended.permute(2, 0, 1, 3).reshape(attended.shape[2], attended.shape[0], dim)
    out = F.linear(merged, params["out_proj.weight"], params.get("out_proj.bias"))
    return out.transpose(0, 1) if batch_first else out


def gradient_form(plan, variant: str):
    """The :class:`GradientForm` of ``plan`` under the preset ``variant`` (``"attnlrp"`` or
    ``"cp_lrp"``), or a string saying which node it cannot express (the explainer then walks).

    Example:
        >>> form = gradient_form(Plan(f, "lrp", transformer_composite("attnlrp")), "attnlrp")
        >>> explain = lambda params, x, target: form.explain(params, x, target)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, embeddings, labels)
    """
    try:
        return GradientForm(plan, variant)
    except _Unsupported as reason:
        return str(reason)

