"""AttnLRP and CP-LRP for transformers: ``fxattr.lrp(f, composite="attnlrp")`` / ``"cp_lrp"``.

The conventions are those of LXT 2.1's *efficient* mode (Achtibat et al., "AttnLRP: Attention-Aware
Layer-Wise Relevance Propagation for Transformers", ICML 2024; CP-LRP: Ali et al., "XAI for
Transformers: Better Explanations through Conservative Propagation", ICML 2022). LXT computes
gradient x input of a forward pass whose gradient is modified in place; fxattr's rules below are
reverse functions of the engine's node-by-node walk, and the two agree because every rule keeps
``R = value * modified gradient`` at every node. The same fact lets fxattr run a preset as ONE
vector-Jacobian product of a modified forward pass (the *gradient form*,
:mod:`fxattr.propagation._gradient_form`; its cost against the walk's is in bench/RESULTS.md)
wherever it can express every node;
otherwise (a masked or functional multihead attention, Swin's window attention, an element-wise
function that receives relevance) the walk runs, and ``explain.gradient_form`` says why (``True`` when the
gradient form runs). Every constant, as read from LXT's code:

- linear layers, convolutions, GPT-2's ``Conv1D`` (``addmm``), residual additions, rotary embeddings
  (products with constant ``cos`` / ``sin``), grouped-query repeats and parameter-free linear maps:
  LRP-0 (**epsilon 0**; LXT takes the plain gradient there). Biases, position embeddings and the
  attention mask absorb relevance. Exact zeros of a denominator are replaced by ``1e-7``
  (``rules.safe``) or ``1e-12`` (operation rules) so that a zero output gives zero, never NaN.
- LayerNorm: ``(x - mean) / stop_grad(sqrt(var + eps)) * w + b``: the centring keeps its
  gradient, only the standard deviation is frozen (LRP-0 through the frozen map).
- RMSNorm (written out, Llama): ``x * stop_grad(rsqrt(mean(x^2) + eps))``: the ``rsqrt`` factor
  is a gate (no relevance), computed in float32 as the model does.
- element-wise activations (GELU, SiLU, tanh of BERT's pooler, ...): the identity rule
  ``R_in = R_out * z / (z + 1e-10)`` with ``z`` the activation's input (LXT's
  ``identity_rule_implicit``, epsilon ``1e-10``, added with its sign ignored as LXT does).
- attention (eager: two matmuls and a softmax; or ``F.scaled_dot_product_attention``): the
  uniform rule on both matmuls (query and key each take half of the scores' relevance, the
  attention weights and the values each half of the output's: LXT divides the gradient of query
  and key by 4 and of value by 2) and the softmax rule ``R_in = x * (R_out - s * sum(R_out))``
  with ``x`` the scaled scores plus mask (the mask then absorbs its share at the addition; masked
  entries, ``finfo.min``, have ``s = 0`` and ``R_out = 0``, so they get exactly 0, never NaN).
- SwiGLU (``act(x W_gate) * (x W_up)``): the identity rule on the activated gate and the product
  split in half (uniform rule); a product with a sigmoid / softmax / ``rsqrt`` factor treats that
  factor as a constant gate.
- CP-LRP: query and key are detached (the attention weights are a constant: the values take all
  of the output's relevance, query and key none; in eager attention, in
  ``F.scaled_dot_product_attention`` and in ``nn.MultiheadAttention``), and Llama's SwiGLU gate is
  detached (the up projection takes all of the product's relevance); the rest as AttnLRP.

Seeding as everywhere in fxattr's LRP: the selected output's value (LXT's gradient-1 seed of
gradient x input is the same thing). Conservation: CP-LRP sums to the target logit on a model
without biases and position embeddings (to the identity rule's 1e-10); AttnLRP does not (the
softmax rule drops its bias term), nor does either variant where biases absorb relevance.

Example:
    >>> model = transformers.GPT2ForSequenceClassification(config).eval()
    >>> f, params = fxattr.functionalize(Logits(model), input_shape=(length, hidden))  # inputs_embeds
    >>> explain = fxattr.lrp(f, composite="attnlrp")
    >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0))(params, embeddings, labels)
    >>> tokens = relevance.sum(-1)                                  # (batch, length)
"""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fxattr.errors import fail
from fxattr.propagation import op_rules
from fxattr.propagation import rules as R
from fxattr.propagation._gradient_form import (
    GradientForm,
    gradient_form,
    multihead_arguments,
    multihead_attention,
)
from fxattr.propagation.composites import Composite

