"""Regression tests for the silent mistraces of issue 9: each of these gave a wrong number (or a
crash inside torch) on the engine as it was at commit 40bfa86, and must give the right one, or a
clear error naming the culprit, now.

Every check compares with a value computed without the engine (autograd on the model itself, or the
model's own forward), so that a capture which explains a different function than the model's is
caught."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from fxattr.errors import FxattrError


def _grad_x_input(f, params, x, target):
    return torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, x, target)


class OptionalScale(nn.Module):
    """``forward(x, scale=None)``: the ReLU exists only when ``scale`` is not passed."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6, bias=False)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x, scale=None):
        h = self.fc1(x)
        if scale is None:
            h = F.relu(h)
        else:
            h = h * scale
        return self.fc2(h)


def test_unpassed_default_argument_keeps_its_branch():
    """The explainer passes only x: ``scale`` must be None in the captured graph, so the ReLU is
    there. Traced as an input, ``scale is None`` was False and the ReLU vanished: LRP-z (== gradient
    x input on this bias-free ReLU net) and guided backprop explained a linear model."""
    torch.manual_seed(0)
    model = OptionalScale().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1])
    want = _grad_x_input(f, params, x, t)
    got = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close(got, want)
    deeplift = torch.vmap(fxattr.deeplift(f, baseline=0.0), in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close(deeplift.sum(1), torch.vmap(f, in_dims=(None, 0))(params, x)[range(5), t])


def test_passed_optional_argument_is_an_input():
    """Passed explicitly (a tuple ``(x, scale)``), ``scale`` is an input again and the other
    branch (no ReLU: guided backprop is the gradient there) is explained, for both inputs."""
    torch.manual_seed(0)
    model = OptionalScale().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    s = torch.rand(3, 6, dtype=torch.float64) + 0.5
    t = torch.tensor([0, 1, 2])
    explain = fxattr.guided_backprop(f, seed="one")
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, (x, s), t)
    want = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, (x, s), t)
    torch.testing.assert_close(got, want)
    # the same explainer on x alone explains the ReLU branch again
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)
    assert not torch.allclose(got, torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, (x, torch.ones_like(s)), t)[0])


class Permuted(nn.Module):
    """A plain tensor attribute (not a parameter or buffer) used as an index, as MaxViT keeps its
    relative-position index, and one used as a multiplier."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 3)
        self.perm = torch.tensor([2, 0, 3, 1])
        self.gain = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = h[:, self.perm] * self.gain
        return self.fc2(h)


def test_tensor_attributes_are_constants():
    torch.manual_seed(0)
    model = Permuted().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 1])
    # epsilon with a tiny epsilon on a net whose only non-linearity is a ReLU: relevance is
    # conserved and (without biases' share) close to gradient x input; compare with a hand-built
    # equivalent model where the attributes are baked into a linear layer instead.
    eq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        eq[0].load_state_dict(model.fc1.state_dict())
        mix = torch.zeros(4, 4, dtype=torch.float64)
        mix[range(4), model.perm] = model.gain
        eq[2].weight.copy_(mix)
        eq[3].load_state_dict(model.fc2.state_dict())
    g, gparams = fxattr.functionalize(eq)
    torch.testing.assert_close(torch.vmap(g, in_dims=(None, 0))(gparams, x), torch.vmap(f, in_dims=(None, 0))(params, x))
    for method in (lambda h: fxattr.lrp(h, rule="epsilon", epsilon=1e-9), fxattr.guided_backprop):
        got = torch.vmap(method(f), in_dims=(None, 0, 0))(params, x, t)
        want = torch.vmap(method(g), in_dims=(None, 0, 0))(gparams, x, t)
        torch.testing.assert_close(got, want)


def test_forward_hook_changes_the_explanation():
    """A forward hook that flips a layer's output (so other ReLUs fire): on this bias-free ReLU
    net LRP-z, DeepLIFT-rescale with a zero baseline and gradient x input of the *hooked* model
    agree; the engine used to call the kernel directly and explain the unhooked model. The
    alternative, a refusal, must name the hooked module."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)).double().eval()
    handle = model[0].register_forward_hook(lambda module, args, out: -out)
    f, params = fxattr.functionalize(model)
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    want = _grad_x_input(f, params, x, t)
    explained = 0
    for method in (lambda h: fxattr.lrp(h, rule="z"), lambda h: fxattr.deeplift(h, baseline=0.0)):
        try:
            got = torch.vmap(method(f), in_dims=(None, 0, 0))(params, x, t)
        except FxattrError as error:
            assert "'0'" in str(error) and "hook" in str(error), str(error)
            continue
        torch.testing.assert_close(got, want)
        explained += 1
    # guided backprop with positive head weights and no ReLU gating differences: the gradient
    with torch.no_grad():
        model[2].weight.abs_()
    f, params = fxattr.functionalize(model)
    try:
        got = torch.vmap(fxattr.guided_backprop(f, seed="one"), in_dims=(None, 0, 0))(params, x, t)
    except FxattrError as error:
        assert "'0'" in str(error) and "hook" in str(error), str(error)
    else:
        torch.testing.assert_close(got, torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, t))
    handle.remove()


