"""An audit of the public functions added in session 4: bad and unusual inputs, every outcome classified.

Covers what ``test_bad_inputs.py`` does not: ``fxattr.beta_smooth``, the zennit options of ``lrp``
(``excitation_backprop``, ``rules.stabiliser``, ``canonizers=``, ``zero_params=``), DeepLIFT's captum
options, GradientShap's flags and callable baselines, ``gradient(postprocess=)``, the perturbation
family's tuple x / masks / integer inputs, ``guided_gradcam`` with tuple x, ``fxattr.layers``,
``fxattr.crp`` / ``crp_reference_samples``, ``fxattr.text.attribute``, every ``fxattr.metrics``
constructor, ``fxattr.viz`` and ``attribute_dataset`` / ``load_attributions``.

Each case builds and calls one public function with one thing wrong (or nothing wrong) and is
classified as

- ``clear``: an ``FxattrError`` whose text starts ``fxattr.<the function called>:`` and names the
  argument at fault;
- ``ok``: a result where one is due (the check of the case holds: shape, finite values, ...);
- ``raw``: any other exception, or an ``FxattrError`` under another name / not naming the argument,
  or a refusal of a valid call;
- ``silent``: a result where an error (or NaN) was due, or a result failing its check, or a change
  of any model's ``state_dict``.

Option cases are generated from the signatures (every bool / int / float / str keyword gets values
of the wrong kind: NaN, Inf, negative, fractional, a string, a bad string) plus hand-written ones;
call cases (bad targets under vmap and eagerly, NaN / integer / wrong-rank / wrong-dtype / tuple x,
empty batch, models returning tuples) run on each new explainer. Known misses in files other
engineers were editing when this audit was written are strict xfails (``KNOWN``).
``python -m tests.robustness.test_public_api_audit`` prints the totals per family.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import re
import tempfile
import typing
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fxattr

NAN, INF = float("nan"), float("inf")
SCRATCH = tempfile.TemporaryDirectory(prefix="fxattr_audit_")  # removed when the process ends


def _scratch_dir() -> str:
    return tempfile.mkdtemp(dir=SCRATCH.name)


def _scratch_file(suffix: str = "") -> str:
    handle, path = tempfile.mkstemp(suffix=suffix, dir=SCRATCH.name)
    os.close(handle)
    return path

N = 3  # examples per batch
TARGETS = (0, 1, 3)


# --------------------------------------------------------------------------------------------- models
def _cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def _cnn_bn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = self.relu(self.conv(x))
        return self.head(h.mean((-2, -1))), h


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 + 2, 4)

    def forward(self, image, extra):
        h = self.relu(self.conv2(self.relu(self.conv(image))))
        return self.head(torch.cat([h.mean((-1, -2)), extra], -1))


MODELS = {"cnn": _cnn, "cnn_bn": _cnn_bn, "mlp": _mlp, "tuple_out": _TupleOut, "two_inputs": _TwoInputs}
SHAPES = {"cnn": (3, 6, 6), "cnn_bn": (3, 6, 6), "mlp": (6,), "tuple_out": (3, 6, 6)}
LIVE: dict = {}  # kind -> module, for the state check


@functools.cache
def env(kind: str = "cnn", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    model = MODELS[kind]().to(dtype).eval()
    if kind == "cnn_bn":  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 1.5)
    f, params = fxattr.functionalize(model)
    LIVE[(kind, dtype)] = model
    if kind != "tuple_out":
        prime(fxattr.gradient(f), params, kind, dtype)
    return model, f, params


def prime(explain, params, kind, dtype=torch.float32):
    """One good eager call: a model function remembers the first example's shape it is given, and
    a failing first call would teach it a wrong one (test_a_failed_call_does_not_teach_the_example_shape),
    so every function is shown a good example before any case, whatever order the cases run in."""
    x = xs(kind, n=1, dtype=dtype)
    explain(params, tuple(t[0] for t in x) if isinstance(x, tuple) else x[0], 0)


def xs(kind: str = "cnn", n: int = N, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(1)
    if kind == "two_inputs":
        return (torch.randn(n, 3, 6, 6, generator=generator).to(dtype), torch.randn(n, 2, generator=generator).to(dtype))
    return torch.randn(n, *SHAPES[kind], generator=generator).to(dtype)


def ys(n: int = N):
    return torch.tensor(TARGETS[:n])


def vmapped(fn, in_dims=(None, 0, 0)):
    return torch.vmap(fn, in_dims=in_dims, randomness="same")


def leaves(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [leaf for item in result for leaf in leaves(item)]
    if isinstance(result, dict):
        return [leaf for item in result.values() for leaf in leaves(item)]
    if hasattr(result, "_fields"):
        return leaves(tuple(result))
    return []


def batch_ok(n: int = N):
    """A result of n examples: every tensor leaf has n rows and is finite."""
    def check(result):
        tensors = leaves(result)
        return bool(tensors) and all(t.shape[:1] == (n,) and (t.numel() == 0 or bool(torch.isfinite(t).all()))
                                     for t in tensors if t.dim() > 0)
    return check


def empty_ok(result):
    tensors = leaves(result)
    return bool(tensors) and all(t.shape[:1] == (0,) for t in tensors if t.dim() > 0)


def finite_ok(result):
    tensors = leaves(result)
    return bool(tensors) and all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def nan_or_error(result):
    """Under vmap NaN in x propagates into the result (documented); a finite map would be silent."""
    tensors = [t for t in leaves(result) if t.is_floating_point()]
    return bool(tensors) and any(bool(torch.isnan(t).any()) for t in tensors)


# ------------------------------------------------------------------------------------------- harness
@dataclass(frozen=True)
class Case:
    family: str
    name: str  # the public function: its error must read "fxattr.<name>: ..."
    label: str
    call: typing.Callable
    expect: typing.Any  # "error", "either" (clear error or a finite result) or a check(result) -> bool
    argument: str | None = None  # a word the error must contain (the argument at fault)

    @property
    def id(self) -> str:
        return f"{self.family}|{self.name}|{self.label}"


CASES: list[Case] = []
# Other names an error may carry: fxattr.text.attribute under ``fxattr.text`` or under the method
# it runs (fxattr.layers reports under its public path, ``fxattr.layers.layer_conductance: ...``).
ALIASES = {"text.attribute": ("text", "integrated_gradients", "deeplift", "lrp")}


def anything(result):
    return True

OUTCOMES: dict = {}


def case(family, name, label, call, expect="error", argument=None):
    CASES.append(Case(family, name, label, call, expect, argument))


def classify(c: Case) -> tuple[str, str]:
    if c.id in OUTCOMES:
        return OUTCOMES[c.id]
    for kind in MODELS:  # built before the seed: a case's random draws do not depend on the order cases run in
        env(kind)
    if c.family == "text":
        text_env()
    before = {key: {k: v.clone() for k, v in m.state_dict().items()} for key, m in LIVE.items()}
    torch.manual_seed(0)
    try:
        result = c.call()
    except fxattr.FxattrError as error:
        text = str(error)
        named = any(text.startswith(f"fxattr.{name}: ") for name in (c.name, *ALIASES.get(c.name, ())))
        body = text.split(": ", 1)[-1]  # the message without "fxattr.<name>: " (which holds an x)
        argued = c.argument is None or any(  # the argument's name as a word, as the user spells it
            re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", body) is not None
            for name in (c.argument if isinstance(c.argument, tuple) else (c.argument,)))
        if c.expect in ("error", "either", "user") or c.expect is nan_or_error or c.expect is anything:
            outcome = ("clear", "") if named and argued else (
                "raw", f"misnamed ({'function' if not named else 'argument ' + repr(c.argument)}): {text[:200]}")
        else:
            outcome = "raw", f"refused a valid call: {text[:200]}"
    except ZeroDivisionError as error:  # the user's own callback raising: propagated unchanged is fine
        outcome = ("clear", "") if c.expect == "user" else ("raw", f"ZeroDivisionError: {error}")
    except Exception as error:  # noqa: BLE001 - the point is to catch everything else
        outcome = "raw", f"{type(error).__name__}: {str(error)[:200]}"
    else:
        if c.expect in ("error", "user"):
            outcome = "silent", "a result where an error was due"
        elif c.expect == "either":
            outcome = ("ok", "") if finite_ok(result) else ("silent", "a non-finite result")
        else:
            outcome = ("ok", "") if c.expect(result) else ("silent", "the result fails its check")
    for key, model in LIVE.items():
        for name, value in model.state_dict().items():
            if key in before and not torch.equal(value, before[key][name]):
                outcome = "silent", f"model {key[0]}'s {name} changed"
    OUTCOMES[c.id] = outcome
    return outcome


# ------------------------------------------------------------------ option cases from the signatures
def _kind_of(parameter: inspect.Parameter):
    annotation = str(parameter.annotation)
    default = parameter.default
    if isinstance(default, bool) or annotation.startswith("bool"):
        return "bool"
    if isinstance(default, int) or annotation.startswith("int"):
        return "int"
    if isinstance(default, float) or annotation.startswith("float"):
        return "float"
    if isinstance(default, str) and annotation.startswith("str"):
        return "str"
    return None


BAD_VALUES = {
    "bool": [("a string", "yes"), ("an int", 2)],
    "int": [("negative", -1), ("fractional", 1.5), ("a string", "3"), ("a bool", True)],
    "float": [("NaN", NAN), ("Inf", INF), ("a string", "1")],
    "str": [("a bad string", "nonsense"), ("an int", 3)],
}


def option_cases(family, name, public, build, use, *, skip=(), negative_ok=(), bool_int_ok=()):
    """Every keyword option of ``build`` with a default, given each bad value of its kind.

    ``public`` is the function whose signature lists the options; ``build(**bad)`` constructs; ``use(obj)`` calls what was built on good inputs (a config error
    reported only at call time still counts as clear, a result counts as silent).
    """
    signature = inspect.signature(public)
    for parameter in signature.parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY and parameter.default is inspect.Parameter.empty:
            continue
        if parameter.name in skip or parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        kind = _kind_of(parameter)
        if kind is None:
            continue
        for label, value in BAD_VALUES[kind]:
            if label == "negative" and parameter.name in negative_ok:
                continue
            if label == "a bool" and parameter.name in bool_int_ok:
                continue
            case(family, name, f"{parameter.name}={label}",
                 lambda p=parameter.name, v=value: use(build_with(build, p, v)), "error", parameter.name)


def build_with(build, option, value):
    return build(**{option: value})


# ========================================================================================= explainers
def explainer_use(kind="cnn"):
    def use(explain):
        _, _, params = env(kind)
        return vmapped(explain)(params, xs(kind), ys())
    return use


def f_of(kind="cnn"):
    return env(kind)[1]


STAB = fxattr.lrp.rules.stabiliser


# name (the public function), builder of f -> explain (the config to audit), model kind, flags
EXPLAINERS = {
    "beta_smooth": ("beta_smooth", lambda f: fxattr.beta_smooth(f, beta=5.0), "cnn"),
    "lrp excitation_backprop": ("lrp", lambda f: fxattr.lrp(f, composite="excitation_backprop"), "cnn"),
    "lrp stabiliser rule": ("lrp", lambda f: fxattr.lrp(f, rule=fxattr.lrp.rules.epsilon(STAB(1e-3, clip=True))), "cnn"),
    "lrp zero_params": ("lrp", lambda f: fxattr.lrp(f, composite="epsilon_gamma_box", low=-3.0, high=3.0,
                                                    zero_params="bias"), "cnn"),
    "lrp canonizer": ("lrp", lambda f: fxattr.lrp(f, composite="epsilon_plus", canonizers=[fxattr.lrp.merge_batch_norm()]),
                      "cnn_bn"),
    "deeplift softmax=rescale": ("deeplift", lambda f: fxattr.deeplift(f, softmax="rescale"), "cnn"),
    "deeplift custom": ("deeplift", lambda f: fxattr.deeplift(
        f, custom_attribution=lambda multipliers, x, baseline: tuple(m * (a - b) for m, a, b in zip(multipliers, x, baseline))
        if isinstance(multipliers, tuple) else multipliers * (x - baseline)), "cnn"),
    "deeplift delta": ("deeplift", lambda f: fxattr.deeplift(f, return_convergence_delta=True,
                                                             multiply_by_inputs=True), "cnn"),
    "deeplift_shap delta": ("deeplift_shap", lambda f: fxattr.deeplift_shap(
        f, baselines=torch.zeros(2, 3, 6, 6), return_convergence_delta=True), "cnn"),
    "gradient_shap": ("gradient_shap", lambda f: fxattr.gradient_shap(
        f, baselines=torch.zeros(2, 3, 6, 6), samples=2, multiply_by_inputs=False), "cnn"),
    "gradient_shap callable": ("gradient_shap", lambda f: fxattr.gradient_shap(
        f, baselines=lambda x: torch.zeros(2, *x.shape, dtype=x.dtype), samples=2,
        return_convergence_delta=True), "cnn"),
    "gradient postprocess": ("gradient", lambda f: fxattr.gradient(f, postprocess=lambda g: g.abs().amax(0)), "cnn"),
    "occlusion": ("occlusion", lambda f: fxattr.occlusion(f, window=(3, 3, 3), stride=(3, 3, 3)), "cnn"),
    "feature_ablation": ("feature_ablation", lambda f: fxattr.feature_ablation(
        f, feature_mask=torch.arange(36).reshape(1, 6, 6) // 12), "cnn"),
    "shapley_value_sampling": ("shapley_value_sampling", lambda f: fxattr.shapley_value_sampling(f, samples=2), "mlp"),
    "shapley_values": ("shapley_values", lambda f: fxattr.shapley_values(f), "mlp"),
    "kernel_shap": ("kernel_shap", lambda f: fxattr.kernel_shap(f, samples=8), "mlp"),
    "lime": ("lime", lambda f: fxattr.lime(f, samples=8, iterations=20), "mlp"),
    "guided_gradcam": ("guided_gradcam", lambda f: fxattr.guided_gradcam(f, layer="2"), "cnn"),
    "crp": ("crp", lambda f: fxattr.crp(f, layer="2", composite="epsilon_plus", concepts=[0, 2]), "cnn"),
}
L = fxattr.layers
LAYER_EXPLAINERS = {
    "internal_influence": lambda f: L.internal_influence(f, layer="2", steps=2),
    "layer_activation": lambda f: L.layer_activation(f, layer="2"),
    "layer_conductance": lambda f: L.layer_conductance(f, layer="2", steps=2),
    "layer_deeplift": lambda f: L.layer_deeplift(f, layer="2"),
    "layer_deeplift_shap": lambda f: L.layer_deeplift_shap(f, layer="2", baselines=torch.zeros(2, 3, 6, 6)),
    "layer_feature_ablation": lambda f: L.layer_feature_ablation(f, layer="2"),
    "layer_gradient_shap": lambda f: L.layer_gradient_shap(f, layer="2", baselines=torch.zeros(2, 3, 6, 6), samples=2),
    "layer_gradient_x_activation": lambda f: L.layer_gradient_x_activation(f, layer="2"),
    "layer_integrated_gradients": lambda f: L.layer_integrated_gradients(f, layer="2", steps=2),
    "layer_lrp": lambda f: L.layer_lrp(f, layer="2", composite="epsilon_plus"),
}
for _name, _build in LAYER_EXPLAINERS.items():
    EXPLAINERS[_name] = (f"layers.{_name}", _build, "cnn")
def _neuron_one(f):
    """neuron_conductance of neuron 1, called as explain(params, x, target) like the others."""
    explain = L.neuron_conductance(f, layer="2", steps=2)
    return lambda params, x, target: explain(params, x, target, 1)


EXPLAINERS["neuron_conductance"] = ("layers.neuron_conductance", _neuron_one, "cnn")
EXPLAINERS["neuron + integrated_gradients"] = (
    "integrated_gradients", lambda f: fxattr.integrated_gradients(L.neuron(f, layer="2"), steps=2), "cnn")

PERTURBATION = {"occlusion", "feature_ablation", "shapley_value_sampling", "shapley_values", "kernel_shap", "lime"}


@functools.cache
def built(label):
    _, build, kind = EXPLAINERS[label]
    explain = build(f_of(kind))
    prime(explain, env(kind)[2], kind)
    return explain


def _call_cases():
    for label, (name, _, kind) in EXPLAINERS.items():
        family = "layers" if name.startswith("layers.") or label.startswith("neuron") else (
            "perturbation" if label in PERTURBATION else "propagation" if name in (
                "lrp", "beta_smooth", "deeplift", "deeplift_shap", "crp") else "gradients/cams")

        def run(x, t, label=label, kind=kind, eager=False):
            explain = built(label)
            params = env(kind)[2]
            return explain(params, x, t) if eager else vmapped(explain)(params, x, t)

        def with_x(convert, label=label, kind=kind, eager=True, target=0):
            return lambda: run(convert(xs(kind)), torch.tensor(target) if eager else ys(), eager=eager)

        shape = SHAPES[kind]
        out_of_range = 4 if not label.startswith(("neuron", "layers")) else 4 * 36
        bad_target = anything if label == "layer_activation" else "error"  # captum's LayerActivation takes none
        case(family, name, f"{label}: good batch", lambda run=run, kind=kind: run(xs(kind), ys()), batch_ok())
        case(family, name, f"{label}: target out of range (vmap)",
             lambda run=run, kind=kind, t=out_of_range: run(xs(kind), torch.tensor([0, t, 1])), bad_target, "target")
        case(family, name, f"{label}: negative target (vmap)",
             lambda run=run, kind=kind: run(xs(kind), torch.tensor([0, -1, 1])), bad_target, "target")
        case(family, name, f"{label}: negative target (eager)",
             lambda run=run, kind=kind: run(xs(kind)[0], -2, eager=True), bad_target, "target")
        case(family, name, f"{label}: uint8 target",
             lambda run=run, kind=kind: run(xs(kind)[0], torch.tensor(1, dtype=torch.uint8), eager=True), bad_target, "target")
        case(family, name, f"{label}: float target",
             lambda run=run, kind=kind: run(xs(kind)[0], torch.tensor(1.0), eager=True), bad_target, "target")
        case(family, name, f"{label}: float targets (vmap)",
             lambda run=run, kind=kind: run(xs(kind), torch.tensor([0.0, 1.0, 2.0])), bad_target, "target")

        def nan_x(kind=kind, value=NAN):
            x = xs(kind)
            x.view(-1)[2] = value
            return x

        case(family, name, f"{label}: NaN in x (eager)", lambda run=run, nan_x=nan_x: run(nan_x()[0], 0, eager=True),
             "error", "x")
        case(family, name, f"{label}: Inf in x (eager)",
             lambda run=run, nan_x=nan_x: run(nan_x(value=INF)[0], 0, eager=True), "error", "x")
        case(family, name, f"{label}: NaN in x (vmap)", lambda run=run, nan_x=nan_x: run(nan_x(), ys()), nan_or_error, "x")
        case(family, name, f"{label}: integer x",
             lambda run=run, kind=kind: run(xs(kind)[0].round().long(), 0, eager=True),
             "either" if label in PERTURBATION else "error", "x")
        case(family, name, f"{label}: float64 x into a float32 model",
             lambda run=run, kind=kind: run(xs(kind)[0].double(), 0, eager=True), "error", "x")
        case(family, name, f"{label}: x missing an axis",
             lambda run=run, kind=kind, shape=shape: run(xs(kind)[0][0] if len(shape) == 3 else xs(kind)[0][:0], 0,
                                                        eager=True), "error", "x")
        case(family, name, f"{label}: a batch passed as one example",
             lambda run=run, kind=kind: run(xs(kind), 0, eager=True), "error", "x")
        case(family, name, f"{label}: tuple x into a one-input model",
             lambda run=run, kind=kind: run((xs(kind)[0], xs(kind)[0]), 0, eager=True), "error", "x")
        case(family, name, f"{label}: x a list", lambda run=run, kind=kind: run(xs(kind)[0].tolist(), 0, eager=True),
             "error", "x")
        case(family, name, f"{label}: empty batch",
             lambda run=run, kind=kind: run(xs(kind)[:0], torch.zeros(0, dtype=torch.long)), empty_ok)


_call_cases()


def _half_precision(build, kind, dtype):
    """The explainer on the model in ``dtype``, and in float32 on the same rounded weights and inputs."""
    _, f, params = env(kind, dtype)
    _, f32, params32 = env(kind)
    rounded = {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in params32.items()}
    x = xs(kind, dtype=dtype)
    torch.manual_seed(0)
    half = vmapped(build(f))(params, x, ys())
    torch.manual_seed(0)
    return half, vmapped(build(f32))(rounded, x.float(), ys())


def _rounded_once(dtype):
    """The half-precision policy: float32's result on the rounded weights, rounded once, bit for bit."""
    def check(pair):
        half, full = (leaves(r) for r in pair)
        return len(half) == len(full) and all(
            h.dtype == dtype and torch.equal(h, u.to(dtype)) for h, u in zip(half, full))
    return check