__all__ = ["IDENTITY_EPSILON", "VARIANTS", "activation_identity_lrp", "addmm_lrp", "cp_bilinear_lrp",
           "cp_multihead_attention_lrp", "cp_product_lrp", "cp_sdpa_lrp", "in_activation_module", "is_activation_output", "is_softmax_output",
           "preset_explainer", "transformer_composite", "written_out_activation_factor"]

VARIANTS = ("attnlrp", "cp_lrp")
IDENTITY_EPSILON = 1e-10  # LXT's identity_rule_implicit: gradient = fn(x) / (x + 1e-10)

# ops that hand a tensor on unchanged in eval (walked through to find the producer of a factor)
_PASS_FUNCTIONS = {F.dropout, torch.clone, torch.Tensor.contiguous}
_PASS_METHODS = {"type", "to", "float", "double", "half", "contiguous", "clone"}
_ACTIVATIONS = {F.silu, F.gelu, F.relu, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.mish, F.elu, F.leaky_relu,
                torch.relu}
_ACTIVATION_METHODS = {"tanh", "sigmoid", "relu"}


def activation_identity_lrp(view, relevance):
    """AttnLRP's identity rule on an element-wise activation: ``R_in = R_out * z / (z + 1e-10)``
    (``z`` the input; LXT's ``identity_rule_implicit``)."""
    (x,) = view.inputs
    return (relevance * x / (x + IDENTITY_EPSILON),)


def addmm_lrp(view, relevance):
    """LRP-0 through ``torch.addmm(bias, x, W)`` (GPT-2's ``Conv1D``): ``R_x = x * J^T (R / z)``,
    the bias absorbing its share."""
    return op_rules.linear_lrp(view.fn, view.inputs, relevance, epsilon=0.0, output=view.output)


_registered = False


def _node_args(node) -> tuple:
    # the fx node's arguments read as a plain attribute: torch.compile does not trace the
    # ``Node.args`` property (torch.fx is on dynamo's skip list), and these structural reads run
    # inside the explainer
    return node._args


def register_kinds() -> None:
    """Registers (once) operation kinds for Hugging Face models: ``torch.addmm`` (GPT-2's ``Conv1D``:
    LRP-0, DeepLIFT through its transpose), ``Tensor.split`` and the dtype cast ``Tensor.type``
    (routings: every method by the vector-Jacobian product). Registered kinds only classify what
    the built-in classification leaves unsupported, so where the catalogue already knows one
    (``addmm`` as a kernel layer, ``type`` as a route since the graph commit f016df7) its own
    classification wins and the result is the same LRP-0 / routing."""
    global _registered
    if _registered:
        return
    _registered = True
    from fxattr.graph import OpKind, register, registered_kinds
    from fxattr.propagation._engine import register_reverse

    known = {kind.name for kind in registered_kinds()}
    table = {
        "addmm": ({torch.addmm}, set(), {"lrp": addmm_lrp, "deeplift": op_rules.linear_deeplift_reverse}),
        "split_cast": ({torch.split}, {"split", "type"}, {"lrp": op_rules.route_reverse,
                                                          "deeplift": op_rules.route_reverse}),
    }
    for name, (functions, methods, reverses) in table.items():
        if name in known:
            continue
        register(OpKind(name, functions=functions, methods=methods, modules=(),
                        accepts=lambda node, data_refs: data_refs == 1))
        for method, fn in reverses.items():
            register_reverse(method, name, fn)


def _producer(node):
    """The node that computed ``node``'s value, walking back through dropout and dtype casts."""
    while getattr(node, "op", None) in ("call_function", "call_method") and _node_args(node):
        passes = node.target in _PASS_FUNCTIONS if node.op == "call_function" else node.target in _PASS_METHODS
        if not passes:
            break
        node = _node_args(node)[0]
    return node


def is_softmax_output(node) -> bool:
    """Whether ``node``'s value is a softmax's output (through dropout and dtype casts): CP-LRP's
    constant attention weights."""
    return _is_softmax(node)


def is_activation_output(node) -> bool:
    """Whether ``node``'s value is an element-wise activation's output (through dropout and casts):
    CP-LRP's detached SwiGLU gate."""
    return _is_activation(node)


def in_activation_module(node) -> bool:
    """Whether ``node`` was captured inside an activation module (``transformers.activations``,
    ``torch.nn`` activations): a written-out activation."""
    return _in_activation_module(node)


def _is_softmax(node) -> bool:
    node = _producer(node)
    if node.op == "call_function":
        return node.target in (F.softmax, torch.softmax)
    return node.op == "call_method" and node.target == "softmax"


