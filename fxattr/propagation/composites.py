"""Composites: which rule each layer of a traced model gets.

A :class:`Composite` maps a :class:`LayerInfo` (what a layer is and where it sits) to a
:class:`~fxattr.propagation.rules.Rule`. Kernel layers (convolutions and dense layers, with the batch norm
folded into them) are the layers rules are chosen for; parameter-free linear layers (average
pooling, means and sums, additions) take a rule's stabiliser in the z form (or ``rules.gradient()``);
element-wise activations pass relevance, max pooling gives it to the winner, and reshapes,
concatenations and indexing route it.

Writing one's own::

    from fxattr.propagation import Composite, rules

    def choose(layer):
        if layer.first:
            return rules.flat()
        return rules.epsilon(0.25) if layer.kind == "linear" else rules.gamma(0.25)

    explain = fxattr.lrp(f, composite=Composite(choose, names={"classifier.6": rules.z()}))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Optional

import torch
from torch import nn

from fxattr.errors import FxattrError, fail
from fxattr.propagation import rules as R
from fxattr.propagation.rules import Rule

__all__ = ["COMPOSITES", "Composite", "LayerInfo", "composite"]

KERNEL_KINDS = ("conv", "linear")


class LayerInfo(NamedTuple):
    """A layer of the traced graph, as a composite sees it.

    Attributes:
        kind: ``"conv"``, ``"linear"`` (kernel layers), ``"batchnorm"`` (an eval batch norm that
            could not be folded into a preceding kernel layer), ``"avgpool"`` (average pooling,
            means, sums), ``"add"`` (additions and subtractions), ``"maxpool"``, ``"activation"``.
        module: the module's type for a module call (``nn.Conv2d``), else ``None``.
        name: the module's qualified name (``"features.0"``), or the graph node's name for a
            functional op.
        node: the graph node's name (unique, even for a module called twice).
        index: the position among kernel layers in execution order (0 = nearest the input), or
            ``None`` for other layers.
        first: the first kernel layer (``index == 0``).
        last: the last kernel layer.
        input_layer: a kernel layer that reads a model input directly (through reshapes only).
        first_of_kind: the first kernel layer of its kind (the first convolution, ...).
    """

    kind: str
    module: Optional[type]
    name: str
    node: str
    index: Optional[int] = None
    first: bool = False
    last: bool = False
    input_layer: bool = False
    first_of_kind: bool = False


class Composite:
    """Chooses a rule for each layer.

    Lookup order: ``names`` (module qualified name or node name), then ``rule_for(layer)`` (a
    function returning a rule or ``None``), then ``types`` (module type, ``isinstance``), then
    ``kinds`` (``LayerInfo.kind``), then the defaults: ``z`` (safe stabiliser) for kernel layers,
    batch norm, average pooling and additions.

    Args:
        rule_for: ``LayerInfo -> Rule | None``.
        names: ``{qualified module or node name: Rule}``.
        types: ``{module type: Rule}``.
        kinds: ``{kind: Rule}``, e.g. ``{"conv": rules.z_plus(), "linear": rules.epsilon(0.1)}``.
        name: shown in reprs and errors.
        operations: ``{operation kind: reverse(view, relevance)}``: the composite's own reverse for
            an operation kind of the catalogue (``"activation"``, ``"product"``, ``"bilinear"``,
            ``"attention"``...), used instead of the engine's (``fxattr.propagation._engine.REVERSE``).

    Example:
        >>> composite = Composite(lambda layer: rules.flat() if layer.first else None,
        ...                       kinds={"conv": rules.alpha_beta(2, 1), "linear": rules.epsilon(0.1)})
        >>> explain = fxattr.lrp(f, composite=composite)
    """

    def __init__(self, rule_for: Callable[[LayerInfo], Optional[Rule]] | None = None, *,
                 names: Mapping[str, Rule] | None = None, types: Mapping[type, Rule] | None = None,
                 kinds: Mapping[str, Rule] | None = None, name: str = "composite",
                 operations: Mapping[str, Callable] | None = None):
        if rule_for is not None and not callable(rule_for):
            raise fail("lrp.Composite", f"rule_for must be a callable LayerInfo -> Rule, got {rule_for!r}")
        for label, mapping in (("names", names), ("types", types), ("kinds", kinds)):
            if mapping is not None and not isinstance(mapping, Mapping):
                raise fail("lrp.Composite", f"{label} must be a mapping, got {type(mapping).__name__}")
            for key, rule in (mapping or {}).items():
                if not isinstance(rule, Rule):
                    raise fail("lrp.Composite", f"{label}[{key!r}] must be an fxattr.propagation.rules.Rule, "
                                                f"got {type(rule).__name__}")
        if operations is not None and (not isinstance(operations, Mapping)
                                       or not all(callable(fn) for fn in operations.values())):
            raise fail("lrp.Composite", "operations must be a mapping {kind: reverse(view, relevance)}")
        self.operations = dict(operations or {})
        self.rule_for = rule_for
        self.names = dict(names or {})
        self.types = dict(types or {})
        self.kinds = dict(kinds or {})
        self.name = name

    def __repr__(self) -> str:
        return f"Composite({self.name})"

    def rule(self, layer: LayerInfo) -> Rule:
        """The rule for ``layer``."""
        for key in (layer.node, layer.name):
            if key in self.names:
                return self.names[key]
        if self.rule_for is not None:
            chosen = self.rule_for(layer)
            if chosen is not None:
                if not isinstance(chosen, Rule):
                    raise fail("lrp", f"composite {self.name!r} returned {type(chosen).__name__} for "
                                      f"layer {layer.name!r}; expected an fxattr.propagation.rules.Rule or None")
                return chosen
        if layer.module is not None:
            for kind, rule in self.types.items():
                if issubclass(layer.module, kind):
                    return rule
        if layer.kind in self.kinds:
            return self.kinds[layer.kind]
        return _DEFAULTS.get(layer.kind, _Z)


_Z = R.z()
_DEFAULTS = {"activation": R.pass_(), "maxpool": R.gradient()}


# --- presets -----------------------------------------------------------------------------------

def single_rule(rule: Rule, input_rule: Rule | None = None, until: tuple[int, Rule] | None = None,
            name: str = "rule", first: Rule | None = None) -> Composite:
    """iNNvestigate's analyzers: ``rule`` on kernel layers (and on batch norm it cannot fold);
    average pooling and additions under the z rule (SafeDivide)."""

    def rule_for(layer: LayerInfo):
        if layer.kind not in KERNEL_KINDS:
            return None
        if until is not None and layer.index <= until[0]:
            return until[1]
        if input_rule is not None and layer.input_layer:
            return input_rule
        if first is not None and layer.first:
            return first
        return None

    return Composite(rule_for, kinds={"conv": rule, "linear": rule, "batchnorm": rule}, name=name)


def _preset(conv: Rule, epsilon: float, input_rule, until, name) -> Composite:
    composite = single_rule(conv, input_rule=input_rule, until=until, name=name)
    composite.kinds["linear"] = R.epsilon(epsilon)
    return composite


def _first_of_kinds(first: Rule, kinds):
    """``first`` for the first kernel layer among ``kinds`` in execution order (zennit's
    SpecialFirstLayerMapComposite: the first module matching its first map)."""
    def rule_for(layer: LayerInfo):
        if set(kinds) == set(KERNEL_KINDS):
            return first if layer.first else None
        return first if layer.kind in kinds and layer.first_of_kind else None
    return rule_for


def rule_option(where: str, value, what: str) -> Rule:
    """``input_layer_rule``: a rule name (case-insensitive, iNNvestigate's "Flat" too), a Rule,
    or a ``(low, high)`` tuple for z^B."""
    if isinstance(value, Rule):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return R.zb(*value)
    if isinstance(value, str):
        key = _normalise(value)
        if key in _OPTION_RULES:
            return _OPTION_RULES[key]()
    raise fail(where, f"{what} must be a rule name ({', '.join(sorted(_OPTION_RULES))}), an "
                      f"fxattr.propagation.rules.Rule or a (low, high) tuple for the z^B rule; got {value!r}")


def _normalise(name: str) -> str:
    # "Flat" -> "flat", "WSquare" -> "wsquare", "w_square" -> "wsquare", "ZPlus" -> "zplus"
    return name.replace("_", "").replace("-", "").lower()


_OPTION_RULES = {
    "z": R.z, "zib": lambda: R.z(bias=False), "zignorebias": lambda: R.z(bias=False),
    "epsilon": R.epsilon, "epsilonib": lambda: R.epsilon(bias=False),
    "wsquare": R.w_square, "flat": R.flat, "zplus": R.z_plus, "zplusfast": R.z_plus_fast,
    "alpha1beta0": lambda: R.alpha_beta(1, 0), "alpha1beta0ib": lambda: R.alpha_beta(1, 0, bias=False),
    "alpha2beta1": lambda: R.alpha_beta(2, 1), "alpha2beta1ib": lambda: R.alpha_beta(2, 1, bias=False),
    "pass": R.pass_, "norm": R.norm,
}


def composite(where: str, name: str, **options) -> Composite:
    """The preset ``name`` with its options (checked; unknown ones are an error naming them)."""
    if name not in COMPOSITES:
        raise fail(where, f"composite must be one of {', '.join(map(repr, sorted(COMPOSITES)))} or an "
                          f"fxattr.lrp.Composite; got {name!r}")
    build, allowed = COMPOSITES[name]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise fail(where, f"composite {name!r} takes {', '.join(allowed) or 'no options'}; got "
                          f"unknown option(s) {', '.join(unknown)}")
    return build(where, **options)


def _innvestigate_preset(conv_rule, flat_input: bool, until: bool = False):
    def build(where, epsilon=0.1, input_layer_rule=None, until_layer_idx=None):
        eps = R._number(where, "epsilon", epsilon)
        input_rule = rule_option(where, input_layer_rule, "input_layer_rule") \
            if input_layer_rule is not None else (R.flat() if flat_input else None)
        bound = None
        if until:
            if isinstance(until_layer_idx, bool) or not isinstance(until_layer_idx, int) or until_layer_idx < 0:
                raise fail(where, f"until_layer_idx must be an int >= 0 (an index among kernel layers, "
                                  f"0 = the input layer), got {until_layer_idx!r}")
            bound = (until_layer_idx, R.flat())
        elif until_layer_idx is not None:
            raise fail(where, "until_layer_idx is an option of sequential_preset_b_flat_until_idx only")
        return _preset(conv_rule(), eps, input_rule, bound, name=build.preset_name)
    return build


def stabiliser_option(where: str, name: str, value):
    """A preset's ``epsilon=`` / ``stabiliser=``: a finite number >= 0, or a stabiliser ``z -> z'``
    (:func:`fxattr.propagation.rules.stabiliser` with zennit's ``clip`` / ``norm_scale``)."""
    return value if callable(value) else R._number(where, name, value)


def _zennit_preset(conv, first=None, first_kinds=KERNEL_KINDS, box=False):
    def build(where, epsilon=1e-6, stabiliser=1e-6, gamma=0.25, low=None, high=None, zero_params=None):
        eps = stabiliser_option(where, "epsilon", epsilon)
        stab = stabiliser_option(where, "stabiliser", stabiliser)
        no_bias = R.zero_bias(where, zero_params)
        conv_rule = conv(stab, R._number(where, "gamma", gamma), no_bias)
        first_rule = None
        if box:
            if low is None or high is None:
                raise fail(where, "epsilon_gamma_box needs low= and high=, the bounds of the input "
                                  "(e.g. low=-3.0, high=3.0, or per-channel tensors of shape (C, 1, 1))")
            try:
                first_rule = R.zb(low, high, stabiliser=stab)
            except FxattrError as error:  # reported under the function called (lrp), not the rule
                raise fail(where, error.message) from error
        elif low is not None or high is not None:
            raise fail(where, "low and high are options of epsilon_gamma_box only")
        elif first is not None:
            first_rule = first(stab)
        comp = Composite(kinds={"conv": conv_rule, "linear": R.epsilon(eps, bias=not no_bias), "add": R.norm(stab),
                                "avgpool": R.norm(stab), "batchnorm": R.pass_()},
                         name=build.preset_name)
        if first_rule is not None:
            comp.rule_for = _first_of_kinds(first_rule, first_kinds)
        return comp
    return build


def deep_taylor_composite(low=None, high=None) -> Composite:
    """iNNvestigate's DeepTaylor: z+ without bias on every kernel layer (z^B on the first with
    bounds), the gradient through average pooling and additions."""
    first = None if low is None else R.zb(low, high)
    composite = single_rule(R.z_plus(), input_rule=first,
                        name="deep_taylor" if first is None else "deep_taylor_bounded")
    composite.kinds.update({"avgpool": R.gradient(), "add": R.gradient()})
    return composite


def activation_gradient(view, relevance):
    """The reverse of an activation by its gradient (``R * f'(x)``), for composites that do not
    pass relevance through activations (zennit's ExcitationBackprop hooks none)."""
    _, back = torch.func.vjp(view.fn, *view.inputs)
    return back(relevance)


def _excitation_backprop(where, stabiliser=1e-6, zero_params=None):
    """zennit's ``ExcitationBackprop`` composite (Zhang et al. 2016): see :func:`fxattr.lrp`."""
    stab = stabiliser_option(where, "stabiliser", stabiliser)
    z_plus = R.z_plus(bias=False if R.zero_bias(where, zero_params) else "split", stabiliser=stab)
    return Composite(kinds={"conv": z_plus, "linear": z_plus, "add": R.norm(stab), "avgpool": R.norm(stab),
                            "batchnorm": R.gradient()},
                     operations={"activation": activation_gradient}, name="excitation_backprop")


_ZENNIT_OPTIONS = ("epsilon", "stabiliser", "zero_params")
_INNV_OPTIONS = ("epsilon", "input_layer_rule")

def _transformer_preset(variant: str):
    def build(where):
        from fxattr.propagation import _transformers  # AttnLRP / CP-LRP reverses (imports op_rules)
        return _transformers.transformer_composite(variant)
    return build


COMPOSITES: dict = {
    "attnlrp": (_transformer_preset("attnlrp"), ()),
    "cp_lrp": (_transformer_preset("cp_lrp"), ()),
    "sequential_preset_a": (_innvestigate_preset(lambda: R.alpha_beta(1, 0), False), _INNV_OPTIONS),
    "sequential_preset_b": (_innvestigate_preset(lambda: R.alpha_beta(2, 1), False), _INNV_OPTIONS),
    "sequential_preset_a_flat": (_innvestigate_preset(lambda: R.alpha_beta(1, 0), True), _INNV_OPTIONS),
    "sequential_preset_b_flat": (_innvestigate_preset(lambda: R.alpha_beta(2, 1), True), _INNV_OPTIONS),
    "sequential_preset_b_flat_until_idx": (
        _innvestigate_preset(lambda: R.alpha_beta(2, 1), True, until=True),
        _INNV_OPTIONS + ("until_layer_idx",)),
    # zero_params="bias" (nb): zennit's ZPlus / AlphaBeta without any bias in their denominators
    "epsilon_plus": (_zennit_preset(lambda s, g, nb: R.z_plus(bias=not nb and "split", stabiliser=s)),
                     _ZENNIT_OPTIONS),
    "epsilon_plus_flat": (
        _zennit_preset(lambda s, g, nb: R.z_plus(bias=not nb and "split", stabiliser=s),
                       first=lambda s: R.flat(stabiliser=s)), _ZENNIT_OPTIONS),
    "epsilon_gamma_box": (
        _zennit_preset(lambda s, g, nb: R.gamma(g, stabiliser=s, zero_params="bias" if nb else None),
                       first_kinds=("conv",), box=True),
        _ZENNIT_OPTIONS + ("gamma", "low", "high")),
    "epsilon_alpha2_beta1": (
        _zennit_preset(lambda s, g, nb: R.alpha_beta(2, 1, bias=not nb and "split", stabiliser=s)),
        _ZENNIT_OPTIONS),
    "epsilon_alpha2_beta1_flat": (
        _zennit_preset(lambda s, g, nb: R.alpha_beta(2, 1, bias=not nb and "split", stabiliser=s),
                       first=lambda s: R.flat(stabiliser=s)), _ZENNIT_OPTIONS),
    "excitation_backprop": (_excitation_backprop, ("stabiliser", "zero_params")),
}
for _name, (_build, _) in COMPOSITES.items():
    _build.preset_name = _name
