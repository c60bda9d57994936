"""fxattr's own robustness suite: explainers x bad inputs x dtypes, every outcome classified.

Each case calls an explainer the way users do (``torch.vmap`` over a batch, or one eager example)
with one thing wrong, or nothing wrong, and the outcome is one of

- ``clear``: an ``FxattrError`` under the explainer's own name (``fxattr.<name>: ...``);
- ``correct``: a result where one is due (right shape, finite, equal to the loop over examples);
- ``misnamed``: an ``FxattrError`` under another function's name;
- ``raw``: any other exception (a torch / fx traceback);
- ``silent``: a result where an error was due, or a wrong / non-finite result where one was due.

The suite fails on anything but ``clear`` and ``correct``. Hypothesis draws (explainer, case,
dtype) triples, derandomized; ``test_totals`` prints the tally (``pytest -s``).
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxattr

OUTCOMES: collections.Counter = collections.Counter()
PROBLEMS: list = []


def mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype).eval()


def cnn(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)).to(dtype).eval()


class ModuleMLP(nn.Module):
    """An MLP written as its own module (not an nn.Sequential): its forward could reshape, so only
    the meta-device shape of its output tells that a (B, 6) x is a batch."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def module_mlp(dtype):
    torch.manual_seed(0)
    return ModuleMLP().to(dtype).eval()


SHAPES = {"mlp": (6,), "module_mlp": (6,), "cnn": (3, 6, 6)}
MODELS = {"mlp": mlp, "module_mlp": module_mlp, "cnn": cnn}
RANDOM = {"smoothgrad", "vargrad", "expected_gradients", "rise", "deeplift_shap"}

BUILDERS = {
    "gradient": lambda f, shape: fxattr.gradient(f),
    "input_x_gradient": lambda f, shape: fxattr.input_x_gradient(f),
    "integrated_gradients": lambda f, shape: fxattr.integrated_gradients(f, steps=3),
    "smoothgrad": lambda f, shape: fxattr.smoothgrad(f, samples=2),
    "vargrad": lambda f, shape: fxattr.vargrad(f, samples=2),
    "expected_gradients": lambda f, shape: fxattr.expected_gradients(f, baselines=torch.zeros(2, *shape), samples=2),
    "lrp": lambda f, shape: fxattr.lrp(f, rule="epsilon"),
    "lrp_composite": lambda f, shape: fxattr.lrp(f, composite="epsilon_plus"),
    "deep_taylor": lambda f, shape: fxattr.deep_taylor(f),
    "guided_backprop": lambda f, shape: fxattr.guided_backprop(f),
    "deconvnet": lambda f, shape: fxattr.deconvnet(f),
    "deeplift": lambda f, shape: fxattr.deeplift(f),
    "deeplift_shap": lambda f, shape: fxattr.deeplift_shap(f, baselines=torch.zeros(2, *shape)),
    "occlusion": lambda f, shape: fxattr.occlusion(f, window=(3, 3, 3) if len(shape) == 3 else 2,
                                                   stride=(3, 3, 3) if len(shape) == 3 else 2),
    "feature_ablation": lambda f, shape: fxattr.feature_ablation(f),
    "rise": lambda f, shape: fxattr.rise(f, masks=torch.rand(4, *shape[-2:]) if len(shape) == 3 else torch.rand(4, *shape)),
    "gradcam": lambda f, shape: fxattr.gradcam(f, layer="2"),
    "layercam": lambda f, shape: fxattr.layercam(f, layer="2"),
    "scorecam": lambda f, shape: fxattr.scorecam(f, layer="3"),
    "cam": lambda f, shape: fxattr.cam(f, layer="3"),
}
CNN_ONLY = {"gradcam", "layercam", "scorecam", "cam"}
# the name an error must carry (the explainer the user called)
BOUNDARY = {"smoothgrad": "noise_tunnel", "vargrad": "noise_tunnel", "lrp_composite": "lrp"}


@functools.cache
def setup(kind: str, dtype: torch.dtype, name: str):
    model = MODELS[kind](dtype)
    f, params = fxattr.functionalize(model)
    return model, f, params, BUILDERS[name](f, SHAPES[kind])