for _label, (_name, _build, _kind) in EXPLAINERS.items():
    for _dtype in (torch.float16, torch.bfloat16):
        case("half precision", _name, f"{_label}: {str(_dtype)[6:]} is float32's result rounded once",
             lambda b=_build, k=_kind, d=_dtype: _half_precision(b, k, d), _rounded_once(_dtype))


def _tuple_output_cases():
    builders = {label: (name, build) for label, (name, build, kind) in EXPLAINERS.items()
                if kind == "cnn" and label not in ("crp",)}
    for label, (name, build) in builders.items():
        def call(build=build, name=name):
            _, f, params = env("tuple_out")
            explain = build(f) if "layer=\"2\"" not in inspect.getsource(build) else None
            if explain is None:  # layer methods on the tuple model: its conv
                return None
            return vmapped(explain)(params, xs("tuple_out"), ys())
        if 'layer="2"' in inspect.getsource(build):
            continue
        case("tuple output", name, f"{label}: a model returning a tuple", call, "error", "output")


_tuple_output_cases()


# ============================================================================= hand-written option cases
def ex_use(name, kind="cnn"):
    return explainer_use(kind)


# beta_smooth
option_cases("propagation", "beta_smooth", fxattr.beta_smooth, lambda **kw: fxattr.beta_smooth(f_of(), **kw), explainer_use())
case("propagation", "beta_smooth", "beta=0", lambda: explainer_use()(fxattr.beta_smooth(f_of(), beta=0.0)), "error", "beta")
case("propagation", "beta_smooth", "beta=-1", lambda: explainer_use()(fxattr.beta_smooth(f_of(), beta=-1.0)), "error", "beta")
case("propagation", "beta_smooth", "f not a function", lambda: fxattr.beta_smooth("model"), "error", "f")

