"""The reverse engine: graph handling (functional ops, residual additions, concatenation, views,
reused modules, in-place ops, batch-norm folding), clear errors, and the composition guarantees
(vmap == loop, second-order derivatives, compile == eager, model unchanged) for every rule and
preset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from fxattr.propagation import Composite, rules
from tests.contract import (assert_compile_equals_eager, assert_second_order, assert_vmap_equals_loop,
                            model_unchanged)
from tests.models import small_cnn


class Functional(nn.Module):
    """F.relu, a residual +, torch.cat, x.view, a module called twice, an in-place ReLU module,
    += and a subtraction."""

    def __init__(self, bias=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.shared = nn.Conv2d(4, 4, 1, bias=bias)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(8 * 2 * 2, 5, bias=bias)

    def forward(self, x):
        h = F.relu(self.conv(x))
        skip = h
        h = self.shared(h)
        h += skip                       # in-place residual addition, then an in-place ReLU
        h = self.act(h)
        g = self.shared(h) - 0.5 * skip  # the same module again; a subtraction of a scaled input
        h = torch.cat([F.relu(g), h], dim=1)
        h = F.max_pool2d(h, 2)
        return self.head(h.view(h.shape[0], -1))


def _functional(dtype=torch.float64, bias=True):
    torch.manual_seed(0)
    return Functional(bias).to(dtype).eval()


def test_functional_ops_bias_free_z_equals_gradient_times_input():
    """On a bias-free, positively homogeneous network the z rule IS gradient x input, layer by
    layer; this holds only if additions split in proportion to their addends, the concatenation,
    view and max pooling route relevance, and both calls of the shared module are reversed."""
    model = _functional(bias=False)
    f, params = fxattr.functionalize(model)
    xs = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 4])
    with model_unchanged(model):
        got = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, xs, targets)
    want = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, xs, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert model.act.inplace  # the module keeps its flag; only the traced graph is pure


def test_addition_splits_relevance_by_contribution():
    """y = a + b with a = 2x, b = -3x (x scalar 1): the z rule gives a 2y/(-y) share ... by hand:
    y = -1, R = y; R_a = a R / y = 2 * (-1) / (-1) = 2... seeded: R_a = a * R/y = 2, R_b = -3."""

    class Add(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(1, 1, bias=False)
            self.b = nn.Linear(1, 1, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = Add().double()
    with torch.no_grad():
        model.a.weight.fill_(2.0)
        model.b.weight.fill_(-3.0)
    f, params = fxattr.functionalize(model)
    x = torch.ones(1, dtype=torch.float64)
    # relevance y = -1 splits into R_a = 2 and R_b = -3 at the sum; both reach x: 2 - 3 = -1.
    got = fxattr.lrp(f, rule="z")(params, x, 0)
    torch.testing.assert_close(got, torch.tensor([-1.0], dtype=torch.float64))
    # z+ on both linears: R_a = 2 reaches x through w = 2 (all of it), R_b = -3 through w = -3:
    # z+ denominator W+ x = 0 for b, so b's relevance is lost (safe divide) -> only 2 remains.
    got = fxattr.lrp(f, rule="z_plus")(params, x, 0)
    torch.testing.assert_close(got, torch.tensor([2.0], dtype=torch.float64))


def test_batch_norm_is_folded_purely():
    """conv -> BN equals the conv with BN folded in by hand, for every rule; the module is not
    modified, and derivatives reach the BN parameters."""
    model = small_cnn(torch.float64)  # conv -> BN -> ReLU -> ...
    conv, bn = model[0], model[1]
    folded = small_cnn(torch.float64, batch_norm=False)
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded[0].weight.copy_(conv.weight * scale[:, None, None, None])
        folded[0].bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        for i, j in ((4, 3), (7, 6)):  # the remaining conv and linear layers
            folded[j].load_state_dict(model[i].state_dict())
    f, params = fxattr.functionalize(model)
    g, gparams = fxattr.functionalize(folded)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(f(params, x), g(gparams, x))
    with model_unchanged(model):
        for rule in ("z", "epsilon", "alpha_2_beta_1", "z_plus", "flat", "w_square", "gamma"):
            torch.testing.assert_close(fxattr.lrp(f, rule=rule)(params, x, 1),
                                       fxattr.lrp(g, rule=rule)(gparams, x, 1), rtol=1e-10, atol=1e-12)
    floats = {k: v for k, v in params.items() if v.dtype.is_floating_point}
    grads = torch.func.grad(lambda p: fxattr.lrp(f, rule="epsilon")(params | p, x, 1).square().sum())(floats)
    assert grads["1.running_var"].abs().sum() > 0 and grads["1.weight"].abs().sum() > 0


def test_unfoldable_batch_norm_is_a_linear_layer():
    """A batch norm after a concatenation (DenseNet's norm1) is its own linear layer: with zero
    shift it scales, and z on the bias-free net is still gradient x input."""

    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
            self.norm = nn.BatchNorm2d(5)
            self.fc = nn.Linear(5, 2, bias=False)

        def forward(self, x):
            h = torch.cat([x, F.relu(self.conv(x))], 1)
            h = F.relu(self.norm(h))
            return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    torch.manual_seed(0)
    model = Dense().double().eval()
    with torch.no_grad():
        model.norm.running_var.uniform_(0.5, 2)
        model.norm.weight.uniform_(0.5, 2)
    f, params = fxattr.functionalize(model)
    x = torch.randn(2, 4, 4, dtype=torch.float64)
    got = fxattr.lrp(f, rule="z")(params, x, 0)
    torch.testing.assert_close(got, fxattr.input_x_gradient(f)(params, x, 0), rtol=1e-9, atol=1e-12)


# ---- errors -------------------------------------------------------------------------------------

class Cumulative(nn.Module):
    """An op no method has a rule for (a cumulative sum), inside a named submodule."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.block = _CumsumBlock()

    def forward(self, x):
        return self.block(self.q(x)) * 2.0


class _CumsumBlock(nn.Module):
    def forward(self, h):
        return torch.cumsum(h, dim=-1)


def test_op_without_rule_names_the_node_its_module_and_the_explainer():
    f, params = fxattr.functionalize(Cumulative())
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.lrp: no LRP rule for graph node 'cumsum' "
                                                 r"\(function .*cumsum, in module 'block'\).*Supported: convolutions"):
        fxattr.lrp(f, rule="epsilon")
    with pytest.raises(fxattr.FxattrError, match="fxattr.deep_taylor: no LRP rule for graph node 'cumsum'"):
        fxattr.deep_taylor(f)
    with pytest.raises(fxattr.FxattrError, match="fxattr.deeplift: no DeepLIFT rule for graph node 'cumsum'"):
        fxattr.deeplift(f)
    with pytest.raises(fxattr.FxattrError, match="fxattr.patternnet: no PatternNet rule for graph node 'cumsum'"):
        fxattr.patternnet(f)
    # gradient-type methods reverse any op by its vector-Jacobian product
    assert fxattr.guided_backprop(f)(params, torch.randn(4), 0).shape == (4,)