class Tied(nn.Module):
    """Two heads sharing one weight (``named_parameters`` lists it once, under the first name),
    and one module called twice (each call its own node)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 6, bias=False)
        self.shared = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 3, bias=False)
        self.head2 = nn.Linear(6, 3, bias=False)
        self.head2.weight = self.head.weight

    def forward(self, x):
        h = F.relu(self.encoder(x))
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h))
        return self.head(h) + 0.5 * self.head2(h)


def test_tied_weights_and_shared_modules():
    torch.manual_seed(0)
    model = Tied().double().eval()
    f, params = fxattr.functionalize(model)
    assert "head2.weight" not in params  # the tied weight is listed once
    x = torch.randn(4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2, 0])
    want = _grad_x_input(f, params, x, t)
    got = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close(got, want)
    dl = torch.vmap(fxattr.deeplift(f, baseline=0.0), in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close(dl, want)  # bias-free ReLU net, zero baseline: DeepLIFT-rescale == gxi


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(F.relu(a).mean(1))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_multihead_attention_in_gradient_mode(method):
    """``nn.MultiheadAttention`` returns ``(out, None)``: guided backprop / deconvnet crashed
    inside a vjp on the ``None``. With non-negative head weights and the ReLU's input positive,
    guided backprop is the gradient exactly (the one ReLU filters nothing)."""
    torch.manual_seed(0)
    model = Attention().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    got = torch.vmap(getattr(fxattr, method)(f, seed="one"), in_dims=(None, 0, 0))(params, x, t)
    assert got.shape == x.shape and torch.isfinite(got).all() and got.abs().sum() > 0
    if method == "guided_backprop":
        params = dict(params)
        params["attn.out_proj.bias"] = params["attn.out_proj.bias"] + 100.0
        params["head.weight"] = params["head.weight"].abs()
        got = torch.vmap(fxattr.guided_backprop(f, seed="one"), in_dims=(None, 0, 0))(params, x, t)
        want = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, t)
        torch.testing.assert_close(got, want)


def test_captum_test_models_with_non_none_defaults():
    """captum's own test models bind non-None defaults (``multidim_output: bool = False``,
    ``x3: int = 2``); torch.fx guards them with ``_assert(eq(x3_1, 2))``, which DeepLIFT's paired
    forward returned as a bool (a crash), and the placeholder ``x3_1`` was matched to ``x3`` by
    stripping every trailing digit. Both now give captum's numbers."""
    captum_attr = pytest.importorskip("captum.attr")
    basic_models = pytest.importorskip("captum.testing.helpers.basic_models")
    model = basic_models.BasicModel_MultiLayer().eval()
    f, params = fxattr.functionalize(model)
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    ours = torch.vmap(fxattr.deeplift(f), in_dims=(None, 0, None))(params, x, 0)
    torch.testing.assert_close(ours, captum_attr.DeepLift(model).attribute(x, target=0).detach())
    torch.testing.assert_close(ours, torch.tensor([[3.0, 6.0, 9.0], [1.5, -3.0, 6.0]]))
    guided = torch.vmap(fxattr.guided_backprop(f, seed="one"), in_dims=(None, 0, None))(params, x, 0)
    torch.testing.assert_close(guided, captum_attr.GuidedBackprop(model).attribute(x, target=0).detach())

    model = basic_models.ReLUDeepLiftModel().eval()
    f, params = fxattr.functionalize(model)
    x1, x2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    ours = fxattr.deeplift(f)(params, (x1, x2), 0)
    theirs = captum_attr.DeepLift(model).attribute((x1[None], x2[None]), baselines=(torch.zeros(1, 3),
                                                   torch.zeros(1, 3)), target=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b[0].detach())
    torch.testing.assert_close(ours[0] + ours[1], torch.tensor([7.0, 0.0, 0.0]))