# lrp: composites, stabiliser, canonizers, zero_params
LRP_BAD = {
    "composite=nonsense": (lambda: fxattr.lrp(f_of(), composite="nonsense"), "composite"),
    "composite=3": (lambda: fxattr.lrp(f_of(), composite=3), "composite"),
    "rule=nonsense": (lambda: fxattr.lrp(f_of(), rule="nonsense"), "rule"),
    "rule and composite": (lambda: fxattr.lrp(f_of(), rule="epsilon", composite="epsilon_plus"), "rule"),
    "excitation_backprop epsilon=": (lambda: fxattr.lrp(f_of(), composite="excitation_backprop", epsilon=0.1), "epsilon"),
    "excitation_backprop stabiliser=NaN": (lambda: fxattr.lrp(f_of(), composite="excitation_backprop", stabiliser=NAN),
                                           "stabiliser"),
    "excitation_backprop stabiliser=-1": (lambda: fxattr.lrp(f_of(), composite="excitation_backprop", stabiliser=-1.0),
                                          "stabiliser"),
    "excitation_backprop stabiliser=string": (lambda: fxattr.lrp(f_of(), composite="excitation_backprop",
                                                                 stabiliser="big"), "stabiliser"),
    "excitation_backprop zero_params=weight": (lambda: fxattr.lrp(f_of(), composite="excitation_backprop",
                                                                  zero_params="weight"), "zero_params"),
    "epsilon_plus zero_params=3": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", zero_params=3), "zero_params"),
    "epsilon_gamma_box zero_params=[bias, weight]": (lambda: fxattr.lrp(
        f_of(), composite="epsilon_gamma_box", low=-3.0, high=3.0, zero_params=["bias", "weight"]), "zero_params"),
    "epsilon_plus gamma=NaN": (lambda: fxattr.lrp(f_of(), composite="epsilon_gamma_box", gamma=NAN, low=-1.0, high=1.0),
                               "gamma"),
    "epsilon_gamma_box low > high": (lambda: fxattr.lrp(f_of(), composite="epsilon_gamma_box", low=1.0, high=-1.0),
                                     "low"),
    "unknown option": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", epsilonn=0.1), "epsilonn"),
    "canonizers=string": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", canonizers="merge_batch_norm"),
                          "canonizers"),
    "canonizers=[3]": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", canonizers=[3]), "canonizers"),
    "canonizers=[function]": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", canonizers=[lambda gm: gm]),
                              "canonizers"),
    "canonizer graph returning None": (lambda: fxattr.lrp(
        f_of(), composite="epsilon_plus", canonizers=[fxattr.lrp.Canonizer("bad", graph=lambda gm: None)]), "bad"),
    "canonizer graph raising": (lambda: fxattr.lrp(
        f_of(), composite="epsilon_plus", canonizers=[fxattr.lrp.Canonizer("boom", graph=lambda gm: 1 / 0)]), "boom",
        "user"),
    "canonizer params returning a list": (lambda: explainer_use()(fxattr.lrp(
        f_of(), composite="epsilon_plus", canonizers=[fxattr.lrp.Canonizer("lst", params=lambda p, gm: [1])])), "lst"),
    "canonizer params dropping a weight": (lambda: explainer_use()(fxattr.lrp(
        f_of(), composite="epsilon_plus", canonizers=[fxattr.lrp.Canonizer(
            "drop", params=lambda p, gm: {k: v for k, v in p.items() if k != "0.weight"})])), "drop"),
    "canonizer params NaN weight": (lambda: explainer_use()(fxattr.lrp(
        f_of(), composite="epsilon_plus", canonizers=[fxattr.lrp.Canonizer(
            "nanw", params=lambda p, gm: {k: v * NAN if k == "0.weight" else v for k, v in p.items()})])), "nanw",
        nan_or_error),
    "canonizer params reshaping a weight": (lambda: explainer_use()(fxattr.lrp(
        f_of(), composite="epsilon_plus", canonizers=[fxattr.lrp.Canonizer(
            "shape", params=lambda p, gm: {k: v.flatten() if k == "0.weight" else v for k, v in p.items()})])), "shape"),
    "Canonizer graph=3": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", canonizers=[
        fxattr.lrp.Canonizer("c", graph=3)]), "graph"),
    "Canonizer params='x'": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", canonizers=[
        fxattr.lrp.Canonizer("c", params="x")]), "params"),
    "Canonizer without a transform": (lambda: fxattr.lrp(f_of(), composite="epsilon_plus", canonizers=[
        fxattr.lrp.Canonizer("c")]), None, batch_ok()),
    "replace_modules kind=3": (lambda: fxattr.lrp.replace_modules(3, lambda x: x), "kind"),
    "replace_modules fn=3": (lambda: fxattr.lrp.replace_modules(nn.ReLU, 3), "fn"),
}
def _built_and_used(build):
    built = build()
    return explainer_use()(built) if callable(built) else built


for _label, (_call, _argument, *_expect) in LRP_BAD.items():
    _where = ("lrp.replace_modules" if _label.startswith("replace_modules") else "lrp")
    case("propagation", _where, _label, (lambda c=_call, w=_where: _built_and_used(c) if w == "lrp" else c()),
         _expect[0] if _expect else "error", _argument)

# rules.stabiliser (and the rules taking it)
option_cases("propagation", "lrp.rules.stabiliser", STAB, lambda **kw: STAB(**kw), lambda s: explainer_use()(
    fxattr.lrp(f_of(), rule=fxattr.lrp.rules.epsilon(stabiliser=s))), skip=("epsilon",))
for _label, _call, _argument in [
    ("epsilon=NaN", lambda: STAB(NAN), "epsilon"),
    ("epsilon=Inf", lambda: STAB(INF), "epsilon"),
    ("epsilon=-1", lambda: STAB(-1.0), "epsilon"),
    ("epsilon=string", lambda: STAB("1e-6"), "epsilon"),
    ("dim=string", lambda: STAB(1e-6, norm_scale=True, dim="a"), "dim"),
    ("dim=1.5", lambda: STAB(1e-6, norm_scale=True, dim=1.5), "dim"),
    ("dim=[0, 0]", lambda: STAB(1e-6, norm_scale=True, dim=[0, 0]), "dim"),
    ("dim without norm_scale", lambda: STAB(1e-6, dim=0), "dim"),
]:
    case("propagation", "lrp.rules.stabiliser", _label, _call, "error", _argument)
case("propagation", "lrp", "stabiliser dim=5 on a 4-d activation", lambda: explainer_use()(
    fxattr.lrp(f_of(), rule=fxattr.lrp.rules.epsilon(STAB(1e-6, norm_scale=True, dim=5)))), "error", "dim")
case("propagation", "lrp.rules.stabiliser", "epsilon=0 (zennit allows it)", lambda: explainer_use()(
    fxattr.lrp(f_of(), rule=fxattr.lrp.rules.epsilon(STAB(0.0, clip=True)))), anything)