def test_square_of_a_data_tensor_is_not_a_scaling():
    """``h * h`` names one node twice: it is a product of two data tensors, not a linear scaling."""
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x):
            h = self.linear(x)
            return h * h

    f, _ = fxattr.functionalize(Square())
    program = fxattr.graph.Program(f, "test")
    kinds = {node.name: info.kind for node, info in program.nodes.items()}
    assert kinds["mul"] != "scale"

    class Double(nn.Module):  # ``h + h`` still splits relevance (half to each reference)
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 2, bias=False)

        def forward(self, x):
            h = self.linear(x)
            return h + h

    torch.manual_seed(0)
    f, params = fxattr.functionalize(Double().double())
    x = torch.randn(3, dtype=torch.float64)
    relevance = fxattr.lrp(f, rule="z")(params, x, 1)
    w = params["linear.weight"][1]
    torch.testing.assert_close(relevance, 2 * w * x)  # z rule, no bias: R = x * W^T (R_out / z) = 2 w x


def test_argument_errors():
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    with pytest.raises(fxattr.FxattrError, match="exactly one of rule= .* and composite="):
        fxattr.lrp(f)
    with pytest.raises(fxattr.FxattrError, match="exactly one"):
        fxattr.lrp(f, rule="z", composite="epsilon_plus")
    with pytest.raises(fxattr.FxattrError, match=r"rule must be one of .*'z_plus_fast'"):
        fxattr.lrp(f, rule="zplus")
    with pytest.raises(fxattr.FxattrError, match=r"rule 'epsilon' takes epsilon, input_layer_rule; "
                                                 r"got unknown option\(s\) gamma"):
        fxattr.lrp(f, rule="epsilon", gamma=0.1)
    with pytest.raises(fxattr.FxattrError, match="alpha - beta must equal 1"):
        fxattr.lrp(f, rule="alpha_beta", alpha=2, beta=2)
    with pytest.raises(fxattr.FxattrError, match="composite must be one of"):
        fxattr.lrp(f, composite="epsilon_plus_flatt")
    with pytest.raises(fxattr.FxattrError, match="epsilon_gamma_box needs low= and high="):
        fxattr.lrp(f, composite="epsilon_gamma_box")
    with pytest.raises(fxattr.FxattrError, match="until_layer_idx must be an int >= 0"):
        fxattr.lrp(f, composite="sequential_preset_b_flat_until_idx")
    with pytest.raises(fxattr.FxattrError, match="input_layer_rule must be a rule name"):
        fxattr.lrp(f, rule="z", input_layer_rule="nonsense")
    with pytest.raises(fxattr.FxattrError, match="epsilon must be >= 0"):
        fxattr.lrp(f, rule="epsilon", epsilon=-1.0)
    with pytest.raises(fxattr.FxattrError, match="not an nn.Module"):
        fxattr.lrp(model, rule="z")
    with pytest.raises(fxattr.FxattrError, match="seed must be one of"):
        fxattr.guided_backprop(f, seed="ones")
    with pytest.raises(fxattr.FxattrError, match="returned str for layer"):
        fxattr.lrp(f, composite=Composite(lambda layer: "flat"))
    explain = fxattr.lrp(f, rule="epsilon")
    with pytest.raises(fxattr.FxattrError, match="target 7 is out of range"):
        explain(params, torch.randn(3, 8, 8), 7)
    with pytest.raises(fxattr.FxattrError, match="fxattr.lrp: .*looks like a batch|x has shape"):
        fxattr.lrp(fxattr.functionalize(model, input_shape=(3, 8, 8))[0], rule="z")(
            params, torch.randn(2, 3, 8, 8), 0)


