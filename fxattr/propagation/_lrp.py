"""Layer-wise relevance propagation and its relatives as explicit reverse passes over traced graphs.

``fxattr.lrp(f, rule=...)`` / ``fxattr.lrp(f, composite=...)``, ``fxattr.deep_taylor``,
``fxattr.deep_taylor_bounded``, ``fxattr.guided_backprop`` and ``fxattr.deconvnet`` trace the
model once (:func:`fxattr.graph.trace`) and build a reverse pass in which every rule is a pure
function (:mod:`fxattr.propagation.rules`): no hooks, no custom autograd functions. The explainers compose
with ``torch.vmap``, ``torch.func.grad`` (exact higher-order derivatives) and ``torch.compile``.

Rules and composites are data: ``fxattr.propagation.rules`` holds the rule constructors,
``fxattr.lrp.Composite`` chooses a rule per layer (see :mod:`fxattr.propagation.composites`).
"""

from __future__ import annotations

import torch

from fxattr._explainer import check_choice, check_model, explainer
from fxattr.errors import FxattrError, fail
from fxattr.propagation import rules
from fxattr.propagation._canonize import Canonizer, canonize, merge_batch_norm, replace_modules
from fxattr.propagation.composites import COMPOSITES, Composite, LayerInfo, rule_option, single_rule
from fxattr.propagation.composites import composite as _preset
from fxattr.propagation.composites import deep_taylor_composite
from fxattr.propagation._engine import Plan
from fxattr.propagation._transformers import preset_explainer
from fxattr.propagation.rules import Rule
from fxattr.targets import select

__all__ = ["COMPOSITES", "RULES", "Composite", "LayerInfo", "Rule", "beta_smooth", "deconvnet", "deep_taylor",
           "deep_taylor_bounded", "guided_backprop", "lrp", "rules"]


def _alpha_beta(where, alpha=None, beta=None, bias=True):
    # iNNvestigate infers the missing one of alpha, beta from alpha - beta = 1
    if alpha is None and beta is None:
        alpha, beta = 2.0, 1.0
    elif alpha is None:
        alpha = rules._number(where, "beta", beta) + 1
    elif beta is None:
        beta = rules._number(where, "alpha", alpha) - 1
    return rules.alpha_beta(alpha, beta, bias=bias)


# rule name -> (constructor(where, **options), allowed options)
_RULES = {
    "z": (lambda w: rules.z(), ()),
    "z_IB": (lambda w: rules.z(bias=False), ()),
    "epsilon": (lambda w, epsilon=1e-7: rules.epsilon(epsilon), ("epsilon",)),
    "epsilon_IB": (lambda w, epsilon=1e-7: rules.epsilon(epsilon, bias=False), ("epsilon",)),
    "gamma": (lambda w, gamma=0.25, stabiliser=1e-6, zero_params=None:
              rules.gamma(gamma, stabiliser=stabiliser, zero_params=zero_params),
              ("gamma", "stabiliser", "zero_params")),
    "alpha_beta": (lambda w, alpha=None, beta=None: _alpha_beta(w, alpha, beta), ("alpha", "beta")),
    "alpha_beta_IB": (lambda w, alpha=None, beta=None: _alpha_beta(w, alpha, beta, bias=False),
                      ("alpha", "beta")),
    "alpha_1_beta_0": (lambda w: rules.alpha_beta(1, 0), ()),
    "alpha_1_beta_0_IB": (lambda w: rules.alpha_beta(1, 0, bias=False), ()),
    "alpha_2_beta_1": (lambda w: rules.alpha_beta(2, 1), ()),
    "alpha_2_beta_1_IB": (lambda w: rules.alpha_beta(2, 1, bias=False), ()),
    "z_plus": (lambda w: rules.z_plus(), ()),
    "z_plus_fast": (lambda w: rules.z_plus_fast(), ()),
    "w_square": (lambda w: rules.w_square(), ()),
    "flat": (lambda w: rules.flat(), ()),
    "zb": (lambda w, low=None, high=None: _zb(w, low, high), ("low", "high")),
    "pass": (lambda w: rules.pass_(), ()),
    "norm": (lambda w, stabiliser=1e-6: rules.norm(stabiliser), ("stabiliser",)),
}
RULES = tuple(_RULES)


def _zb(where, low, high):
    if low is None or high is None:
        raise fail(where, "rule 'zb' needs low= and high=, the bounds of the input")
    return rules.zb(low, high)