for _rule in ("gamma", "z_plus", "alpha_beta", "flat", "w_square", "norm"):
    case("propagation", f"lrp.rules.{_rule}", "stabiliser=NaN",
         lambda r=_rule: getattr(fxattr.lrp.rules, r)(stabiliser=NAN), "error", "stabiliser")
    case("propagation", f"lrp.rules.{_rule}", "stabiliser=string",
         lambda r=_rule: getattr(fxattr.lrp.rules, r)(stabiliser="x"), "error", "stabiliser")
case("propagation", "lrp.rules.gamma", "zero_params=weight", lambda: fxattr.lrp.rules.gamma(zero_params="weight"),
     "error", "zero_params")
case("propagation", "lrp.rules.gamma", "gamma=NaN", lambda: fxattr.lrp.rules.gamma(NAN), "error", "gamma")
case("propagation", "lrp.rules.gamma", "gamma=-1", lambda: fxattr.lrp.rules.gamma(-1.0), "error", "gamma")

# deeplift / deeplift_shap
option_cases("propagation", "deeplift", fxattr.deeplift, lambda **kw: fxattr.deeplift(f_of(), **kw), explainer_use())
option_cases("propagation", "deeplift_shap", fxattr.deeplift_shap, lambda **kw: fxattr.deeplift_shap(
    f_of(), **{"baselines": torch.zeros(2, 3, 6, 6), **kw}), explainer_use(), skip=("baselines",))
for _label, _call, _argument in [
    ("custom_attribution=3", lambda: fxattr.deeplift(f_of(), custom_attribution=3), "custom_attribution"),
    ("custom_attribution with multiply_by_inputs=False", lambda: explainer_use()(fxattr.deeplift(
        f_of(), custom_attribution=lambda m, x, b: m, multiply_by_inputs=False)), "custom_attribution"),
    ("custom_attribution returning the wrong shape", lambda: explainer_use()(fxattr.deeplift(
        f_of(), custom_attribution=lambda m, x, b: m.sum())), "custom_attribution"),
    ("custom_attribution returning a string", lambda: explainer_use()(fxattr.deeplift(
        f_of(), custom_attribution=lambda m, x, b: "no")), "custom_attribution"),
    ("custom_attribution raising", lambda: explainer_use()(fxattr.deeplift(
        f_of(), custom_attribution=lambda m, x, b: 1 / 0)), "custom_attribution"),
    ("baseline of the wrong shape", lambda: explainer_use()(fxattr.deeplift(f_of(), baseline=torch.zeros(3, 5, 5))),
     "baseline"),
    ("baseline integer tensor", lambda: explainer_use()(fxattr.deeplift(f_of(), baseline=torch.zeros(3, 6, 6,
                                                                                                      dtype=torch.long))),
     "baseline"),
    ("eps=-1", lambda: fxattr.deeplift(f_of(), eps=-1.0), "eps"),
    ("rule=nonsense", lambda: fxattr.deeplift(f_of(), rule="nonsense"), "rule"),
    ("softmax=nonsense", lambda: fxattr.deeplift(f_of(), softmax="nonsense"), "softmax"),
]:
    case("propagation", "deeplift", _label, lambda c=_call: c(), {
        "custom_attribution raising": "user", "baseline integer tensor": "either",
        "custom_attribution with multiply_by_inputs=False": "either"}.get(_label, "error"), _argument)
for _label, _call, _argument in [
    ("baselines of the wrong shape", lambda: explainer_use()(fxattr.deeplift_shap(f_of(), baselines=torch.zeros(2, 3, 5, 5))),
     "baselines"),
    ("baselines without a sample axis", lambda: explainer_use()(fxattr.deeplift_shap(f_of(), baselines=torch.zeros(3, 6, 6))),
     "baselines"),
    ("no baselines (0 rows)", lambda: explainer_use()(fxattr.deeplift_shap(f_of(), baselines=torch.zeros(0, 3, 6, 6))),
     "baselines"),
    ("baselines a float", lambda: explainer_use()(fxattr.deeplift_shap(f_of(), baselines=0.0)), "baselines"),
    ("baselines Inf", lambda: fxattr.deeplift_shap(f_of(), baselines=torch.full((2, 3, 6, 6), INF)), "baselines"),
    ("chunk_size=0", lambda: fxattr.deeplift_shap(f_of(), baselines=torch.zeros(2, 3, 6, 6), chunk_size=0), "chunk_size"),
    ("custom_attribution=3", lambda: fxattr.deeplift_shap(f_of(), baselines=torch.zeros(2, 3, 6, 6), custom_attribution=3),
     "custom_attribution"),
]:
    case("propagation", "deeplift_shap", _label, lambda c=_call: c(), "error", _argument)

# gradient_shap / expected_gradients, gradient(postprocess=)
for _name in ("gradient_shap", "expected_gradients"):
    _fn = getattr(fxattr, _name)
    option_cases("gradients/cams", _name, _fn, lambda fn=_fn, **kw: fn(f_of(), **{"baselines": torch.zeros(2, 3, 6, 6),
                                                                            "samples": 2, **kw}),
                 explainer_use(), skip=("baselines", "fn"))
    for _label, _baselines, in [
        ("callable baselines of the wrong shape", lambda x: torch.zeros(2, 3, 5, 5)),
        ("callable baselines returning NaN", lambda x: torch.full((2, *x.shape), NAN)),
        ("callable baselines returning a list", lambda x: [0.0]),
        ("callable baselines returning integers", lambda x: torch.zeros(2, *x.shape, dtype=torch.long)),
        ("callable baselines raising", lambda x: 1 / 0),
    ]:
        case("gradients/cams", _name, _label, lambda fn=_fn, b=_baselines: explainer_use()(fn(f_of(), baselines=b, samples=2)),
             "user" if "raising" in _label else "error", "baselines")
    case("gradients/cams", _name, "baselines of the wrong shape", lambda fn=_fn: explainer_use()(
        fn(f_of(), baselines=torch.zeros(2, 3, 5, 5), samples=2)), "error", "baselines")
    case("gradients/cams", _name, "samples=0", lambda fn=_fn: fn(f_of(), baselines=torch.zeros(2, 3, 6, 6), samples=0),
         "error", "samples")
option_cases("gradients/cams", "gradient", fxattr.gradient, lambda **kw: fxattr.gradient(f_of(), **kw), explainer_use())
for _label, _post in [("postprocess=nonsense", "nonsense"), ("postprocess=3", 3),
                      ("postprocess returning a string", lambda g: "no"),
                      ("postprocess raising", lambda g: 1 / 0)]:
    case("gradients/cams", "gradient", _label, lambda p=_post: explainer_use()(fxattr.gradient(f_of(), postprocess=p)),
         "user" if "raising" in _label else "error", "postprocess")

# perturbation family
option_cases("perturbation", "occlusion", fxattr.occlusion, lambda **kw: fxattr.occlusion(f_of(), **{"window": 3, **kw}), explainer_use())
option_cases("perturbation", "feature_ablation", fxattr.feature_ablation, lambda **kw: fxattr.feature_ablation(f_of("mlp"), **kw),
             explainer_use("mlp"))
for _name in ("shapley_value_sampling", "shapley_values", "kernel_shap", "lime"):
    _fn = getattr(fxattr, _name)
    option_cases("perturbation", _name, _fn, lambda fn=_fn, **kw: fn(f_of("mlp"), **kw), explainer_use("mlp"),
                 skip=("fn",))


def _perturb(name, kind="mlp", x=None, t=None, eager=False, **config):
    explain = getattr(fxattr, name)(f_of(kind if kind != "two_inputs" else "two_inputs"), **config)
    params = env(kind)[2]
    if eager:
        return explain(params, x, t)
    return vmapped(explain)(params, xs(kind) if x is None else x, ys() if t is None else t)


MASK6 = torch.tensor([0, 0, 1, 1, 2, 2])


def _per_example_masks(name, masks, **config):
    explain = getattr(fxattr, name)(f_of("mlp"), num_features=3, **config)
    return torch.vmap(lambda p, x, t, mask: explain(p, x, t, feature_mask=mask), randomness="same",
                      in_dims=(None, 0, 0, 0))(env("mlp")[2], xs("mlp"), ys(), masks)