def test_input_layer_rule_is_case_insensitive():
    f, params = fxattr.functionalize(small_cnn(torch.float64))
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    a = fxattr.lrp(f, rule="z", input_layer_rule="Flat")(params, x, 0)
    b = fxattr.lrp(f, rule="z", input_layer_rule="flat")(params, x, 0)
    c = fxattr.lrp(f, composite=Composite(lambda layer: rules.flat() if layer.input_layer else None))(
        params, x, 0)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_custom_composite_by_name_type_and_position():
    model = small_cnn(torch.float64)
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    seen = []

    def choose(layer):
        seen.append((layer.kind, layer.name, layer.index, layer.first, layer.last))
        return None

    explain = fxattr.lrp(f, composite=Composite(choose, types={nn.Linear: rules.epsilon(0.25)},
                                                names={"4": rules.z_plus()}))
    kernels = [s for s in seen if s[0] in ("conv", "linear")]
    # layer "4" is chosen by name before the function is asked
    assert kernels == [("conv", "0", 0, True, False), ("linear", "8", 2, False, True)]
    same = fxattr.lrp(f, composite=Composite(kinds={"linear": rules.epsilon(0.25), "conv": rules.z()},
                                             names={"4": rules.z_plus()}))
    torch.testing.assert_close(explain(params, x, 2), same(params, x, 2))


# ---- composition guarantees for every rule and preset ---------------------------------------------

RULE_CONFIGS = [
    ("z", {}), ("z_IB", {}), ("epsilon", {"epsilon": 0.1}), ("epsilon_IB", {}), ("gamma", {}),
    ("alpha_beta", {"alpha": 3}), ("alpha_beta_IB", {"beta": 1}), ("alpha_1_beta_0", {}),
    ("alpha_1_beta_0_IB", {}), ("alpha_2_beta_1", {}), ("alpha_2_beta_1_IB", {}), ("z_plus", {}),
    ("z_plus_fast", {}), ("w_square", {}), ("flat", {}), ("zb", {"low": -3.0, "high": 3.0}),
    ("pass", {}), ("norm", {}),
]
PRESET_CONFIGS = [
    ("sequential_preset_a", {}), ("sequential_preset_b", {}), ("sequential_preset_a_flat", {}),
    ("sequential_preset_b_flat", {}), ("sequential_preset_b_flat_until_idx", {"until_layer_idx": 1}),
    ("epsilon_plus", {}), ("epsilon_plus_flat", {}), ("epsilon_gamma_box", {"low": -3.0, "high": 3.0}),
    ("epsilon_alpha2_beta1", {}), ("epsilon_alpha2_beta1_flat", {}),
]