def _is_activation(node) -> bool:
    node = _producer(node)
    if node.op == "call_function":
        return node.target in _ACTIVATIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _one_factor_constant(view, relevance, constant: tuple[bool, bool]):
    """All of the relevance to the factor that is not constant (LRP-0 through the map linear in it)."""
    a, b = view.inputs
    if constant[1]:
        (r_a,) = op_rules.linear_lrp(lambda t: view.fn(t, b), (a,), relevance, epsilon=0.0, output=view.output)
        return r_a, torch.zeros_like(b)
    (r_b,) = op_rules.linear_lrp(lambda t: view.fn(a, t), (b,), relevance, epsilon=0.0, output=view.output)
    return torch.zeros_like(a), r_b


def cp_bilinear_lrp(view, relevance):
    """CP-LRP on a matmul: with the attention weights (a softmax's output) as one operand, they are
    constant and the values take all of the relevance; otherwise AttnLRP's uniform rule."""
    if len(view.inputs) == 2:
        constant = tuple(_is_softmax(n) for n in _node_args(view.node)[:2])
        if constant[0] != constant[1]:
            return _one_factor_constant(view, relevance, constant)
    return op_rules.bilinear_lrp_reverse(view, relevance)


def cp_product_lrp(view, relevance):
    """CP-LRP on ``a * b``: an activated factor (SwiGLU's gate) is detached, the other takes all;
    otherwise as AttnLRP (written-out activations, gates constant, else the uniform rule)."""
    if len(view.inputs) == 2 and not _in_activation_module(view.node):
        constant = tuple(_is_activation(n) for n in _node_args(view.node)[:2])
        if constant[0] != constant[1]:
            return _one_factor_constant(view, relevance, constant)
    return attnlrp_product_lrp(view, relevance)


def cp_sdpa_lrp(view, relevance):
    """CP-LRP through ``F.scaled_dot_product_attention``: query and key detached, the output is
    linear in the values, which take all of the relevance (LRP-0)."""
    names = ("query", "key", "value")
    bound = dict(zip(names, view.args))
    bound.update({k: v for k, v in view.kwargs.items() if k in names})
    value = bound.get("value")
    if value is None or any(value is bound.get(n) for n in ("query", "key")):
        raise fail("lrp", f"CP-LRP needs distinct query, key and value tensors at {view.name!r}")
    position = [i for i, t in enumerate(view.inputs) if t is value]

    def of_value(v):
        return view.fn(*[v if t is value else t for t in view.inputs])
    # the math kernel: the fused CPU kernel's backward has no derivative, and a loss of the
    # explanation differentiates this vector-Jacobian product
    with sdpa_kernel(SDPBackend.MATH):
        (r_v,) = op_rules.linear_lrp(of_value, (value,), relevance, epsilon=0.0, output=view.output)
    return tuple(r_v if i in position else torch.zeros_like(t) for i, t in enumerate(view.inputs))


def cp_multihead_attention_lrp(view, relevance):
    """CP-LRP through ``nn.MultiheadAttention`` (the module, no masks): query and key detached, the
    output is affine in the value, which takes all of the relevance (LRP-0 through the value path:
    the value's projection, the constant attention weights, the out-projection)."""
    module = view.module
    bound = multihead_arguments(module, view.args, view.kwargs) if module is not None else "no module"
    if isinstance(bound, str):
        raise fail("lrp", f"CP-LRP has no rule for multihead attention {view.name!r} with {bound}")
    query, key, value = bound["query"], bound["key"], bound["value"]
    out_relevance = relevance[0] if isinstance(relevance, (tuple, list)) else relevance

    def of_value(v):
        return multihead_attention(query, key, v, view.params, module.num_heads, batch_first=module.batch_first)
    (r_v,) = op_rules.linear_lrp(of_value, (value,), out_relevance, epsilon=0.0, output=view.output[0])
    return tuple(r_v if t is value else torch.zeros_like(t) for t in view.inputs)


def _module_type(node):
    stack = node.meta.get("nn_module_stack") if hasattr(node, "meta") else None
    return list(stack.values())[-1][1] if stack else None


def _in_activation_module(node) -> bool:
    kind = _module_type(node)
    return isinstance(kind, type) and (kind.__module__ == "transformers.activations"
                                       or kind.__module__.startswith("torch.nn.modules.activation"))


def _scaled_outer_input(factor, activation) -> bool:
    # ``c * z`` (or ``z * c``) with ``z`` computed outside the activation module: the factor that
    # carries the activation's input in a written-out GELU ``(0.5 z) * (1 + tanh(...))``
    if getattr(factor, "op", None) != "call_function" or factor.target not in (operator.mul, torch.mul):
        return False
    nodes = [a for a in _node_args(factor) if isinstance(a, torch.fx.Node)]
    return len(nodes) == 1 and _module_type(nodes[0]) is not activation