for _name in ("feature_ablation", "shapley_value_sampling", "shapley_values", "kernel_shap", "lime"):
    _extra = {"samples": 4} if _name in ("shapley_value_sampling", "kernel_shap", "lime") else {}
    _bad = [
        ("feature_mask float", {"feature_mask": MASK6.float()}, "feature_mask"),
        ("feature_mask of the wrong shape", {"feature_mask": torch.zeros(5, dtype=torch.long)}, "feature_mask"),
        ("feature_mask negative ids (any ids at construction)", {"feature_mask": MASK6 - 1}, "feature_mask"),
        ("feature_mask bool", {"feature_mask": MASK6.bool()}, "feature_mask"),
        ("feature_mask a tuple for a tensor x", {"feature_mask": (MASK6,)}, "feature_mask"),
        ("feature_mask a list", {"feature_mask": [0, 0, 1, 1, 2, 2]}, "feature_mask"),
        ("baseline NaN", {"baseline": NAN}, "baseline"),
        ("baseline of the wrong shape", {"baseline": torch.zeros(5)}, "baseline"),
        ("num_features=0", {"num_features": 0}, "num_features"),
        ("chunk_size=0", {"chunk_size": 0}, "chunk_size"),
        ("show_progress=3", {"show_progress": 3}, "show_progress"),
    ]
    for _label, _config, _argument in _bad:
        case("perturbation", _name, _label, lambda n=_name, c=_config, e=_extra: _perturb(n, **e, **c),
             batch_ok() if "any ids" in _label else "either" if "a tuple for a tensor" in _label else "error",
             _argument)
    for _label, _masks, _expect in [
            ("masks per example (vmap)", torch.stack([MASK6, MASK6.flip(0), MASK6 // 2]), batch_ok()),
            ("masks per example with a negative id", torch.stack([MASK6, MASK6 - 1, MASK6]), "error"),
            ("masks per example, ids beyond num_features", torch.stack([MASK6, MASK6 + 1, MASK6]), "error"),
            ("masks per example, float", torch.stack([MASK6] * 3).float(), "error"),
            ("masks per example of the wrong shape", torch.zeros(3, 5, dtype=torch.long), "error")]:
        case("perturbation", _name, _label, lambda n=_name, e=_extra, m=_masks: _per_example_masks(n, m, **e),
             _expect, "feature_mask")
    case("perturbation", _name, "tuple x, good", lambda n=_name, e=_extra: _perturb(
        n, "two_inputs", feature_mask=(torch.zeros(1, 6, 6, dtype=torch.long), torch.tensor([1, 2])), **e), batch_ok())
    case("perturbation", _name, "tuple x, mask a tensor", lambda n=_name, e=_extra: _perturb(
        n, "two_inputs", feature_mask=torch.zeros(1, 6, 6, dtype=torch.long), **e), "error", "feature_mask")
    case("perturbation", _name, "tuple x, masks of the wrong count", lambda n=_name, e=_extra: _perturb(
        n, "two_inputs", feature_mask=(torch.zeros(1, 6, 6, dtype=torch.long),), **e), "error", "feature_mask")
    case("perturbation", _name, "tuple x, one member missing", lambda n=_name, e=_extra: _perturb(
        n, "two_inputs", x=(xs("two_inputs")[0],), **e), "error", "x")
    case("perturbation", _name, "tuple x, baseline a tensor", lambda n=_name, e=_extra: _perturb(
        n, "two_inputs", baseline=torch.zeros(3, 6, 6), **e), "error", "baseline")
    case("perturbation", _name, "tuple x, members of different batch sizes", lambda n=_name, e=_extra: _perturb(
        n, "two_inputs", x=(xs("two_inputs")[0][0], xs("two_inputs")[1][:2]), t=0, eager=True, **e), "error", "x")
    case("perturbation", _name, "bool x into a float model", lambda n=_name, e=_extra: _perturb(
        n, x=xs("mlp")[0] > 0, t=0, eager=True, **e), "either", "x")
for _label, _call, _argument in [
    ("permutations of the wrong length", lambda: _perturb("shapley_value_sampling", permutations=torch.zeros(2, 5, dtype=torch.long)),
     "permutations"),
    ("permutations not permutations", lambda: _perturb("shapley_value_sampling", permutations=torch.zeros(2, 6, dtype=torch.long)),
     "permutations"),
    ("permutations float", lambda: _perturb("shapley_value_sampling", permutations=torch.arange(6.0).expand(2, 6)),
     "permutations"),
]:
    case("perturbation", "shapley_value_sampling", _label, _call, "error", _argument)
for _name in ("kernel_shap", "lime"):
    for _label, _coalitions in [("coalitions of the wrong width", torch.ones(4, 5)),
                                ("coalitions with a 2", torch.full((4, 6), 2.0)),
                                ("coalitions NaN", torch.full((4, 6), NAN)),
                                ("coalitions 1-d", torch.ones(6))]:
        case("perturbation", _name, _label, lambda n=_name, c=_coalitions: _perturb(n, coalitions=c), "error",
             "coalitions")
for _label, _config, _argument in [("distance=nonsense", {"distance": "nonsense"}, "distance"),
                                   ("regression=nonsense", {"regression": "nonsense"}, "regression"),
                                   ("kernel_width=0", {"kernel_width": 0.0}, "kernel_width"),
                                   ("kernel_width=-1", {"kernel_width": -1.0}, "kernel_width"),
                                   ("alpha=-1", {"alpha": -1.0}, "alpha"),
                                   ("iterations=0", {"iterations": 0}, "iterations"),
                                   ("samples=0", {"samples": 0}, "samples")]:
    case("perturbation", "lime", _label, lambda c=_config: _perturb("lime", **c), "error", _argument)
for _label, _config, _argument in [
    ("window=0", {"window": 0}, "window"),
    ("window larger than x", {"window": (3, 7, 7)}, "window"),
    ("window of the wrong rank", {"window": (3, 3)}, "window"),
    ("window NaN", {"window": NAN}, "window"),
    ("stride=0", {"window": 3, "stride": 0}, "stride"),
    ("stride negative", {"window": 3, "stride": -1}, "stride"),
    ("baseline of the wrong shape", {"window": 3, "baseline": torch.zeros(3, 5, 5)}, "baseline"),
    ("incremental=maybe", {"window": 3, "incremental": "maybe"}, "incremental"),
]:
    case("perturbation", "occlusion", _label, lambda c=_config: _perturb("occlusion", "cnn", **c), "error", _argument)
case("perturbation", "occlusion", "tuple x, good", lambda: _perturb("occlusion", "two_inputs", window=((3, 3, 3), (1,))),
     batch_ok())
case("perturbation", "occlusion", "tuple x, one window for two inputs",
     lambda: _perturb("occlusion", "two_inputs", window=(3, 3, 3)), "error", "window")
case("perturbation", "occlusion", "tuple x, windows of the wrong count",
     lambda: _perturb("occlusion", "two_inputs", window=((3, 3, 3),)), "error", "window")
case("perturbation", "occlusion", "integer x into an integer-valued model", lambda: _perturb(
    "occlusion", "mlp", x=xs("mlp")[0].round().long(), t=0, eager=True, window=2), "either", "x")

# guided_gradcam
option_cases("gradients/cams", "guided_gradcam", fxattr.guided_gradcam, lambda **kw: fxattr.guided_gradcam(f_of(), **{"layer": "2", **kw}),
             explainer_use(), skip=("layer",))
for _label, _call, _argument in [
    ("layer=nonsense", lambda: fxattr.guided_gradcam(f_of(), layer="nonsense"), "layer"),
    ("layer=3 (int)", lambda: fxattr.guided_gradcam(f_of(), layer=3), "layer"),
    ("layer on an MLP's Linear", lambda: explainer_use("mlp")(fxattr.guided_gradcam(f_of("mlp"), layer="0")), "layer"),
    ("tuple x (an image and a vector)", lambda: vmapped(fxattr.guided_gradcam(f_of("two_inputs"), layer="conv2"))(
        env("two_inputs")[2], xs("two_inputs"), ys()), None),
    ("tuple x, one member missing", lambda: fxattr.guided_gradcam(f_of("two_inputs"), layer="conv2")(
        env("two_inputs")[2], (xs("two_inputs")[0][0],), 0), "x"),
    ("tuple x, a member of the wrong rank", lambda: fxattr.guided_gradcam(f_of("two_inputs"), layer="conv2")(
        env("two_inputs")[2], (xs("two_inputs")[0][0, 0], xs("two_inputs")[1][0]), 0), "x"),
]:
    case("gradients/cams", "guided_gradcam", _label, _call, "either" if _label.startswith("tuple x (") else "error",
         _argument)

# layers
for _name, _build in LAYER_EXPLAINERS.items():
    _fn = getattr(L, _name)
    _base = {"layer": "2"}
    if "baselines" in inspect.signature(_fn).parameters:
        _base["baselines"] = torch.zeros(2, 3, 6, 6)
    option_cases("layers", f"layers.{_name}", _fn, lambda fn=_fn, base=_base, **kw: fn(f_of(), **{**base, **kw}),
                 explainer_use(), skip=("fn", "base", "layer", "baselines"))
    case("layers", f"layers.{_name}", "layer=nonsense", lambda fn=_fn, base=_base: fn(f_of(), **{**base, "layer": "nonsense"}),
         "error", "layer")
    case("layers", f"layers.{_name}", "layer=[] (empty list)", lambda fn=_fn, base=_base: explainer_use()(
        fn(f_of(), **{**base, "layer": []})), "error", "layer")
    case("layers", f"layers.{_name}", "layer a module of another model",
         lambda fn=_fn, base=_base: fn(f_of(), **{**base, "layer": nn.Linear(2, 2)}), "error", "layer")
    case("layers", f"layers.{_name}", "layer=3 (int)", lambda fn=_fn, base=_base: fn(f_of(), **{**base, "layer": 3}),
         "error", "layer")
option_cases("layers", "layers.neuron_conductance", L.neuron_conductance, lambda **kw: L.neuron_conductance(
    f_of(), **{"layer": "2", **kw}), lambda explain: torch.vmap(explain, in_dims=(None, 0, 0, None))(
    env()[2], xs(), ys(), 1), skip=("layer",))
case("layers", "layers.neuron_conductance", "neuron out of range (vmap)", lambda: torch.vmap(
    L.neuron_conductance(f_of(), layer="2", steps=2), in_dims=(None, 0, 0, 0))(env()[2], xs(), ys(), torch.tensor(
        [0, 144, 1])), "error", "neuron")
case("layers", "layers.neuron_conductance", "neuron negative (eager)", lambda: L.neuron_conductance(
    f_of(), layer="2", steps=2)(env()[2], xs()[0], 0, -1), "error", "neuron")
case("layers", "layers.neuron_conductance", "neuron float (eager)", lambda: L.neuron_conductance(
    f_of(), layer="2", steps=2)(env()[2], xs()[0], 0, torch.tensor(1.0)), "error", "neuron")
case("layers", "layers.layer_feature_ablation", "layer_mask of the wrong shape", lambda: explainer_use()(
    L.layer_feature_ablation(f_of(), layer="2", layer_mask=torch.zeros(3, 3, dtype=torch.long))), "error", "layer_mask")
case("layers", "layers.layer_feature_ablation", "layer_mask float", lambda: explainer_use()(
    L.layer_feature_ablation(f_of(), layer="2", layer_mask=torch.zeros(1, 6, 6))), "error", "layer_mask")
case("layers", "layers.layer_feature_ablation", "layer_mask negative (any ids)", lambda: explainer_use()(
    L.layer_feature_ablation(f_of(), layer="2", layer_mask=-torch.ones(1, 6, 6, dtype=torch.long))), batch_ok())
case("layers", "layers.layer_integrated_gradients", "method=nonsense", lambda: L.layer_integrated_gradients(
    f_of(), layer="2", method="nonsense"), "error", "method")
case("layers", "layers.layer_integrated_gradients", "baseline of the wrong shape", lambda: explainer_use()(
    L.layer_integrated_gradients(f_of(), layer="2", baseline=torch.zeros(3, 5, 5))), "error", "baseline")
case("layers", "layers.layer_deeplift_shap", "baselines of the wrong shape", lambda: explainer_use()(
    L.layer_deeplift_shap(f_of(), layer="2", baselines=torch.zeros(2, 3, 5, 5))), "error", "baselines")
case("layers", "layers.neuron", "layer=nonsense", lambda: L.neuron(f_of(), layer="nonsense"), "error", "layer")
case("layers", "layers.neuron", "attribute_to_layer_input=yes", lambda: L.neuron(f_of(), layer="2",
                                                                               attribute_to_layer_input="yes"),
     "error", "attribute_to_layer_input")
case("layers", "layers.flat_index", "index out of range", lambda: L.flat_index((4, 6, 6), (4, 0, 0)), "error", "index")
case("layers", "layers.flat_index", "index of the wrong length", lambda: L.flat_index((4, 6, 6), (1, 2)), "error", "index")
case("layers", "layers.flat_index", "negative index (Python's convention)",
     lambda: torch.tensor(L.flat_index((4, 6, 6), (-1, 0, 0))), lambda r: int(r) == 3 * 36)
case("layers", "layers.flat_index", "good", lambda: torch.tensor(L.flat_index((4, 6, 6), (1, 2, 3))),
     lambda r: int(r) == 36 + 15)

# crp / crp_reference_samples
option_cases("propagation", "crp", fxattr.crp, lambda **kw: fxattr.crp(f_of(), **{"layer": "2", "composite": "epsilon_plus", **kw}),
             explainer_use(), skip=("layer",))
for _label, _config, _argument in [
    ("layer=nonsense", {"layer": "nonsense"}, "layer"),
    ("concepts out of range", {"concepts": [0, 9]}, "concepts"),
    ("negative concepts", {"concepts": [-1]}, "concepts"),
    ("concepts a string", {"concepts": "ab"}, "concepts"),
    ("concepts float", {"concepts": torch.tensor([0.5])}, "concepts"),
    ("no concepts", {"concepts": []}, "concepts"),
    ("composite=nonsense", {"composite": "nonsense"}, "composite"),
    ("chunk_size=0", {"chunk_size": 0}, "chunk_size"),
]:
    case("propagation", "crp", _label, lambda c=_config: explainer_use()(
        fxattr.crp(f_of(), **{"layer": "2", "composite": "epsilon_plus", **c})), "error", _argument)


def _collect(batches=None, **config):
    collect = fxattr.crp_reference_samples(f_of(), **{"layer": "2", "composite": "epsilon_plus", "k": 2, **config})
    return collect(env()[2], [(xs(), ys())] if batches is None else batches)


option_cases("propagation", "crp_reference_samples", fxattr.crp_reference_samples, lambda **kw: fxattr.crp_reference_samples(
    f_of(), **{"layer": "2", "composite": "epsilon_plus", **kw}), lambda c: c(env()[2], [(xs(), ys())]),
    skip=("layer",))
for _label, _call, _expect, _argument in [
    ("good", lambda: _collect(), lambda r: r.indices.shape == (4, 2) and bool(torch.isfinite(r.values).all()), None),
    ("k larger than the data", lambda: _collect(k=5), lambda r: r.indices.shape[0] == 4, None),
    ("no batches", lambda: _collect(batches=[]), "error", "batch"),
    ("an empty batch among others", lambda: _collect(batches=[(xs()[:0], ys()[:0]), (xs(), ys())]),
     lambda r: r.indices.shape == (4, 2), None),
    ("only an empty batch", lambda: _collect(batches=[(xs()[:0], ys()[:0])]), "error", "batch"),
    ("batch of NaN x", lambda: _collect(batches=[(torch.full((3, 3, 6, 6), NAN), ys())]), "error", "x"),
    ("targets out of range", lambda: _collect(batches=[(xs(), torch.tensor([0, 9, 1]))]), "error", "target"),
    ("targets float", lambda: _collect(batches=[(xs(), torch.tensor([0.0, 1.0, 1.0]))]), "error", "target"),
    ("x of the wrong rank", lambda: _collect(batches=[(xs()[:, 0], ys())]), "error", "x"),
    ("x and targets of different lengths", lambda: _collect(batches=[(xs(), ys(2))]), "error", "targets"),
    ("a batch not a pair (relevance mode)", lambda: _collect(batches=[xs()]), "error", "batch"),
    ("mode=nonsense", lambda: _collect(mode="nonsense"), "error", "mode"),
    ("statistic=nonsense", lambda: _collect(statistic="nonsense"), "error", "statistic"),
    ("k=0", lambda: _collect(k=0), "error", "k"),
]:
    case("propagation", "crp_reference_samples", _label, _call, _expect, _argument)


# ============================================================================================ text
@functools.cache
def text_env():
    from tests.text.models import tiny

    model = tiny("bert")
    LIVE[("bert", torch.float32)] = model
    f, params = fxattr.text.functionalize(model)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (N, 5), generator=generator)
    mask = torch.ones(N, 5, dtype=torch.long)
    return f, params, ids, mask


def _text(method=None, ids=None, mask=None, target=None, eager=False, **config):
    f, params, good_ids, good_mask = text_env()
    explain = fxattr.text.attribute(method or fxattr.integrated_gradients, f, **({"steps": 2} if method is None else {}),
                                    **config)
    ids = good_ids if ids is None else ids
    mask = good_mask if mask is None else mask
    target = fxattr.text.class_logit(ys() % 3) if target is None else target
    if eager:
        return explain(params, ids, mask, target)
    return torch.vmap(explain, in_dims=(None, 0, 0, 0), randomness="same")(params, ids, mask, target)


for _label, _call, _expect, _argument in [
    ("good", lambda: _text(), batch_ok(), None),
    ("good, deeplift", lambda: _text(fxattr.deeplift), batch_ok(), None),
    ("good, lrp attnlrp", lambda: _text(fxattr.lrp, composite="attnlrp"), batch_ok(), None),
    ("method not callable", lambda: _text("integrated_gradients"), "error", "method"),
    ("f a plain function", lambda: fxattr.text.attribute(fxattr.gradient, env()[1]), "error", "f"),
    ("reduce=nonsense", lambda: _text(reduce="nonsense"), "error", "reduce"),
    ("bad method option", lambda: _text(fxattr.integrated_gradients, steps=0), "error", "steps"),
    ("float ids", lambda: _text(ids=text_env()[2].float()), "error", "input_ids"),
    ("ids out of the vocabulary", lambda: _text(ids=text_env()[2] + 100), "error", "input_ids"),
    ("negative ids", lambda: _text(ids=-text_env()[2]), "error", "input_ids"),
    ("ids of rank 2 per example", lambda: _text(ids=text_env()[2][:, None]), "error", "input_ids"),
    ("mask of the wrong length", lambda: _text(mask=text_env()[3][:, :4]), "error", "attention_mask"),
    ("mask float", lambda: _text(mask=text_env()[3].float() * 0.5), "error", "attention_mask"),
    ("mask all zeros", lambda: _text(mask=torch.zeros(N, 5, dtype=torch.long)), "either", "attention_mask"),
    ("class_logit out of range (vmap)", lambda: _text(target=fxattr.text.class_logit(torch.tensor([0, 7, 1]))),
     "error", "target"),
    ("class_logit negative (vmap)", lambda: _text(target=fxattr.text.class_logit(torch.tensor([0, -1, 1]))),
     "error", "target"),
    ("plain int target out of range (eager)", lambda: _text(ids=text_env()[2][0], mask=text_env()[3][0], target=7,
                                                           eager=True), "error", "target"),
    ("class_logit float", lambda: _text(target=fxattr.text.class_logit(torch.tensor([0.0, 1.0, 1.0]))),
     "error", "index"),
    ("next_token on a classifier", lambda: _text(target=fxattr.text.next_token(torch.tensor([1, 2, 3]))),
     "error", "target"),
    ("empty batch", lambda: _text(ids=text_env()[2][:0], mask=text_env()[3][:0],
                                  target=fxattr.text.class_logit(torch.zeros(0, dtype=torch.long))), empty_ok, None),
    ("empty sequence (eager)", lambda: _text(ids=text_env()[2][0, :0], mask=text_env()[3][0, :0], target=0, eager=True),
     "error", "input_ids"),
]:
    case("text", "text.class_logit" if _label == "class_logit float" else "text.attribute", _label, _call, _expect,
         _argument)
for _label, _call, _argument in [
    ("functionalize a plain CNN", lambda: fxattr.text.functionalize(env()[0]), "model"),
    ("functionalize attention=nonsense", lambda: fxattr.text.functionalize(text_env.__wrapped__ and __import__(
        "tests.text.models", fromlist=["tiny"]).tiny("bert"), attention="nonsense"), "attention"),
    ("class_logit of a string", lambda: fxattr.text.class_logit("a"), "index"),
]:
    case("text", "text." + _label.split()[0], _label, _call, "error", _argument)


# ============================================================================================ metrics
M = fxattr.metrics
METRIC_BASE = {
    "faithfulness_correlation": {"nr_runs": 3, "subset_size": 4},
    "faithfulness_estimate": {"features_in_step": 12},
    "infidelity": {"perturb_patch_sizes": (2,), "n_perturb_samples": 2},
    "irof": {"max_segments": 4},
    "monotonicity": {"features_in_step": 12},
    "monotonicity_correlation": {"nr_samples": 2, "features_in_step": 12},
    "pixel_flipping": {"features_in_step": 12},
    "region_perturbation": {"patch_size": 2, "regions_evaluation": 3},
    "road": {"percentages": (10, 50)},
    "selectivity": {"patch_size": 2},
    "sensitivity_n": {"features_in_step": 4},
    "sufficiency": {},
    "avg_sensitivity": {"nr_samples": 2},
    "consistency": {},
    "continuity": {"nr_steps": 2},
    "local_lipschitz_estimate": {"nr_samples": 2},
    "max_sensitivity": {"nr_samples": 2},
    "relative_input_stability": {"nr_samples": 2},
    "relative_output_stability": {"nr_samples": 2},
    "relative_representation_stability": {"nr_samples": 2, "representation": "2"},
    "attribution_localisation": {},
    "auc": {},
    "focus": {},
    "pointing_game": {},
    "relevance_mass_accuracy": {},
    "relevance_rank_accuracy": {},
    "top_k_intersection": {"k": 5},
    "complexity": {},
    "effective_complexity": {},
    "sparseness": {},
    "efficient_mprt": {},
    "mprt": {},
    "random_logit": {"num_classes": 4},
    "smooth_mprt": {"nr_samples": 2},
    "completeness": {},
    "input_invariance": {},
    "non_sensitivity": {"features_in_step": 12},
}
MASKED = {"attribution_localisation", "auc", "pointing_game", "relevance_mass_accuracy",
          "relevance_rank_accuracy", "top_k_intersection"}
BATCHED = {"sufficiency", "consistency", "sensitivity_n"}  # metrics of a whole batch, not vmapped
NO_X = {"focus", "complexity", "effective_complexity", "sparseness"}  # x is not read (any attribution shape)
NO_TARGET = MASKED | NO_X | {"sufficiency", "consistency"}  # the target is not read (predicted classes)
METRIC_KIND = {"input_invariance": "mlp"}  # its first layer must have no padding
NEEDS_EXPLAIN = {name for name in METRIC_BASE if "explain" in inspect.signature(getattr(M, name)).parameters}
# metrics whose result may be NaN on valid input (documented: constant curves, empty masks, ...)
NAN_OK = {"complexity", "road", "consistency", "monotonicity_correlation", "random_logit", "sufficiency", "focus",
          "relative_input_stability", "relative_output_stability", "relative_representation_stability",
          "mprt", "smooth_mprt", "efficient_mprt", "continuity", "faithfulness_correlation", "sensitivity_n"}


@functools.cache
def metric_data(kind="cnn"):
    _, f, params = env(kind)
    x = xs(kind).abs() / 3
    a = vmapped(fxattr.gradient(f))(params, x, ys())
    masks = torch.zeros(N, 1, 6, 6, dtype=torch.bool)
    masks[:, :, :3, :3] = True
    return x, a, masks


def metric_extra(name, masks=None):
    if name in MASKED:
        return [metric_data()[2] if masks is None else masks]
    if name == "irof":
        return [torch.arange(36).reshape(6, 6).div(9, rounding_mode="floor").expand(N, 6, 6)]
    if name == "focus":
        return [torch.tensor([True, False, False, False]).expand(N, 4) if masks is None else masks]
    return []


def metric_build(name, **kw):
    config = {**METRIC_BASE[name], **kw}
    if name in NEEDS_EXPLAIN and "explain" not in kw:
        config["explain"] = fxattr.gradient(f_of(METRIC_KIND.get(name, "cnn")))
    return getattr(M, name)(f_of(METRIC_KIND.get(name, "cnn")), **config)


def metric_use(name, x=None, a=None, masks=None, t=None):
    kind = METRIC_KIND.get(name, "cnn")

    def use(metric):
        gx, ga, _ = metric_data(kind)
        ga = ga.sum(1, keepdim=True) if name == "road" else ga
        args = [env(kind)[2], gx if x is None else x, ys() if t is None else t, ga if a is None else a,
                *metric_extra(name, masks)]
        if name in BATCHED:
            return metric(*args)
        return torch.vmap(metric, in_dims=(None, *([0] * (len(args) - 1))), randomness="different")(*args)
    return use


def metric_eager(name, a):
    kind = METRIC_KIND.get(name, "cnn")
    metric = metric_build(name)
    args = [env(kind)[2], metric_data(kind)[0][:1], ys(1), a[None]] if name in BATCHED else [
        env(kind)[2], metric_data(kind)[0][0], 0, a, *[e[0] for e in metric_extra(name)]]
    return metric(*args)


def metric_ok(name, n=N):
    def check(result):
        tensors = leaves(result)
        return bool(tensors) and all(t.shape[:1] == (n,) for t in tensors if t.dim() > 0 and name not in BATCHED) and (
            name in NAN_OK or all(bool(torch.isfinite(t).all()) for t in tensors))
    return check


ATTRIBUTION = ("attribution", "A")  # the batch metrics' signature calls it A
for _name in METRIC_BASE:
    _kind = METRIC_KIND.get(_name, "cnn")
    option_cases("metrics", f"metrics.{_name}", getattr(M, _name), lambda name=_name, **kw: metric_build(name, **kw),
                 metric_use(_name), skip=("name", "seed", "perturb_baseline", "input_shift"))
    case("metrics", f"metrics.{_name}", "good", lambda n=_name: metric_use(n)(metric_build(n)), metric_ok(_name))
    case("metrics", f"metrics.{_name}", "attribution of the wrong shape", lambda n=_name, k=_kind: metric_use(
        n, a=metric_data(k)[1][..., :-1])(metric_build(n)), anything if _name in NO_X else "error", ATTRIBUTION)
    case("metrics", f"metrics.{_name}", "NaN attribution (eager)", lambda n=_name, k=_kind: metric_eager(
        n, torch.full_like(metric_data(k)[1][0], NAN) if n != "road" else torch.full((1, 6, 6), NAN)),
         nan_or_error, ATTRIBUTION)
    case("metrics", f"metrics.{_name}", "target out of range (vmap)", lambda n=_name: metric_use(
        n, t=torch.tensor([0, 9, 1]))(metric_build(n)), anything if _name in NO_TARGET else "error", "target")
    case("metrics", f"metrics.{_name}", "integer attribution", lambda n=_name, k=_kind: metric_use(
        n, a=metric_data(k)[1].sign().long())(metric_build(n)), "either" if _name not in NAN_OK else anything,
         ATTRIBUTION)
    if _name in MASKED:
        case("metrics", f"metrics.{_name}", "mask of the wrong shape", lambda n=_name: metric_use(
            n, masks=metric_data()[2][..., :-1])(metric_build(n)), "error", "mask")
        case("metrics", f"metrics.{_name}", "mask float in [0, 1]", lambda n=_name: metric_use(
            n, masks=metric_data()[2].float() * 0.5)(metric_build(n)), "error", "mask")
    if _name in NEEDS_EXPLAIN:
        case("metrics", f"metrics.{_name}", "explain not callable", lambda n=_name: metric_build(n, explain="gradient"),
             "error", "explain")
case("metrics", "metrics.focus", "quadrant flags of the wrong shape", lambda: metric_use(
    "focus", masks=torch.ones(N, 3, dtype=torch.bool))(metric_build("focus")), "error", "quadrants")
case("metrics", "metrics.road_imputation", "missing of the wrong shape",
     lambda: M.road_imputation(metric_data()[0][0], torch.zeros(3, 5, 5, dtype=torch.bool)), "error", "missing")
case("metrics", "metrics.road_imputation", "x NaN",
     lambda: M.road_imputation(torch.full((3, 6, 6), NAN), torch.zeros(6, 6, dtype=torch.bool)), nan_or_error, "x")
case("metrics", "metrics.evaluate", "metrics not a mapping", lambda: M.evaluate(
    {"gradient": fxattr.gradient(f_of())}, 3, env()[2], metric_data()[0], ys()), "error", "metrics")
case("metrics", "metrics.evaluate", "explainers not a mapping", lambda: M.evaluate(
    fxattr.gradient(f_of()), {"sparseness": M.sparseness()}, env()[2], metric_data()[0], ys()), "error", "explainers")
case("metrics", "metrics.evaluate", "good", lambda: M.evaluate(
    {"gradient": fxattr.gradient(f_of())}, {"sparseness": M.sparseness()}, env()[2], metric_data()[0], ys()), anything)


# ============================================================================================== viz
V = fxattr.viz
MAPS = torch.randn(2, 3, 4, 4)
for _label, _call, _expect, _argument, _name in [
    ("heatmap good", lambda: V.heatmap(MAPS), lambda r: r.shape == (2, 4, 4, 3) and bool(torch.isfinite(r).all()), None,
     "heatmap"),
    ("heatmap of an empty batch", lambda: V.heatmap(MAPS[:0]), lambda r: r.shape[0] == 0, None, "heatmap"),
    ("heatmap of all zeros", lambda: V.heatmap(torch.zeros(1, 3, 4, 4)), finite_ok, None, "heatmap"),
    ("heatmap reduce=nonsense", lambda: V.heatmap(MAPS, reduce="nonsense"), "error", "reduce", "heatmap"),
    ("heatmap cmap=nonsense", lambda: V.heatmap(MAPS, cmap="nonsense"), "error", "cmap", "heatmap"),
    ("heatmap cmap=3", lambda: V.heatmap(MAPS, cmap=3), "error", "cmap", "heatmap"),
    ("heatmap channel_axis out of range", lambda: V.heatmap(MAPS, channel_axis=7), "error", "channel_axis", "heatmap"),
    ("heatmap absmax NaN", lambda: V.heatmap(MAPS, absmax=NAN), "error", "absmax", "heatmap"),
    ("heatmap absmax negative", lambda: V.heatmap(MAPS, absmax=-1.0), "error", "absmax", "heatmap"),
    ("heatmap absmax string", lambda: V.heatmap(MAPS, absmax="max"), "error", "absmax", "heatmap"),
    ("heatmap of an integer map", lambda: V.heatmap(MAPS.round().long()), "either", "x", "heatmap"),
    ("heatmap of a list", lambda: V.heatmap([1.0, 2.0]), "either", "x", "heatmap"),
    ("heatmap of a 0-d tensor", lambda: V.heatmap(torch.tensor(1.0)), "error", "x", "heatmap"),
    ("heatmap input_is_positive_only=yes", lambda: V.heatmap(MAPS, input_is_positive_only="yes"), "error",
     "input_is_positive_only", "heatmap"),
    ("graymap reduce=nonsense", lambda: V.graymap(MAPS, reduce="nonsense"), "error", "reduce", "graymap"),
    ("graymap good", lambda: V.graymap(MAPS), finite_ok, None, "graymap"),
    ("overlay image of another size (the map is resized)", lambda: V.overlay(torch.rand(2, 3, 5, 5), MAPS), finite_ok,
     None, "overlay"),
    ("overlay of another batch size", lambda: V.overlay(torch.rand(3, 3, 4, 4), MAPS), "error", "image", "overlay"),
    ("overlay image NaN", lambda: V.overlay(torch.full((2, 3, 4, 4), NAN), MAPS), "error", "image", "overlay"),
    ("overlay alpha > 1", lambda: V.overlay(torch.rand(2, 3, 4, 4), MAPS, alpha=2.0), "error", "alpha", "overlay"),
    ("overlay alpha string", lambda: V.overlay(torch.rand(2, 3, 4, 4), MAPS, alpha="half"), "error", "alpha", "overlay"),
    ("overlay good", lambda: V.overlay(torch.rand(2, 3, 4, 4), MAPS), finite_ok, None, "overlay"),
    ("project output_range reversed (an inverted scale)", lambda: V.project(MAPS, output_range=(1, 0)), finite_ok, None,
     "project"),
    ("project output_range of 3", lambda: V.project(MAPS, output_range=(0, 1, 2)), "error", "output_range", "project"),
    ("project output_range a number", lambda: V.project(MAPS, output_range=1), "error", "output_range", "project"),
    ("project absmax zero (maps left as they are)", lambda: V.project(MAPS, absmax=0.0), finite_ok, None, "project"),
    ("project absmax per example of the wrong count", lambda: V.project(MAPS, absmax=torch.ones(3)), "error", "absmax",
     "project"),
    ("gamma minamp NaN", lambda: V.gamma(MAPS, minamp=NAN), "error", "minamp", "gamma"),
    ("gamma maxamp Inf", lambda: V.gamma(MAPS, maxamp=INF), "error", "maxamp", "gamma"),
    ("gamma gamma=0", lambda: V.gamma(MAPS, gamma=0.0), "error", "gamma", "gamma"),
    ("gamma gamma string", lambda: V.gamma(MAPS, gamma="0.5"), "error", "gamma", "gamma"),
    ("clip_quantile quantile NaN", lambda: V.clip_quantile(MAPS, quantile=NAN), "error", "quantile", "clip_quantile"),
    ("clip_quantile quantile 200", lambda: V.clip_quantile(MAPS, quantile=200), "error", "quantile", "clip_quantile"),
    ("clip_quantile quantile -0.5", lambda: V.clip_quantile(MAPS, quantile=-0.5), "error", "quantile", "clip_quantile"),
    ("clip_quantile of an empty map", lambda: V.clip_quantile(MAPS[:0]), lambda r: r.shape[0] == 0, None, "clip_quantile"),
    ("plot_grid rows not a list", lambda: V.plot_grid(3), "error", "rows", "plot_grid"),
    ("plot_grid ragged rows", lambda: V.plot_grid([[MAPS[0, 0]], [MAPS[0, 0], MAPS[1, 0]]], file=_scratch_file(".png")), anything, "rows", "plot_grid"),
    ("plot_grid labels of the wrong count", lambda: V.plot_grid([[MAPS[0, 0]]], row_labels=["a", "b"]), "error",
     "row_labels", "plot_grid"),
    ("plot_grid dpi=0", lambda: V.plot_grid([[MAPS[0, 0]]], dpi=0), "error", "dpi", "plot_grid"),
    ("plot_grid cell_size NaN", lambda: V.plot_grid([[MAPS[0, 0]]], cell_size=NAN), "error", "cell_size", "plot_grid"),
    ("plot_grid a cell of rank 4", lambda: V.plot_grid([[MAPS]]), "error", "image", "plot_grid"),
]:
    case("viz", f"viz.{_name}", _label, _call, _expect, _argument)


# ========================================================================================== runner
def _dataset(n=4):
    return torch.utils.data.TensorDataset(xs(n=n), ys(n) if n <= 3 else torch.arange(n) % 4)


def _run(data=None, **config):
    out = _scratch_dir()
    _, f, params = env()
    summary = fxattr.attribute_dataset(fxattr.gradient(f), params, _dataset(3) if data is None else data, out,
                                       **{"progress": False, "batch_size": 2, **config})
    return summary, fxattr.load_attributions(out)


option_cases("runner", "attribute_dataset", fxattr.attribute_dataset, lambda **kw: kw, lambda kw: _run(**kw),
             skip=("format", "target", "randomness", "seed"))
for _label, _call, _expect, _argument, _name in [
    ("good", lambda: _run()[1]["attribution"][:], lambda r: r.shape == (3, 3, 6, 6) and bool(torch.isfinite(
        torch.as_tensor(r)).all()), None, "attribute_dataset"),
    ("format=xml", lambda: _run(format="xml"), "error", "format", "attribute_dataset"),
    ("target=nonsense", lambda: _run(target="nonsense"), "error", "target", "attribute_dataset"),
    ("target callable returning floats", lambda: _run(target=lambda params, x: torch.zeros(len(x))), "error", "target",
     "attribute_dataset"),
    ("dtype=int64", lambda: _run(dtype=torch.int64), "error", "dtype", "attribute_dataset"),
    ("dtype a name", lambda: _run(dtype="float16"), anything, None, "attribute_dataset"),
    ("dtype a bad name", lambda: _run(dtype="float33"), "error", "dtype", "attribute_dataset"),
    ("randomness=nonsense", lambda: _run(randomness="nonsense"), "error", "randomness", "attribute_dataset"),
    ("batch_size=0", lambda: _run(batch_size=0), "error", "batch_size", "attribute_dataset"),
    ("data not a dataset", lambda: _run(data=3), "error", "data", "attribute_dataset"),
    ("an empty dataset", lambda: _run(data=torch.utils.data.TensorDataset(xs()[:0], ys()[:0])), "either", "dataset",
     "attribute_dataset"),
    ("data with NaN x", lambda: _run(data=torch.utils.data.TensorDataset(torch.full((2, 3, 6, 6), NAN), ys(2))),
     "error", "x", "attribute_dataset"),
    ("data of the wrong rank", lambda: _run(data=torch.utils.data.TensorDataset(xs()[:, 0], ys())), "error", "x",
     "attribute_dataset"),
    ("explain not callable", lambda: fxattr.attribute_dataset("gradient", env()[2], _dataset(), _scratch_dir(),
                                                              progress=False), "error", "explain",
     "attribute_dataset"),
    ("out an existing file", lambda: fxattr.attribute_dataset(fxattr.gradient(f_of()), env()[2], _dataset(),
                                                              _scratch_file(), progress=False), "error", None,
     "attribute_dataset"),
    ("load_attributions of a missing folder", lambda: fxattr.load_attributions(_scratch_dir() + "/nothing"),
     "error", None, "load_attributions"),
    ("load_attributions of an empty folder", lambda: fxattr.load_attributions(_scratch_dir()), "error", None,
     "load_attributions"),
    ("load_attributions of a file", lambda: fxattr.load_attributions(_scratch_file()), "error", None,
     "load_attributions"),
]:
    case("runner", _name, _label, _call, _expect, _argument)


# ============================================================================================ tests
# Known misses in files other engineers are editing (id -> reason); strict: fixing one fails its xfail.
KNOWN: dict[str, str] = {
}


def _params():
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[c.id])] if c.id in KNOWN else []
        yield pytest.param(c, id=c.id, marks=marks)