def _build_composite(where: str, rule, composite, options: dict) -> Composite:
    if (rule is None) == (composite is None):
        raise fail(where, "give exactly one of rule= (a rule name: " + ", ".join(RULES) + ") and "
                          "composite= (a preset name: " + ", ".join(sorted(COMPOSITES)) + ", or an "
                          "fxattr.lrp.Composite)")
    if composite is not None:
        if isinstance(composite, Composite):
            if options:
                raise fail(where, f"options {', '.join(sorted(options))} apply to named presets only; "
                                  "a Composite object carries its rules")
            return composite
        if not isinstance(composite, str):
            raise fail(where, f"composite must be a preset name or an fxattr.lrp.Composite, got "
                              f"{type(composite).__name__}")
        return _preset(where, composite, **options)
    if isinstance(rule, Rule):
        chosen, rest = rule, dict(options)
    else:
        if not isinstance(rule, str) or rule not in _RULES:
            raise fail(where, f"rule must be one of {', '.join(map(repr, RULES))} or an "
                              f"fxattr.propagation.rules.Rule; got {rule!r}")
        build, allowed = _RULES[rule]
        rule_options = {k: v for k, v in options.items() if k in allowed}
        rest = {k: v for k, v in options.items() if k not in allowed}
        try:
            chosen = build(where, **rule_options)
        except FxattrError as error:  # a rule's own check, reported under the function called (lrp)
            if error.where is None or not error.where.startswith("lrp.rules."):
                raise
            raise fail(where, error.message) from error
    input_rule = rest.pop("input_layer_rule", None)
    if rest:
        allowed = _RULES[rule][1] if isinstance(rule, str) else ()
        raise fail(where, f"rule {rule!r} takes {', '.join(allowed + ('input_layer_rule',))}; got "
                          f"unknown option(s) {', '.join(sorted(rest))}")
    if input_rule is not None:
        input_rule = rule_option(where, input_rule, "input_layer_rule")
    return single_rule(chosen, input_rule=input_rule, name=getattr(chosen, "name", "rule"))


def _plan(where, f, composite=None, relu=None) -> Plan:
    check_model(where, f)
    try:
        return Plan(f, where, composite, relu)
    except FxattrError as error:
        message = str(error)
        if message.startswith(f"fxattr.{where}:"):
            raise
        raise fail(where, message.removeprefix("fxattr.")) from error


