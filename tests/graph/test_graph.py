"""fxattr.graph: pure traced graphs and splitting a model at a layer."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from fxattr.graph import run, split, trace
from tests.contract import model_unchanged
from tests.models import Residual, residual, small_cnn


class InPlace(nn.Module):
    """Every kind of in-place op: a module built with inplace=True, +=, relu_, F.relu(inplace=True),
    and a value read after it was mutated in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.lrelu = nn.LeakyReLU(0.3, inplace=True)

    def forward(self, x):
        h = self.conv(x)
        skip = h * 1.0
        h = self.act(h)
        h += skip
        h = self.lrelu(h - 1.0)
        y = h.clone()
        y.relu_()  # mutates y; the result node is unused, the next line reads y again
        z = F.relu(y - 0.5, inplace=True)
        return (y + z).flatten(1)


def _pure(gm):
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert node.target not in (operator.iadd, operator.imul), node
            assert node.kwargs.get("inplace") is not True, node
            assert not getattr(node.target, "__name__", "").endswith("_"), node
        if node.op == "call_method":
            assert not node.target.endswith("_"), node
        if node.op == "call_module":
            assert not getattr(gm.get_submodule(node.target), "inplace", False), node


def test_trace_is_pure_and_evaluates_like_f(dtype):
    model = InPlace().to(dtype).eval()
    x = torch.randn(2, 5, 5, dtype=dtype)
    with model_unchanged(model):
        f, params = fxattr.functionalize(model)
        gm = trace(f)
        _pure(gm)
        expected = model(x[None].clone())[0].detach()
        torch.testing.assert_close(run(f, gm, params, x), expected)
        torch.testing.assert_close(f(params, x), expected)
    # the user's modules keep their in-place flag and are shared, not copied
    assert model.act.inplace and model.lrelu.inplace
    assert gm.conv is model.conv
    assert trace(f) is gm, "the traced graph is cached on f"


def test_trace_is_cached_per_function_not_on_the_module():
    model = small_cnn()
    f1, _ = fxattr.functionalize(model)
    f2, _ = fxattr.functionalize(model)
    assert trace(f1) is not trace(f2)
    assert not any("fxattr" in k or "graph" in k for k in vars(model))


def test_untraceable_model_error():
    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return x
            return -x

    f, _ = fxattr.functionalize(Branchy())
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.trace: torch.fx cannot trace Branchy"):
        trace(f)
    with pytest.raises(fxattr.FxattrError, match="FunctionalModel"):
        trace(lambda p, x: x)


def _check_split(model, layer, x, params=None, expect_head_modules=None):
    f, p = fxattr.functionalize(model)
    params = p if params is None else params
    body, head = split(f, layer)
    a = body(params, x)
    torch.testing.assert_close(head(params, x, a), f(params, x), rtol=1e-5, atol=1e-6)
    if expect_head_modules is not None:
        called = [n.target for n in head.graph_module.graph.nodes if n.op == "call_module"]
        assert called == expect_head_modules
    return f, params, body, head, a


def test_split_resnet18_layer4_recomputes_nothing():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18().eval()
    x = torch.randn(3, 32, 32)
    with model_unchanged(model):
        f, params, body, head, a = _check_split(model, "layer4", x,
                                                expect_head_modules=["avgpool", "fc"])
    assert a.shape == (512, 1, 1)
    # the body stops at layer4: no avgpool/fc
    assert not any(n.target in ("avgpool", "fc") for n in body.graph_module.graph.nodes)


@pytest.mark.slow
def test_split_vgg11_features():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.vgg11().eval()
    x = torch.randn(3, 32, 32)
    with model_unchanged(model):
        for layer in ("features.10", "features.20", "classifier.0"):
            _check_split(model, layer, x)
        _, _, body, _, a = _check_split(model, "features.10", x)
    assert a.shape == (256, 4, 4)
    # features.10 is the 4th conv: the body holds exactly the first four convolutions
    convs = [n.target for n in body.graph_module.graph.nodes if n.op == "call_module"
             and isinstance(model.get_submodule(n.target), nn.Conv2d)]
    assert convs == ["features.0", "features.3", "features.6", "features.8"]


def test_split_with_a_skip_around_the_layer_recomputes_the_skip():
    model = residual()
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    # conv's output feeds softplus -> shared -> (+ x); the head recomputes nothing before conv but
    # needs x for the skip connection.
    f, params, body, head, a = _check_split(model, "conv", x)
    assert [n.target for n in head.graph_module.graph.nodes if n.op == "call_module"] == [
        "shared", "shared", "head"]
    # 'shared' is called twice: ambiguous as a module name, fine as a node name
    with pytest.raises(fxattr.FxattrError, match=r"called 2 times.*'shared', 'shared_1'"):
        split(f, "shared")
    _, _, body2, head2, a2 = _check_split(model, "shared_1", x)
    # the cut at shared_1 has a skip around it (cat([shared(h), h])): the head recomputes h
    assert [n.target for n in head2.graph_module.graph.nodes if n.op == "call_module"] == [
        "conv", "shared", "head"]


def test_split_unknown_layer_lists_close_matches():
    f, _ = fxattr.functionalize(residual())
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.split: layer 'shard'.*close matches: 'shared'"):
        split(f, "shard")
    with pytest.raises(fxattr.FxattrError, match="module name"):
        split(f, 3)


def test_split_composes_with_vmap_grad_and_compile():
    model = residual()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    body, head = split(f, "shared_1")
    with model_unchanged(model):
        acts = torch.vmap(body, in_dims=(None, 0))(params, xs)
        looped = torch.stack([body(params, x) for x in xs])
        torch.testing.assert_close(acts, looped)
        out = torch.vmap(head, in_dims=(None, 0, 0))(params, xs, acts)
        torch.testing.assert_close(out, torch.vmap(f, in_dims=(None, 0))(params, xs))

        # Grad-CAM-style: gradient of the head w.r.t. the activation, and a second derivative
        def score(a, x):
            return head(params, x, a)[1]

        grads = torch.vmap(torch.func.grad(score))(acts, xs)
        expected = torch.func.grad(lambda x: f(params, x)[1])(xs[0])
        # chain rule through the cut: d f / d x == d head/dx + d head/da * d body/dx
        _, vjp_body = torch.func.vjp(lambda x: body(params, x), xs[0])
        direct = torch.func.grad(lambda x: head(params, x, acts[0])[1])(xs[0])  # the skip
        torch.testing.assert_close(vjp_body(grads[0])[0] + direct, expected)
        x0 = xs[0].clone().requires_grad_(True)
        a0 = acts[0].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, x: torch.func.grad(score)(a, x).square().sum(),
                                        (a0, x0), fast_mode=True)

        compiled = torch.compile(torch.vmap(head, in_dims=(None, 0, 0)), fullgraph=True)
        torch.testing.assert_close(compiled(params, xs, acts), out)
        compiled_body = torch.compile(torch.vmap(body, in_dims=(None, 0)), fullgraph=True)
        torch.testing.assert_close(compiled_body(params, xs), acts)


def test_split_cnn_with_batch_norm_under_vmap(dtype):
    model = small_cnn(dtype)
    f, params = fxattr.functionalize(model)
    xs = torch.randn(3, 3, 8, 8, dtype=dtype)
    body, head = split(f, "4")  # the second convolution
    acts = torch.vmap(body, in_dims=(None, 0))(params, xs)
    assert acts.shape == (3, 6, 4, 4)
    out = torch.vmap(head, in_dims=(None, 0, 0))(params, xs, acts)
    torch.testing.assert_close(out, model(xs).detach())