@pytest.mark.parametrize("c", list(_params()))
def test_case(c):
    outcome, detail = classify(c)
    assert outcome in ("clear", "ok"), f"{outcome}: {detail}"


def test_layers_errors_carry_their_public_path():
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.layers\.layer_conductance: "):
        L.layer_conductance(f_of(), layer="nonsense")


def test_a_failed_call_does_not_teach_the_example_shape():
    torch.manual_seed(0)
    f, params = fxattr.functionalize(_TwoInputs().eval())
    explain = fxattr.gradient(f)
    image, extra = xs("two_inputs")
    with pytest.raises(fxattr.FxattrError):
        explain(params, (image[0, 0], extra[0]), 0)  # the image without its channel axis
    result = explain(params, (image[0], extra[0]), 0)
    assert result[0].shape == image[0].shape


def test_the_audit_covers_every_new_public_function():
    """Each function named in the audit's brief has cases, and the audit is about 2,000 cases."""
    names = {c.name for c in CASES}
    wanted = {"beta_smooth", "lrp", "lrp.rules.stabiliser", "deeplift", "deeplift_shap", "gradient_shap",
              "expected_gradients", "gradient", "occlusion", "feature_ablation", "shapley_value_sampling",
              "shapley_values", "kernel_shap", "lime", "guided_gradcam", "crp", "crp_reference_samples",
              "text.attribute", "attribute_dataset", "load_attributions",
              *(f"layers.{n}" for n in fxattr.layers.__all__),
              *(f"metrics.{n}" for n in METRIC_BASE), *(f"viz.{n}" for n in fxattr.viz.__all__)}
    assert wanted <= names, sorted(wanted - names)
    assert len(CASES) >= 2000


def totals(families=None) -> dict:
    table = collections.defaultdict(collections.Counter)
    for c in CASES:
        if families and c.family not in families:
            continue
        table[c.family][classify(c)[0]] += 1
    return table


def print_totals(families=None):
    table = totals(families)
    columns = ("clear", "ok", "raw", "silent")
    print(f"| family | cases | {' | '.join(columns)} |")
    print("|---|---:|" + "---:|" * len(columns))
    total = collections.Counter()
    for family in sorted(table):
        total.update(table[family])
        print(f"| {family} | {sum(table[family].values())} | " + " | ".join(str(table[family][k]) for k in columns) + " |")
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[k]) for k in columns) + " |")
    for c in CASES:
        if families and c.family not in families:
            continue
        outcome, detail = classify(c)
        if outcome not in ("clear", "ok"):
            print(f"{outcome:6s} {c.id}: {detail}")


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    print_totals(sys.argv[1:])