def written_out_activation_factor(node) -> tuple | None:
    """For the product that ends an activation a capture wrote out as element-wise ops (GPT-2's
    ``gelu_new``: ``(0.5 z) * (1 + tanh(...))``): ``(i, c)``, the argument ``i`` that carries
    ``c z`` and the constant ``c``; ``None`` for any other product."""
    args = [a for a in _node_args(node)[:2]]
    if len(args) != 2 or not all(isinstance(a, torch.fx.Node) for a in args) or args[0] is args[1] \
            or not _in_activation_module(node):
        return None
    activation = _module_type(node)
    signal = [_scaled_outer_input(a, activation) for a in args]
    if signal[0] == signal[1]:
        return None
    index = 0 if signal[0] else 1
    constant = next(a for a in _node_args(args[index]) if not isinstance(a, torch.fx.Node))
    return index, constant


def written_out_activation_lrp(view, relevance, otherwise):
    """The identity rule on an activation that a capture wrote out as element-wise ops (GPT-2's
    ``gelu_new``: ``(0.5 z) * (1 + tanh(...))``), at the product that ends it: the factor ``c z``
    takes ``R * c z / (c z + c 1e-10)`` (= ``R z / (z + 1e-10)``), the rest none. Products not
    recognised this way go to ``otherwise``."""
    found = written_out_activation_factor(view.node) if len(view.inputs) == 2 else None
    if found is not None:
        index, constant = found
        a, b = view.inputs
        carried = a if index == 0 else b
        r = relevance * carried / (carried + constant * IDENTITY_EPSILON)
        return (r, torch.zeros_like(b)) if index == 0 else (torch.zeros_like(a), r)
    return otherwise(view, relevance)


def attnlrp_product_lrp(view, relevance):
    """AttnLRP on ``a * b``: a written-out activation's last product by the identity rule
    (:func:`written_out_activation_lrp`), otherwise the engine's rule (a sigmoid / softmax / rsqrt
    factor is a constant gate, else the uniform rule)."""
    return written_out_activation_lrp(view, relevance, op_rules.product_lrp_reverse)


def transformer_composite(variant: str) -> Composite:
    """The composite of ``variant`` (``"attnlrp"`` or ``"cp_lrp"``): LRP-0 (``rules.z()``) on every
    kernel layer and addition, the operation rules of the module docstring."""
    if variant not in VARIANTS:
        raise fail("lrp", f"variant must be one of {VARIANTS}, got {variant!r}")
    register_kinds()
    operations = {"activation": activation_identity_lrp, "product": attnlrp_product_lrp}
    if variant == "cp_lrp":
        operations.update(bilinear=cp_bilinear_lrp, product=cp_product_lrp, attention=cp_sdpa_lrp,
                          multihead_attention=cp_multihead_attention_lrp)
    composite = Composite(kinds={"conv": R.z(), "linear": R.z(), "add": R.z(), "avgpool": R.z()},
                          name=variant, operations=operations)
    composite.gradient_form = variant  # the mark preset_explainer reads
    return composite


def preset_explainer(plan):
    """``explain(params, x, target, seed=...)`` for ``plan``: with an AttnLRP / CP-LRP preset's
    composite, ONE vector-Jacobian product of a modified forward pass
    (:mod:`fxattr.propagation._gradient_form`) wherever it expresses every node, else (and for every
    other composite) the plan's node-by-node walk. ``explain.gradient_form`` is ``True`` when the
    fast form runs, else the reason it does not (``None``: not a preset).

    Example:
        >>> plan = Plan(f, "lrp", transformer_composite("attnlrp"))
        >>> explain = preset_explainer(plan)            # what fxattr.lrp(f, composite="attnlrp") runs
        >>> torch.vmap(explain, in_dims=(None, 0, 0))(params, embeddings, labels)
    """
    variant = getattr(plan.composite, "gradient_form", None)
    if variant not in VARIANTS or plan.composite.operations != transformer_composite(variant).operations:
        explain = plan.explain
        return _tagged(explain, None)
    forms: dict = {}

    def form_of(program):
        if program.inputs not in forms:
            forms[program.inputs] = gradient_form(program, variant)
        return forms[program.inputs]

    def explain(params, x, target, *, seed: str = "value"):
        program = plan.for_input(x)
        form = form_of(program)
        if isinstance(form, GradientForm):
            return form.explain(params, x, target, seed=seed)
        return program.explain(params, x, target, seed=seed)

    main = form_of(plan)
    return _tagged(explain, True if isinstance(main, GradientForm) else main)


def _tagged(explain, state):
    def tagged(params, x, target, *, seed: str = "value"):
        return explain(params, x, target, seed=seed)
    tagged.gradient_form = state
    return tagged