def lrp(f, *, rule: str | Rule | None = None, composite: str | Composite | None = None,
        canonizers=None, **options):
    """Layer-wise relevance propagation (Bach et al. 2015) with one rule or a composite of rules.

    ``explain(params, x, target)`` runs the model once, seeds the selected output with its value
    (for a callable target: ``output * d target / d output``) and propagates relevance back to the
    input through the traced graph: kernel layers (convolutions, dense layers, with eval batch norm
    folded in) by their rule, additions and average pooling split in proportion to their inputs'
    contributions (z rule), element-wise activations pass relevance, max pooling gives it to the
    winner, concatenation/reshapes/indexing route it. An op without a rule (softmax, say) is an
    error naming the graph node.

    Args:
        f: the function of ``fxattr.functionalize``.
        rule: one rule on every kernel layer (iNNvestigate's single-rule analyzers): ``"z"``,
            ``"z_IB"``, ``"epsilon"`` (``epsilon=``, default 1e-7), ``"epsilon_IB"``, ``"gamma"``
            (``gamma=``), ``"alpha_beta"`` (``alpha=``, ``beta=``, alpha - beta = 1),
            ``"alpha_beta_IB"``, ``"alpha_1_beta_0"``, ``"alpha_1_beta_0_IB"``,
            ``"alpha_2_beta_1"``, ``"alpha_2_beta_1_IB"``, ``"z_plus"``, ``"z_plus_fast"``,
            ``"w_square"``, ``"flat"``, ``"zb"`` (``low=``, ``high=``), ``"pass"``, ``"norm"``; or an
            ``fxattr.propagation.rules.Rule``. ``input_layer_rule=`` (a rule name such as ``"Flat"``, a Rule,
            or ``(low, high)`` for z^B) replaces it on the layers reading the input.
        composite: a preset: iNNvestigate's ``"sequential_preset_a"``, ``"sequential_preset_b"``
            (alpha-beta 1-0 / 2-1 on convolutions, epsilon 0.1 on dense layers; ``epsilon=``,
            ``input_layer_rule=``), ``"sequential_preset_a_flat"``, ``"sequential_preset_b_flat"``
            (flat on the input layer), ``"sequential_preset_b_flat_until_idx"`` (flat on kernel
            layers 0..``until_layer_idx``); zennit's ``"epsilon_plus"``, ``"epsilon_plus_flat"``,
            ``"epsilon_gamma_box"`` (``low=``, ``high=``, ``gamma=``), ``"epsilon_alpha2_beta1"``,
            ``"epsilon_alpha2_beta1_flat"`` (zennit's conventions: bias split into b+ and b-,
            stabiliser and epsilon 1e-6, Norm on additions and average pooling; ``epsilon=``,
            ``stabiliser=``); for transformers, ``"attnlrp"`` (AttnLRP, Achtibat et al. 2024) and
            ``"cp_lrp"`` (CP-LRP, Ali et al. 2022) under LXT 2.1's efficient-mode conventions
            (every constant in :mod:`fxattr.propagation._transformers`); or an
            ``fxattr.lrp.Composite``.
            zennit's ``"excitation_backprop"`` (Zhang et al. 2016 as zennit writes it: z+ with
            ``b+`` in the denominator on every convolution and dense layer, the first included,
            Norm on additions and average pooling, the gradient through activations and unfolded
            batch norms; ``stabiliser=``, ``zero_params="bias"`` for the paper's bias-free
            z+). Seeded with the output's value like every LRP composite: divide by
            ``f(params, x)[target]`` for Zhang's marginal winning probabilities.
            zennit's presets take ``zero_params="bias"`` (no bias in any rule's denominator) and
            ``epsilon=`` / ``stabiliser=`` as numbers or as :func:`fxattr.propagation.rules.stabiliser`
            (zennit's ``clip`` / ``norm_scale``).
        canonizers: a list of :class:`fxattr.lrp.Canonizer` (graph rewrites and parameter
            transforms, applied in order before fxattr's own batch-norm fold; see
            :mod:`fxattr.propagation._canonize`), e.g. ``[fxattr.lrp.merge_batch_norm()]``.

    Example:
        >>> f, params = fxattr.functionalize(torchvision.models.vgg16().eval())
        >>> explain = fxattr.lrp(f, composite="epsilon_plus_flat")
        >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "lrp"
    check_model(where, f)
    chosen = _build_composite(where, rule, composite, options)
    canonical, to_canonical = canonize(where, f, canonizers)
    plan = _plan(where, canonical, chosen)
    # the AttnLRP / CP-LRP presets run as one vjp of a modified forward where they can
    run = preset_explainer(plan)

    def explain(params, x, target=None):
        return run(to_canonical(params), x, target, seed="value")

    config = {"rule": rule, "composite": composite, **options}
    if canonizers:
        config["canonizers"] = tuple(c.name for c in canonizers)
    fn = explainer("lrp", f, config, explain)
    fn.composite = chosen
    fn.gradient_form = run.gradient_form
    return fn


def deep_taylor(f):
    """Deep Taylor decomposition for ReLU networks (Montavon et al. 2017), iNNvestigate's
    ``deep_taylor``: z+ without bias on every kernel layer, the gradient through average pooling
    and additions, seeded with the positive part of the selected output's value (iNNvestigate
    appends a ReLU to the outputs: a negative output is explained by zeros).

    Example:
        >>> torch.vmap(fxattr.deep_taylor(f), in_dims=(None, 0, 0))(params, images, labels)
    """
    plan = _plan("deep_taylor", f, deep_taylor_composite())

    def explain(params, x, target=None):
        return plan.explain(params, x, target, seed="positive")

    return explainer("deep_taylor", f, {}, explain)


def deep_taylor_bounded(f, *, low, high):
    """Deep Taylor decomposition with the z^B rule on the input layer, for inputs bounded by
    ``low <= x <= high`` (numbers, or tensors broadcastable to one example), iNNvestigate's
    ``deep_taylor.bounded`` (seeded like :func:`deep_taylor`).

    Example:
        >>> explain = fxattr.deep_taylor_bounded(f, low=-2.1, high=2.6)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "deep_taylor_bounded"
    rules.zb(low, high)  # checks the bounds
    plan = _plan(where, f, deep_taylor_composite(low, high))

    def explain(params, x, target=None):
        return plan.explain(params, x, target, seed="positive")

    return explainer(where, f, {"low": low, "high": high}, explain)


_SEEDS = ("value", "one")