def batch(kind, dtype, n=3):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, *SHAPES[kind], generator=generator).to(dtype)


def vmapped(explain, name):
    return torch.vmap(explain, in_dims=(None, 0, 0), randomness="same" if name in RANDOM else "error")


# Each case: (call(explain, params, kind, dtype, name) -> result, expect) with expect "error" or a
# check(result, kind, dtype) -> bool for a correct result.
def _good_batch(explain, params, kind, dtype, name):
    return vmapped(explain, name)(params, batch(kind, dtype), torch.tensor([0, 1, 3]))


def _targets(values):
    return lambda explain, params, kind, dtype, name: vmapped(explain, name)(
        params, batch(kind, dtype), torch.tensor(values))


def _eager_target(target):
    return lambda explain, params, kind, dtype, name: explain(params, batch(kind, dtype)[0], target)


def _non_finite(value, eager):
    def call(explain, params, kind, dtype, name):
        xs = batch(kind, dtype)
        xs.view(-1)[5] = value
        if eager:
            return explain(params, xs[0], 0)  # index 5 lies in the first example
        return vmapped(explain, name)(params, xs, torch.tensor([0, 1, 2]))
    return call


def _x_as(convert):
    return lambda explain, params, kind, dtype, name: explain(params, convert(batch(kind, dtype)[0]), 0)


def _batch_as_one(explain, params, kind, dtype, name):
    return explain(params, batch(kind, dtype), 0)


def _missing_axis(explain, params, kind, dtype, name):
    return explain(params, batch(kind, dtype)[0][..., :-1] if kind != "cnn" else batch(kind, dtype)[0][0], 0)


def _empty(explain, params, kind, dtype, name):
    return vmapped(explain, name)(params, batch(kind, dtype)[:0], torch.zeros(0, dtype=torch.long))


def _shape_ok(result, kind, dtype, n=3):
    return isinstance(result, torch.Tensor) and result.shape[0] == n and bool(torch.isfinite(result).all())


def _int32_targets_equal_int64(explain, params, kind, dtype, name):
    xs = batch(kind, dtype)
    torch.manual_seed(0)
    a = vmapped(explain, name)(params, xs, torch.tensor([0, 1, 3], dtype=torch.int32))
    torch.manual_seed(0)
    b = vmapped(explain, name)(params, xs, torch.tensor([0, 1, 3]))
    return a, b


CASES = {
    "good batch": (_good_batch, _shape_ok),
    "int32 targets": (_int32_targets_equal_int64, lambda r, kind, dtype: torch.equal(*r)),
    "target out of range (vmap)": (_targets([0, 4, 1]), "error"),
    "negative target (vmap)": (_targets([0, -1, 1]), "error"),
    "target out of range (eager)": (_eager_target(7), "error"),
    "negative target (eager)": (_eager_target(-2), "error"),
    "uint8 target": (_eager_target(torch.tensor(1, dtype=torch.uint8)), "error"),
    "bool target": (_eager_target(torch.tensor(True)), "error"),
    "float target": (_eager_target(torch.tensor(1.0)), "error"),
    "2-d target": (_eager_target(torch.tensor([[1]])), "error"),
    "string target": (_eager_target("cat"), "error"),
    "NaN in x (vmap)": (_non_finite(float("nan"), eager=False), "error"),
    "Inf in x (eager)": (_non_finite(float("inf"), eager=True), "error"),
    "integer x": (_x_as(lambda x: x.round().to(torch.int64)), "error"),
    "x of another float dtype": (_x_as(lambda x: x.to(torch.float16 if x.dtype != torch.float16
                                                       else torch.float32)), "error"),
    "x a list": (_x_as(lambda x: x.tolist()), "error"),
    "a batch passed as one example": (_batch_as_one, "error"),
    "x missing an axis": (_missing_axis, "error"),
    "empty batch": (_empty, lambda r, kind, dtype: isinstance(r, torch.Tensor) and r.shape[0] == 0),
}