class PassNet(nn.Module):
    """Shape-preserving layers only, for the pass rule."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def tiny_cnn(dtype=torch.float64):
    """small_cnn's layer kinds on 2x4x4 inputs, for finite differences."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5)).to(dtype)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
        model[1].bias.normal_()
    return model.eval()


def _specs():
    """(name, make(f)) for every rule and preset, and the other methods of the engine."""
    specs = [(f"rule={name}", lambda f, n=name, o=options: fxattr.lrp(f, rule=n, **o))
             for name, options in RULE_CONFIGS]
    specs += [(f"composite={name}", lambda f, n=name, o=options: fxattr.lrp(f, composite=n, **o))
              for name, options in PRESET_CONFIGS]
    specs += [("deep_taylor", fxattr.deep_taylor),
              ("deep_taylor_bounded", lambda f: fxattr.deep_taylor_bounded(f, low=-3.0, high=3.0)),
              ("guided_backprop", fxattr.guided_backprop), ("deconvnet", fxattr.deconvnet)]
    return specs


SPECS = _specs()
IDS = [name for name, _ in SPECS]


def _explainer(index, dtype=torch.float64, build=small_cnn):
    name, make = SPECS[index]
    model = PassNet().to(dtype).eval() if name == "rule=pass" else build(dtype)
    f, _ = fxattr.functionalize(model)
    return name, model, make(f)


def _inputs(model, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (5,) if isinstance(model, PassNet) else ((3, 8, 8) if model[0].in_channels == 3 else (2, 4, 4))
    xs = torch.randn(n, *shape, generator=gen, dtype=dtype)
    targets = torch.randint(0, 5 if isinstance(model, PassNet) else 5, (n,), generator=gen)
    return xs, targets


def _params(model):
    f, params = fxattr.functionalize(model)
    return params


@pytest.mark.parametrize("index", range(len(SPECS)), ids=IDS)
def test_vmap_equals_loop_and_model_unchanged(index, dtype):
    name, model, explain = _explainer(index, dtype)
    params = _params(model)
    xs, targets = _inputs(model, 3, dtype)
    scale = float(torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets).abs().max())
    # float32: batched and single-example convolutions round differently, and unstabilised rules
    # (z_IB: W x alone, near zero where the folded bias dominated) amplify that near zero
    atol = 1e-4 * scale if dtype == torch.float32 else 1e-12
    with model_unchanged(model):
        out = assert_vmap_equals_loop(explain, params, xs, targets,
                                      rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=atol)
    assert out.dtype == dtype and torch.isfinite(out).all(), name
    assert out.abs().sum() > 0, name


@pytest.mark.parametrize("index", range(len(SPECS)), ids=IDS)
def test_second_order(index):
    name, model, explain = _explainer(index, torch.float64, tiny_cnn)
    params = _params(model)
    xs, targets = _inputs(model, 1, torch.float64, seed=3)
    # a kernel, a bias, the batch norm's statistics and affine weight, the last layer
    names = [k for k in ("0.weight", "0.bias", "1.running_var", "1.weight", "4.bias", "8.weight",
                         "a.weight", "b.bias") if k in params]
    assert_second_order(explain, params, xs[0], int(targets[0]), param_names=names)


def test_second_order_of_the_explanation_itself_gradgrad():
    """One order more (gradgradcheck) for the two presets the issue benchmarks."""
    for composite in ("epsilon_plus_flat", "epsilon_alpha2_beta1"):
        model = tiny_cnn()
        f, params = fxattr.functionalize(model)
        x = torch.randn(2, 4, 4, dtype=torch.float64)
        assert_second_order(fxattr.lrp(f, composite=composite), params, x, 1,
                            param_names=["0.weight", "8.bias"], gradgrad=True)