def _modified_gradient(where: str, f, relu: str, seed: str):
    """The gradient with the reverse pass of every ReLU replaced (``relu`` names how)."""
    check_choice(where, "seed", seed, _SEEDS)
    plan = _plan(where, f, None, relu=relu)

    def explain(params, x, target=None):
        return plan.explain(params, x, target, seed=seed)

    return explainer(where, f, {"seed": seed}, explain)


def guided_backprop(f, *, seed: str = "value"):
    """Guided backpropagation (Springenberg et al. 2015): the gradient, with every ReLU passing
    only positive signal where its input was positive (``relu'(x) * max(R, 0)``).

    Args:
        f: the function of ``fxattr.functionalize``.
        seed: ``"value"`` seeds the selected output with its value (iNNvestigate's reverse
            analyzers); ``"one"`` with 1 (captum's ``GuidedBackprop``, zennit).

    Example:
        >>> torch.vmap(fxattr.guided_backprop(f), in_dims=(None, 0, 0))(params, images, labels)
    """
    return _modified_gradient("guided_backprop", f, "guided", seed)


def deconvnet(f, *, seed: str = "value"):
    """DeconvNet (Zeiler & Fergus 2014): the gradient, with every ReLU replaced in the reverse
    pass by a ReLU of the signal (``max(R, 0)``, whatever the forward input).

    Args:
        f: the function of ``fxattr.functionalize``.
        seed: ``"value"`` (iNNvestigate) or ``"one"`` (captum's ``Deconvolution``, zennit).

    Example:
        >>> torch.vmap(fxattr.deconvnet(f), in_dims=(None, 0, 0))(params, images, labels)
    """
    return _modified_gradient("deconvnet", f, "deconvnet", seed)


def beta_smooth(f, *, beta: float = 10.0, seed: str = "one"):
    """The gradient with every ReLU's derivative replaced by ``sigmoid(beta * x)`` (zennit's
    ``BetaSmooth`` composite with its ``ReLUBetaSmooth`` rule; Dombrowski et al. 2019): the
    derivative of the softplus ``log(1 + exp(beta x)) / beta``, which approaches the ReLU as
    ``beta`` grows. The forward pass is the model's own; only the reverse pass is smoothed, so
    derivatives of the explanation (second order through ReLUs) are no longer zero almost everywhere.

    Every ReLU is smoothed: ``nn.ReLU`` modules, ``F.relu``, ``torch.relu`` and ``x.relu()`` (zennit
    hooks ``nn.ReLU`` modules only, and reads a module called twice, such as torchvision's
    ``BasicBlock.relu``, at its last call's input for both calls); other activations keep their
    gradient.

    Args:
        f: the function of ``fxattr.functionalize``.
        beta: the softplus sharpness, a finite number > 0 (zennit's default 10).
        seed: ``"one"`` seeds the selected output with 1 (the gradient, zennit's ``Gradient``
            attributor with a one-hot output), ``"value"`` with its value.

    Example:
        >>> explain = fxattr.beta_smooth(f, beta=10.0)
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
    """
    where = "beta_smooth"
    b = rules._number(where, "beta", beta)
    if b <= 0:
        raise fail(where, f"beta must be > 0, got {beta!r}")
    check_choice(where, "seed", seed, _SEEDS)
    plan = _plan(where, f, None)

    def explain(params, x, target=None):
        program = plan.for_input(x)
        values, cache, raw = program.f.guarded(x, lambda: program.forward(params, x), where)
        y = program.output_of(raw)[0]
        grad = torch.func.grad(lambda t: select(where, t, target))(y)
        gradient = program.rule_override(values, cache, params)

        def override(step, signal):
            if step.kind == "activation" and step.relu:
                return [(step.x, torch.sigmoid(b * values[step.x]) * signal)]
            return gradient(step, signal)

        seeds = program.seed(values, y * grad if seed == "value" else grad)
        return program.to_input(x, values, program.reverse(params, values, cache, seeds, override))

    return explainer(where, f, {"beta": b, "seed": seed}, explain)


# ``fxattr.lrp`` is this function; its rules and composites ride along as attributes.
lrp.rules = rules
lrp.Rule = Rule
lrp.Composite = Composite
lrp.LayerInfo = LayerInfo
lrp.Canonizer = Canonizer
lrp.merge_batch_norm = merge_batch_norm
lrp.replace_modules = replace_modules
lrp.RULES = RULES
lrp.COMPOSITES = tuple(sorted(COMPOSITES))