PAIRS = [(name, kind) for name in BUILDERS for kind in ("mlp", "module_mlp", "cnn")
         if not (kind != "cnn" and name in CNN_ONLY)]


def classify(name: str, kind: str, dtype: torch.dtype, case: str) -> str:
    call, expect = CASES[case]
    model, _, params, explain = setup(kind, dtype, name)
    expected_name = BOUNDARY.get(name, name)
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        result = call(explain, params, kind, dtype, name)
    except fxattr.FxattrError as error:
        outcome = "clear" if str(error).startswith(f"fxattr.{expected_name}: ") else "misnamed"
        detail = str(error)[:160]
    except Exception as error:  # noqa: BLE001 - the point is to catch everything else
        outcome, detail = "raw", f"{type(error).__name__}: {str(error)[:160]}"
    else:
        ok = expect != "error" and expect(result, kind, dtype)
        outcome, detail = ("correct", "") if ok else ("silent", "a result where an error was due"
                                                       if expect == "error" else "a wrong result")
    for key, value in model.state_dict().items():
        if not torch.equal(value, before[key]):
            outcome, detail = "silent", f"the model's {key} changed"
    OUTCOMES[outcome] += 1
    if outcome not in ("clear", "correct"):
        PROBLEMS.append((name, kind, str(dtype), case, outcome, detail))
    return outcome


@settings(max_examples=400, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.sampled_from(PAIRS), case=st.sampled_from(sorted(CASES)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
def test_every_outcome_is_a_clear_error_or_a_correct_result(pair, case, dtype):
    name, kind = pair
    outcome = classify(name, kind, dtype, case)
    assert outcome in ("clear", "correct"), PROBLEMS[-1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_explainer_on_every_case(case):
    """The whole product in float32 (about 700 calls, 20 s): no draw can miss a pair."""
    for name, kind in PAIRS:
        classify(name, kind, torch.float32, case)
    problems = [p for p in PROBLEMS if p[3] == case and p[2] == "torch.float32"]
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_out_of_range_and_negative_targets_under_vmap(name):
    """The README's own usage with a bad target: a clear error, every explainer (was a raw
    ``index 5 is out of bounds`` from deep inside, or class K - 1 for CAM)."""
    kind = "cnn"
    for case in ("target out of range (vmap)", "negative target (vmap)"):
        assert classify(name, kind, torch.float32, case) == "clear", PROBLEMS[-1]


def test_totals():
    """Prints the tally of the draws above (run with -s); fails if any was not clear / correct."""
    print(f"\nrobustness outcomes: {dict(OUTCOMES)}")
    for problem in PROBLEMS:
        print("  ", problem)
    assert not PROBLEMS


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        h = self.conv2(self.relu(self.conv(x)))
        return self.head(h.mean((2, 3))), h


@pytest.mark.parametrize("name", sorted(set(BUILDERS) - {"cam"}))
def test_a_model_returning_a_tuple_is_a_clear_error(name):
    """``output=`` chooses one tensor; without it every explainer says so under its own name.
    (CAM never evaluates the output: it reads the classifier's weight row, so it is exempt.)"""
    torch.manual_seed(0)
    f, params = fxattr.functionalize(_TupleOut().eval())
    expected_name = BOUNDARY.get(name, name)
    builders = dict(BUILDERS, gradcam=lambda f, s: fxattr.gradcam(f, layer="conv2"),
                    layercam=lambda f, s: fxattr.layercam(f, layer="conv2"),
                    scorecam=lambda f, s: fxattr.scorecam(f, layer="conv2"),
                    cam=lambda f, s: fxattr.cam(f, layer="conv2"))
    try:
        explain = builders[name](f, SHAPES["cnn"])
        torch.vmap(explain, in_dims=(None, 0, 0), randomness="same")(params, batch("cnn", torch.float32), torch.tensor([0, 1, 2]))
    except fxattr.FxattrError as error:
        assert str(error).startswith(f"fxattr.{expected_name}: "), str(error)
        assert "output" in str(error) or "tuple" in str(error), str(error)
    else:
        pytest.fail("a tuple output was explained")