def test_compile_captures_every_rule_and_preset_in_one_graph():
    """dynamo captures every rule, preset and method in ONE graph (fullgraph) and the AOT-traced
    graph computes what eager does; inductor's code generation is checked on representatives
    below (compiling all 31 with inductor takes ~10 minutes on 2 cores)."""
    dtype = torch.float32
    model = small_cnn(dtype)
    f, params = fxattr.functionalize(model)
    # every explainer on ONE model, so that one params dict serves them all
    explainers = [make(f) for name, make in SPECS if name != "rule=pass"]

    def all_of_them(p, x, t):
        return torch.stack([e(p, x, t) for e in explainers])

    xs, targets = _inputs(model, 4, dtype)
    batched = torch.vmap(all_of_them, in_dims=(None, 0, 0))
    with model_unchanged(model):
        eager = batched(params, xs, targets)
        torch._dynamo.reset()
        compiled = torch.compile(batched, fullgraph=True, backend="aot_eager")(params, xs, targets)
    assert compiled.shape == (4, len(SPECS) - 1, 3, 8, 8)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_equals_eager_representatives():
    model = small_cnn(torch.float32)
    f, params = fxattr.functionalize(model)
    explainers = [fxattr.lrp(f, composite="epsilon_plus_flat"), fxattr.lrp(f, rule="alpha_2_beta_1"),
                  fxattr.lrp(f, composite="epsilon_gamma_box", low=-3.0, high=3.0),
                  fxattr.guided_backprop(f)]

    def some(p, x, t):
        return torch.stack([e(p, x, t) for e in explainers])

    xs, targets = _inputs(model, 4, torch.float32)
    with model_unchanged(model):
        assert_compile_equals_eager(some, params, xs, targets, fullgraph=True)


def test_compile_functional_model():
    model = _functional(torch.float32)
    f, params = fxattr.functionalize(model)
    xs = torch.randn(3, 3, 4, 4)
    targets = torch.tensor([0, 3, 4])
    assert_compile_equals_eager(fxattr.lrp(f, composite="epsilon_alpha2_beta1_flat"), params, xs,
                                targets, fullgraph=True)


def test_tuple_and_dict_inputs_and_callable_targets():
    from tests.models import TwoInputs
    torch.manual_seed(0)
    model = TwoInputs().double().eval()
    f, params = fxattr.functionalize(model)
    x, y = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    rx, ry = fxattr.lrp(f, rule="epsilon")(params, (x, y), 1)
    assert rx.shape == x.shape and ry.shape == y.shape
    # relevance of a callable target: output * d target / d output
    both = fxattr.lrp(f, rule="epsilon")(params, (x, y), lambda out: out.sum())
    one = fxattr.lrp(f, rule="epsilon")(params, (x, y), 0)
    two = fxattr.lrp(f, rule="epsilon")(params, (x, y), 1)
    torch.testing.assert_close(both[0], one[0] + two[0])
    fd, pd = fxattr.functionalize(TwoInputsDict().double().eval())
    out = fxattr.lrp(fd, rule="z")(pd, {"x": x, "y": y}, 0)
    assert set(out) == {"x", "y"}


