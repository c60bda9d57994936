"""Complexity metrics against Quantus 0.6.0, hand values, derivatives (gradcheck / gradgradcheck in
float64 through torch.func.grad), vmap == loop, dtypes, compile and errors."""

import math

import numpy as np
import pytest
import torch

import fxattr
from fxattr.errors import FxattrError
from fxattr.metrics import common

from tests.metrics.conftest import inputs

B = 5
NAMES = ["sparseness", "complexity", "effective_complexity"]
QUANTUS = {"sparseness": "Sparseness", "complexity": "Complexity",
           "effective_complexity": "EffectiveComplexity"}


def batched(metric):
    return torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")


def quantus_scores(name, model, x, y, a, **config):
    import quantus
    metric = getattr(quantus, QUANTUS[name])(disable_warnings=True, **config)
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy().copy())
    return torch.tensor(np.asarray(scores, dtype=np.float64))


@pytest.fixture
def case(cnn1):
    model, f, params = cnn1
    x, y = inputs(cnn1, B)
    # different scales per example, so that batch and per-example normalisation differ
    scale = torch.tensor([1.0, 3.0, 0.2, 10.0, 0.5], dtype=torch.float64)[:, None, None, None]
    a = torch.randn(B, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * scale
    a = a * (torch.rand(a.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64) > 0.4)
    return model, f, params, x, y, a


CASES = [
    ("sparseness", {}), ("sparseness", {"normalise": False}),
    ("complexity", {}), ("complexity", {"normalise": False}),
    ("effective_complexity", {"eps": 0.05}), ("effective_complexity", {"eps": 0.01, "abs": False}),
]


@pytest.mark.parametrize("name, config", CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_matches_quantus_on_the_batch_convention(case, name, config):
    # Quantus normalises over the whole batch: normalise_batch(A) with normalise=False reproduces it
    model, f, params, x, y, a = case
    expected = quantus_scores(name, model, x, y, a, **config)
    normalise = config.pop("normalise", True)
    given = common.normalise_batch(a) if normalise else a
    got = batched(getattr(fxattr.metrics, name)(f, normalise=False, **config))(params, x, y, given)
    if name == "effective_complexity":
        assert got.dtype == torch.int64
        assert torch.equal(got, expected.long()) and len(set(got.tolist())) > 2
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["sparseness", "complexity"])
def test_per_example_normalisation_equals_quantus_for_scale_free_scores(case, name):
    model, f, params, x, y, a = case
    expected = quantus_scores(name, model, x, y, a)
    got = batched(getattr(fxattr.metrics, name)(f))(params, x, y, a)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_effective_complexity_normalises_each_example_by_its_own_maximum(case):
    model, f, params, x, y, a = case
    for i in range(B):  # a batch of one: Quantus's batch maximum is the example's
        expected = quantus_scores("effective_complexity", model, x[i:i + 1], y[i:i + 1], a[i:i + 1], eps=0.05)
        assert fxattr.metrics.effective_complexity(f, eps=0.05)(params, x[i], y[i], a[i]) == expected[0]


def test_hand_values(mlp):
    _, f, params = mlp
    x, t = torch.zeros(6), 0
    n = 16
    uniform = torch.full((n,), 0.3, dtype=torch.float64)
    onehot = torch.zeros(n, dtype=torch.float64)
    onehot[3] = -2.0
    m = fxattr.metrics
    assert abs(m.sparseness(f)(params, x, t, uniform).item()) < 1e-12
    # one feature holds everything: (n - 1) / n up to the 1e-7 added to every feature
    torch.testing.assert_close(m.sparseness(f)(params, x, t, onehot),
                               torch.tensor((n - 1) / n, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(m.complexity(f)(params, x, t, uniform),
                               torch.tensor(math.log(n), dtype=torch.float64))
    assert abs(m.complexity(f)(params, x, t, onehot).item()) < 1e-9
    graded = torch.tensor([0.0, 1e-6, 0.5, -1.0], dtype=torch.float64)
    assert m.effective_complexity(f)(params, x, t, graded) == 2                # |a| / 1 > 1e-5: 0.5, 1.0
    assert m.effective_complexity(f, eps=0.4, abs=False)(params, x, t, graded) == 1
    assert m.effective_complexity(f, eps=1e-7, normalise=False)(params, x, t, graded) == 3


@pytest.mark.parametrize("name", ["sparseness", "complexity"])
def test_differentiable_in_the_attribution(mlp, name):
    _, f, params = mlp
    metric = getattr(fxattr.metrics, name)(f)
    x, t = torch.zeros(6), 0
    a = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    fn = lambda a_: metric(params, x, t, a_)  # noqa: E731
    leaf = a.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (leaf,))
    assert torch.autograd.gradgradcheck(fn, (leaf,))
    functional = torch.func.grad(fn)(a)
    (autograd,) = torch.autograd.grad(fn(leaf), leaf)
    torch.testing.assert_close(functional, autograd)
    assert functional.abs().sum() > 0
    # a vmapped per-example gradient (a training objective over a batch)
    batch = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    grads = torch.vmap(torch.func.grad(fn))(batch)
    torch.testing.assert_close(grads[2], torch.func.grad(fn)(batch[2]))


@pytest.mark.parametrize("name", ["sparseness", "complexity"])
def test_differentiable_in_the_parameters_through_an_explainer(mlp, name):
    # a training objective: the sparseness / complexity of the gradient explanation, d/d weights
    _, f, params = mlp
    metric = getattr(fxattr.metrics, name)(f)
    explain = fxattr.gradient(f)
    x = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    weight = params["0.weight"]

    def objective(w):
        p = {**params, "0.weight": w}
        return metric(p, x, 1, explain(p, x, 1))
    leaf = weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(objective, (leaf,), fast_mode=True)
    functional = torch.func.grad(objective)(weight.detach())
    (autograd,) = torch.autograd.grad(objective(leaf), leaf)
    torch.testing.assert_close(functional, autograd)
    assert functional.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_vmap_equals_loop_and_dtypes(case, name, dtype):
    _, f, params, x, y, a = case
    a = a.to(dtype)
    metric = getattr(fxattr.metrics, name)(f)
    vmapped = batched(metric)(params, x, y, a)
    looped = torch.stack([metric(params, x[i], y[i], a[i]) for i in range(B)])
    expected_dtype = torch.int64 if name == "effective_complexity" else dtype
    assert vmapped.dtype == expected_dtype and vmapped.shape == (B,)
    torch.testing.assert_close(vmapped, looped)


def test_errors(mlp):
    _, f, params = mlp
    m = fxattr.metrics
    with pytest.raises(FxattrError, match="effective_complexity: eps must be a finite number"):
        m.effective_complexity(f, eps=float("nan"))
    with pytest.raises(FxattrError, match="sparseness: abs must be True or False"):
        m.sparseness(f, abs="yes")
    with pytest.raises(FxattrError, match="complexity: normalise must be True or False"):
        m.complexity(f, normalise=None)
    with pytest.raises(FxattrError, match="sparseness: attribution must be a floating-point tensor"):
        m.sparseness(f)(params, torch.zeros(6), 0, torch.ones(4, dtype=torch.long))
    with pytest.raises(FxattrError, match="complexity: attribution must be a tensor"):
        m.complexity(f)(params, torch.zeros(6), 0, [1.0, 2.0])
    with pytest.raises(FxattrError, match="f must be a function f"):
        m.sparseness(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compile_equals_eager(case):
    _, f, params, x, y, a = case
    metric = batched(fxattr.metrics.sparseness(f))
    torch._dynamo.reset()
    compiled = torch.compile(metric, backend="aot_eager")
    torch.testing.assert_close(compiled(params, x, y, a), metric(params, x, y, a))