class TwoInputsDict(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(2, 2)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_guided_backprop_and_deconvnet_by_hand():
    """Linear(2,2) -> ReLU -> Linear(2,1): by hand, with one hidden unit off."""
    l1, l2 = nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        l2.weight.copy_(torch.tensor([[-1.0, 2.0]]))
    f, params = fxattr.functionalize(nn.Sequential(l1, nn.ReLU(), l2).double())
    x = torch.tensor([2.0, 1.0], dtype=torch.float64)  # hidden (2, -1) -> relu (2, 0), y = -2
    # gradient signal at the hidden layer: (-1, 2); guided: relu'(z) * relu(g) = (0, 0)
    torch.testing.assert_close(fxattr.guided_backprop(f, seed="one")(params, x, 0),
                               torch.zeros(2, dtype=torch.float64))
    # deconvnet: relu(g) = (0, 2) whatever z, then W1^T: (0, -2); seeded with y = -2: (0, 4)
    torch.testing.assert_close(fxattr.deconvnet(f, seed="one")(params, x, 0),
                               torch.tensor([0.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(fxattr.deconvnet(f)(params, x, 0),
                               torch.tensor([2.0, 0.0], dtype=torch.float64))


class _Pooled(nn.Module):
    """Conv -> ReLU -> max pool (module or functional form) -> linear; overlapping pool windows."""

    def __init__(self, dims: int, functional: bool, **pool):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(2, 3, 3, padding=1)
        self.pool = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims](**pool)
        self.pool_fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims]
        self.settings = pool
        self.functional = functional
        self.fc = nn.LazyLinear(4)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = self.pool_fn(h, **self.settings) if self.functional else self.pool(h)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("dims,shape,pool", [
    (1, (2, 11), {"kernel_size": 3, "stride": 2, "padding": 1}),
    (2, (2, 7, 6), {"kernel_size": 3, "stride": 2, "padding": 1}),
    (2, (2, 7, 7), {"kernel_size": 2, "stride": 2, "ceil_mode": True}),
    (2, (2, 9, 9), {"kernel_size": 2, "stride": 1, "dilation": 2}),
    (3, (2, 5, 5, 5), {"kernel_size": 3, "stride": 2, "padding": 1}),
], ids=["1d", "2d_overlap", "2d_ceil", "2d_dilated", "3d"])
def test_module_max_pool_reverse_by_indices_equals_its_vjp(dims, shape, pool):
    """nn.MaxPoolNd keeps the forward's winner indices and scatters relevance to them; the
    functional form (reversed by the pooling's vjp) gives the same numbers, overlapping windows
    (a winner shared by two windows) included."""
    torch.manual_seed(0)
    by_module = _Pooled(dims, False, **pool).double()
    xs = torch.randn((3,) + shape, dtype=torch.float64)
    by_module(xs)  # materialise the lazy linear layer (test-side set-up)
    by_function = _Pooled(dims, True, **pool).double()
    by_function.load_state_dict(by_module.state_dict())
    targets = torch.tensor([0, 2, 3])
    for method in (lambda f: fxattr.lrp(f, rule="epsilon"), lambda f: fxattr.lrp(f, composite="epsilon_plus"),
                   fxattr.guided_backprop):
        got, want = [torch.vmap(method(f), in_dims=(None, 0, 0))(p, xs, targets)
                     for f, p in (fxattr.functionalize(m.eval()) for m in (by_module, by_function))]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got.abs().sum() > 0


class _Cumulative(nn.Module):
    """A bias-free ReLU net with a cumulative sum (a linear op no method knows) in a submodule."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5, bias=False)
        self.block = _CumsumBlock()
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(F.relu(self.block(F.relu(self.fc(x)))))


def test_registered_operation_kind_is_reversed_by_each_method():
    """An operation kind added to the catalogue (``fxattr.graph.register``) with reverse functions
    (``register_reverse``) is classified and reversed by LRP and DeepLIFT (the z rule and the
    gradient for a linear op: both equal gradient x input on a bias-free ReLU net with a zero
    baseline); guided backprop needs no registration (the vjp); before registration the error
    names the node and its module."""
    from fxattr.graph import OpKind, register, unregister
    from fxattr.propagation._engine import REVERSE, register_reverse

    torch.manual_seed(0)
    model = _Cumulative().double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])
    with pytest.raises(fxattr.FxattrError, match=r"no LRP rule for graph node 'cumsum' .*in module 'block'"):
        fxattr.lrp(f, rule="z")

    def z_rule(view, rel):  # a linear op: relevance in proportion to the contributions
        _, vjp = torch.func.vjp(view.fn, *view.inputs)
        out = view.output  # >= 0 here (a cumsum of ReLU outputs): 0 only where every term is 0
        return tuple(v * g for v, g in zip(view.inputs, vjp(rel / torch.where(out == 0, 1.0, out))))

    def multiplier(view, signal):  # a linear op: delta out = J delta in, the gradient
        _, vjp = torch.func.vjp(view.fn, *view.inputs)
        assert view.reference_inputs is not None
        return vjp(signal)

    register(OpKind("cumulative", functions={torch.cumsum}))
    register_reverse("lrp", "cumulative", z_rule)
    register_reverse("deeplift", "cumulative", multiplier)
    try:
        want = torch.vmap(fxattr.input_x_gradient(f), in_dims=(None, 0, 0))(params, x, t)
        lrp = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, x, t)
        torch.testing.assert_close(lrp, want)
        deeplift = torch.vmap(fxattr.deeplift(f, baseline=0.0), in_dims=(None, 0, 0))(params, x, t)
        torch.testing.assert_close(deeplift, want)
        guided = torch.vmap(fxattr.guided_backprop(f, seed="one"), in_dims=(None, 0, 0))(params, x, t)
        assert guided.shape == x.shape
    finally:
        unregister("cumulative")
        REVERSE["lrp"].pop("cumulative", None)
        REVERSE["deeplift"].pop("cumulative", None)
