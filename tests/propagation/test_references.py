"""fxattr against iNNvestigate: its single-layer reference attributions, and its bias and sign
conventions re-derived in matrix form.

Part 1 loads iNNvestigate's own reference files (``<analyzer>.npz``, kept outside the repository:
``$FXATTR_INNVESTIGATE_REFS`` or ``<repo>/../shared/innvestigate-references``; the tests skip without
them), rebuilds each one-layer Keras model in torch (NHWC -> NCHW, HWIO -> OIHW, Flatten in NHWC
order) and checks every analyzer. The same files also check the matrix-form oracle of part 2, so
the oracle is pinned to iNNvestigate itself.

Those files have zero biases and inputs in [0, 1). Part 2 checks what they cannot see, on random
biases and signed inputs in float64, against the oracle written out below from iNNvestigate's
``relevance_rule.py``: alpha-beta puts the WHOLE bias in both the activator and the inhibitor
denominator (b+ and b- ride with W+ and W-), ``_IB`` drops it; epsilon is ``z + eps * sign(z)``
with ``sign(0) = +1``; ``z_plus_fast`` applies W+ to the raw (signed) input; ``w_square`` and
``flat`` ignore the bias; presets put alpha-beta on convolutions and epsilon 0.1 on dense layers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxattr

# ---------------------------------------------------------------------------------------------
# Matrix-form oracle (iNNvestigate semantics). A layer is a matrix W (out, in) over flattened
# vectors, a bias b, the structural connectivity M (the layer with every weight set to 1, for
# the flat rule) and whether a ReLU follows. Relevance R is a vector over the layer's outputs.
# ---------------------------------------------------------------------------------------------


def _safe(z):
    # iNNvestigate's safe_divide: only exact zeros are replaced (by K.epsilon() = 1e-7).
    return torch.where(z == 0, torch.full_like(z, 1e-7), z)


def rule_z(W, b, M, x, R, *, bias=True):
    z = W @ x + (b if bias else 0)
    return x * (W.T @ (R / _safe(z)))


def rule_epsilon(W, b, M, x, R, *, epsilon=1e-7, bias=True):
    z = W @ x + (b if bias else 0)
    sign = torch.where(z >= 0, 1.0, -1.0).to(z)  # sign(0) = +1
    return x * (W.T @ (R / (z + epsilon * sign)))


def rule_w_square(W, b, M, x, R):
    W2 = W * W
    return W2.T @ (R / _safe(W2 @ torch.ones_like(x)))


def rule_flat(W, b, M, x, R):
    return M.T @ (R / _safe(M @ torch.ones_like(x)))


def rule_alpha_beta(W, b, M, x, R, *, alpha, beta, bias=True):
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    bb = b if bias else torch.zeros_like(b)
    # The kernel and the bias are split alike (b+ with W+, b- with W-), and both layers are
    # summed: the whole bias lands in the activator AND in the inhibitor denominator.
    za = Wp @ xp + Wn @ xn + bb
    sa = R / _safe(za)
    activator = xp * (Wp.T @ sa) + xn * (Wn.T @ sa)
    if beta == 0:
        return activator
    zi = Wn @ xp + Wp @ xn + bb
    si = R / _safe(zi)
    inhibitor = xp * (Wn.T @ si) + xn * (Wp.T @ si)
    return alpha * activator - beta * inhibitor


def rule_z_plus_fast(W, b, M, x, R):
    Wp = W.clamp(min=0)
    return x * (Wp.T @ (R / _safe(Wp @ x)))  # the raw x, negative entries included


def rule_bounded(W, b, M, x, R, *, low, high):
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    lo, hi = torch.full_like(x, low), torch.full_like(x, high)
    s = R / _safe(W @ x - Wp @ lo - Wn @ hi)
    return x * (W.T @ s) - lo * (Wp.T @ s) - hi * (Wn.T @ s)


def rule_gradient(W, b, M, x, R):
    return W.T @ R


RULES = {
    "z": rule_z,
    "z_IB": lambda *a: rule_z(*a, bias=False),
    "epsilon": rule_epsilon,
    "epsilon_IB": lambda *a: rule_epsilon(*a, bias=False),
    "epsilon_0.1": lambda *a: rule_epsilon(*a, epsilon=0.1),
    "w_square": rule_w_square,
    "flat": rule_flat,
    "alpha_1_beta_0": lambda *a: rule_alpha_beta(*a, alpha=1, beta=0),
    "alpha_1_beta_0_IB": lambda *a: rule_alpha_beta(*a, alpha=1, beta=0, bias=False),
    "alpha_2_beta_1": lambda *a: rule_alpha_beta(*a, alpha=2, beta=1),
    "alpha_2_beta_1_IB": lambda *a: rule_alpha_beta(*a, alpha=2, beta=1, bias=False),
    "z_plus": lambda *a: rule_alpha_beta(*a, alpha=1, beta=0, bias=False),
    "z_plus_fast": rule_z_plus_fast,
    "gradient": rule_gradient,
}


class Layer:
    """One layer of the oracle: ``kind`` is "dense", "conv", "avgpool" or "maxpool"."""

    def __init__(self, kind, fn, kernel=None, bias=None, relu=False, n_in=None, activation=None):
        self.kind, self.fn, self.kernel, self.bias, self.relu = kind, fn, kernel, bias, relu
        self.activation = activation  # an element-wise activation other than ReLU (relevance passes)

    def matrices(self, x):
        """(W, b, M) of the layer at input x (max pooling: its winner-selection matrix at x)."""
        if self.kind != "maxpool" and getattr(self, "_cached", None) is not None:
            return self._cached  # a linear layer's matrices do not depend on x
        if self.kind == "maxpool":
            W = self.fn(x, None)  # the selection matrix (out, in) of the winners at x
            return W, torch.zeros(W.shape[0], dtype=x.dtype), W
        W = torch.func.jacrev(lambda v: self.fn(v, self.kernel))(x)
        if self.kernel is None:
            M = (W != 0).to(W)
        else:
            M = torch.func.jacrev(lambda v: self.fn(v, torch.ones_like(self.kernel)))(x)
        b = self.bias if self.bias is not None else torch.zeros(W.shape[0], dtype=x.dtype)
        self._cached = (W, b, M)
        return W, b, M

    def forward(self, x):
        if self.kind == "maxpool":
            return self.fn(x, None) @ x
        W, b, _ = self.matrices(x)
        z = W @ x + b
        if self.relu:
            return z.clamp(min=0)
        if self.activation is not None:
            return self.activation(z)
        return z


def oracle(layers, rules, x, target, *, mode="lrp"):
    """Relevance at the (flattened) input for ``target``, seeded with the target's value.

    ``rules[i]`` is the rule of layer i (a key of ``RULES`` or a callable). ``mode`` is "lrp",
    "guided_backprop" or "deconvnet" (ReLU layers filter the reverse signal; kernels use the
    gradient).
    """
    inputs = [x]
    for layer in layers:
        inputs.append(layer.forward(inputs[-1]))
    out = inputs[-1]
    R = torch.zeros_like(out)
    R[target] = out[target]
    for layer, rule, xin in zip(reversed(layers), reversed(rules), reversed(inputs[:-1])):
        W, b, M = layer.matrices(xin)
        if mode == "lrp":
            # ReLU (and any element-wise activation) passes relevance through unchanged.
            rule_fn = RULES[rule] if isinstance(rule, str) else rule
            R = rule_fn(W, b, M, xin, R)
        else:
            if layer.relu:
                R = R.clamp(min=0)
                if mode == "guided_backprop":
                    R = R * ((W @ xin + b) > 0).to(R)
            R = W.T @ R
    return R


# ---------------------------------------------------------------------------------------------
# Part 1: iNNvestigate's single-layer reference files.
# ---------------------------------------------------------------------------------------------

ENV = "FXATTR_INNVESTIGATE_REFS"
REPO = Path(__file__).resolve().parents[2]


def _refs_dir() -> Path | None:
    candidates = [os.environ.get(ENV), REPO.parent / "shared" / "innvestigate-references"]
    for c in candidates:
        if c and Path(c).is_dir() and any(Path(c).glob("*.npz")):
            return Path(c)
    return None


REFS = _refs_dir()
LAYERS = ("Dense", "Dense_relu", "Conv2D", "Conv2D_relu", "AveragePooling2D", "MaxPooling2D")

# analyzer file -> fxattr explainer (built lazily so one missing method fails only its tests).
EXPLAINERS = {
    "Gradient": lambda f: fxattr.gradient(f),
    "InputTimesGradient": lambda f: fxattr.input_x_gradient(f),
    "IntegratedGradients": lambda f: fxattr.integrated_gradients(f, steps=64, method="riemann_left"),
    "GuidedBackprop": lambda f: fxattr.guided_backprop(f),
    "Deconvnet": lambda f: fxattr.deconvnet(f),
    "DeepTaylor": lambda f: fxattr.deep_taylor(f),
    "BoundedDeepTaylor": lambda f: fxattr.deep_taylor_bounded(f, low=-128, high=128),
    "LRPZ": lambda f: fxattr.lrp(f, rule="z"),
    "LRPZIgnoreBias": lambda f: fxattr.lrp(f, rule="z_IB"),
    "LRPEpsilon": lambda f: fxattr.lrp(f, rule="epsilon"),
    "LRPEpsilonIgnoreBias": lambda f: fxattr.lrp(f, rule="epsilon_IB"),
    "LRPWSquare": lambda f: fxattr.lrp(f, rule="w_square"),
    "LRPFlat": lambda f: fxattr.lrp(f, rule="flat"),
    "LRPZPlus": lambda f: fxattr.lrp(f, rule="z_plus"),
    "LRPZPlusFast": lambda f: fxattr.lrp(f, rule="z_plus_fast"),
    "LRPAlpha1Beta0": lambda f: fxattr.lrp(f, rule="alpha_1_beta_0"),
    "LRPAlpha1Beta0IgnoreBias": lambda f: fxattr.lrp(f, rule="alpha_1_beta_0_IB"),
    "LRPAlpha2Beta1": lambda f: fxattr.lrp(f, rule="alpha_2_beta_1"),
    "LRPAlpha2Beta1IgnoreBias": lambda f: fxattr.lrp(f, rule="alpha_2_beta_1_IB"),
    "LRPSequentialPresetA": lambda f: fxattr.lrp(f, composite="sequential_preset_a"),
    "LRPSequentialPresetB": lambda f: fxattr.lrp(f, composite="sequential_preset_b"),
    "LRPSequentialPresetAFlat": lambda f: fxattr.lrp(f, composite="sequential_preset_a_flat"),
    "LRPSequentialPresetBFlat": lambda f: fxattr.lrp(f, composite="sequential_preset_b_flat"),
    "LRPZ_Flat_input_layer_rule": lambda f: fxattr.lrp(f, rule="z", input_layer_rule="flat"),
    "LRPZ_boxed_input_layer_rule": lambda f: fxattr.lrp(f, rule="z", input_layer_rule=(-10, 10)),
}

# The rule iNNvestigate applies to the kernel layer of each one-layer model (all of them are the
# input layer, so input_layer_rule and the *_flat presets apply), by analyzer and layer.
_KERNEL_RULE = {
    "LRPZ": "z", "LRPZIgnoreBias": "z_IB", "LRPEpsilon": "epsilon", "LRPEpsilonIgnoreBias": "epsilon_IB",
    "LRPWSquare": "w_square", "LRPFlat": "flat", "LRPZPlus": "z_plus", "LRPZPlusFast": "z_plus_fast",
    "LRPAlpha1Beta0": "alpha_1_beta_0", "LRPAlpha1Beta0IgnoreBias": "alpha_1_beta_0_IB",
    "LRPAlpha2Beta1": "alpha_2_beta_1", "LRPAlpha2Beta1IgnoreBias": "alpha_2_beta_1_IB",
    "LRPSequentialPresetAFlat": "flat", "LRPSequentialPresetBFlat": "flat",
    "LRPZ_Flat_input_layer_rule": "flat",
    "LRPZ_boxed_input_layer_rule": lambda *a: rule_bounded(*a, low=-10, high=10),
    "BoundedDeepTaylor": lambda *a: rule_bounded(*a, low=-128, high=128),
}


def _kernel_rule(analyzer, layer_name):
    is_conv = layer_name.startswith("Conv")
    if analyzer == "LRPSequentialPresetA":
        return "alpha_1_beta_0" if is_conv else "epsilon_0.1"
    if analyzer == "LRPSequentialPresetB":
        return "alpha_2_beta_1" if is_conv else "epsilon_0.1"
    if analyzer == "DeepTaylor":
        # iNNvestigate's DeepTaylor: z+ (alpha 1 beta 0, no bias) on every kernel layer (its
        # w_square branch is for layers without an activation attribute; Dense/Conv2D have one,
        # "linear" included, and the reference files agree).
        return "z_plus"
    return _KERNEL_RULE[analyzer]


def _pool_rule(analyzer, layer_name):
    if layer_name == "MaxPooling2D" or analyzer in ("DeepTaylor", "BoundedDeepTaylor"):
        return "gradient"  # winner-takes-all; DeepTaylor also reverses average pooling by its gradient
    return "z"  # LRP: average pooling under the z rule


class ChannelsLast(nn.Module):
    """NCHW -> NHWC, so that a following Flatten runs in Keras' order."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def keras_model(layer_name, data, dtype=torch.float64):
    """The torch twin of iNNvestigate's one-layer model ``layer_name`` (NCHW input)."""
    relu = [nn.ReLU()] if layer_name.endswith("_relu") else []
    if layer_name.startswith("Dense"):
        kernel, bias = data[f"{layer_name}__w0"], data[f"{layer_name}__w1"]
        lin = nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(kernel.T.copy()))
            lin.bias.copy_(torch.from_numpy(bias))
        model = nn.Sequential(ChannelsLast(), lin, *relu, nn.Flatten())
    elif layer_name.startswith("Conv2D"):
        kernel, bias = data[f"{layer_name}__w0"], data[f"{layer_name}__w1"]
        conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2])
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(bias))
        model = nn.Sequential(conv, *relu, ChannelsLast(), nn.Flatten())
    elif layer_name == "AveragePooling2D":
        model = nn.Sequential(nn.AvgPool2d(2), ChannelsLast(), nn.Flatten())
    elif layer_name == "MaxPooling2D":
        model = nn.Sequential(nn.MaxPool2d(2), ChannelsLast(), nn.Flatten())
    else:
        raise AssertionError(layer_name)
    return model.to(dtype).eval()


def oracle_layer(layer_name, data, dtype=torch.float64):
    """The same one-layer model as an oracle ``Layer`` on flattened NCHW vectors."""
    shape = data["input"].shape[1:]
    C, H, Wd = shape[2], shape[0], shape[1]

    def as_img(v):
        return v.reshape(C, H, Wd)

    relu = layer_name.endswith("_relu")
    if layer_name.startswith("Dense"):
        kernel = torch.from_numpy(data[f"{layer_name}__w0"]).to(dtype)

        def fn(v, k):
            return (as_img(v).permute(1, 2, 0) @ k).reshape(-1)

        bias = torch.from_numpy(data[f"{layer_name}__w1"]).to(dtype).repeat(H * Wd)
        return Layer("dense", fn, kernel, bias, relu)
    if layer_name.startswith("Conv2D"):
        kernel = torch.from_numpy(data[f"{layer_name}__w0"].transpose(3, 2, 0, 1).copy()).to(dtype)
        b = torch.from_numpy(data[f"{layer_name}__w1"]).to(dtype)

        def fn(v, k):
            return torch.nn.functional.conv2d(as_img(v)[None], k)[0].permute(1, 2, 0).reshape(-1)

        n_pix = (H - kernel.shape[2] + 1) * (Wd - kernel.shape[3] + 1)
        return Layer("conv", fn, kernel, b.repeat(n_pix), relu)
    if layer_name == "AveragePooling2D":
        def avg_fn(v, k):
            return torch.nn.functional.avg_pool2d(as_img(v)[None], 2)[0].permute(1, 2, 0).reshape(-1)

        return Layer("avgpool", avg_fn)

    def max_selection(v, k):
        # One-hot rows picking each 2x2 window's winner, rows in Keras' channels-last order.
        _, idx = torch.nn.functional.max_pool2d(as_img(v)[None], 2, return_indices=True)
        flat = (idx[0] + torch.arange(C)[:, None, None] * H * Wd).permute(1, 2, 0).reshape(-1)
        S = torch.zeros(flat.numel(), v.numel(), dtype=v.dtype)
        S[torch.arange(flat.numel()), flat] = 1.0
        return S

    return Layer("maxpool", max_selection)


@functools.lru_cache(maxsize=None)
def _load(analyzer):
    if REFS is None:
        pytest.skip(f"iNNvestigate references not found (set {ENV} or provide ../shared/innvestigate-references)")
    path = REFS / f"{analyzer}.npz"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(torch.float64)


def _assert_matches(got, ref, rtol=1e-4, what="", floor=1e-6):
    # rtol 1e-4 elementwise; the absolute floor (1e-6 of the largest entry) only covers entries
    # that cancel to ~0 in Keras' float32 arithmetic.
    atol = floor * float(ref.abs().max())
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


LRP_ANALYZERS = sorted(set(EXPLAINERS) - {"Gradient", "InputTimesGradient", "IntegratedGradients"})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("analyzer", sorted(EXPLAINERS))
def test_innvestigate_reference(analyzer, layer_name, dtype):
    data = _load(analyzer)
    model = keras_model(layer_name, data, dtype)
    f, params = fxattr.functionalize(model)
    x = _nchw(data["input"]).to(dtype)
    out_ref = torch.from_numpy(data[f"{layer_name}__output"]).to(torch.float64)
    out = torch.vmap(f, in_dims=(None, 0))(params, x)
    assert out.dtype == dtype
    # float32 (Keras' own precision): the absolute floor covers float32 rounding of ~30-term sums.
    floor = 1e-6 if dtype == torch.float64 else 1e-5
    _assert_matches(out.double(), out_ref, what=f"{analyzer}/{layer_name} model output", floor=floor)
    target = out_ref.argmax(1)  # iNNvestigate explains the max neuron of the flattened output
    explain = EXPLAINERS[analyzer](f)
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, target)
    assert got.dtype == dtype
    ref = _nchw(data[f"{layer_name}__attribution"])
    _assert_matches(got.double(), ref, what=f"{analyzer}/{layer_name}", floor=floor)


@pytest.mark.parametrize("layer_name", LAYERS)
@pytest.mark.parametrize("analyzer", LRP_ANALYZERS)
def test_oracle_reproduces_innvestigate(analyzer, layer_name):
    """The matrix-form oracle of part 2 reproduces iNNvestigate's files (so it can be trusted
    where the files are silent)."""
    data = _load(analyzer)
    layer = oracle_layer(layer_name, data)
    xs = _nchw(data["input"])
    is_pool = layer.kernel is None
    if analyzer == "GuidedBackprop" or analyzer == "Deconvnet":
        mode, rule = analyzer.lower().replace("guidedbackprop", "guided_backprop"), None
    else:
        mode = "lrp"
        rule = _pool_rule(analyzer, layer_name) if is_pool else _kernel_rule(analyzer, layer_name)
    got = []
    for xi in xs:
        v = xi.reshape(-1)
        target = int(layer.forward(v).argmax())
        got.append(oracle([layer], [rule], v, target, mode=mode).reshape(xi.shape))
    _assert_matches(torch.stack(got), _nchw(data[f"{layer_name}__attribution"]),
                    what=f"oracle {analyzer}/{layer_name}")


@pytest.mark.parametrize("layer_name", LAYERS)
def test_innvestigate_smoothgrad(layer_name):
    """SmoothGrad: 64 copies with absolute noise N(0, 1) (iNNvestigate's default), compared with
    iNNvestigate's own tolerance for its random reference (atol 0.2, rtol 0.25). fxattr averages
    more copies so that its own noise is small against the reference's."""
    data = _load("SmoothGrad")
    f, params = fxattr.functionalize(keras_model(layer_name, data))
    x = _nchw(data["input"])
    target = torch.from_numpy(data[f"{layer_name}__output"]).argmax(1)
    explain = fxattr.smoothgrad(f, samples=256, sigma=1.0, relative=False)
    torch.manual_seed(0)
    got = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, x, target)
    ref = _nchw(data[f"{layer_name}__attribution"])
    torch.testing.assert_close(got, ref, rtol=0.25, atol=0.2)
    # The tolerance is loose; the sign pattern on the support must still agree where the
    # reference is clearly non-zero.
    big = ref.abs() > 0.3
    assert torch.equal(torch.sign(got[big]), torch.sign(ref[big]))


# ---------------------------------------------------------------------------------------------
# Part 2: biases and signed inputs (no reference file can see these), float64.
# ---------------------------------------------------------------------------------------------

torch_dtype = torch.float64


def _linear(n_in, n_out, gen):
    lin = nn.Linear(n_in, n_out).to(torch_dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen, dtype=torch_dtype))
        lin.bias.copy_(torch.randn(n_out, generator=gen, dtype=torch_dtype))
    return lin


def _conv(c_in, c_out, k, gen):
    conv = nn.Conv2d(c_in, c_out, k).to(torch_dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch_dtype) / k)
        conv.bias.copy_(torch.randn(c_out, generator=gen, dtype=torch_dtype))
    return conv


def _dense_layer(lin, relu):
    def fn(v, k):
        return k @ v
    return Layer("dense", fn, lin.weight.detach(), lin.bias.detach(), relu)


def _conv_layer(conv, in_shape, relu):
    def fn(v, k):
        return torch.nn.functional.conv2d(v.reshape(in_shape)[None], k)[0].reshape(-1)
    with torch.no_grad():
        n_pix = conv(torch.zeros(1, *in_shape, dtype=torch_dtype)).shape[-1] ** 2
    return Layer("conv", fn, conv.weight.detach(), conv.bias.detach().repeat_interleave(n_pix), relu)


@pytest.fixture
def mlp():
    """Linear(6, 5) -> ReLU -> Linear(5, 4), random weights and biases; the oracle's twin."""
    gen = torch.Generator().manual_seed(3)
    l1, l2 = _linear(6, 5, gen), _linear(5, 4, gen)
    model = nn.Sequential(l1, nn.ReLU(), l2).eval()
    x = torch.randn(8, 6, generator=gen, dtype=torch_dtype)
    return model, [_dense_layer(l1, True), _dense_layer(l2, False)], x


@pytest.fixture
def convnet():
    """Conv2d(2, 3, 3) -> ReLU -> Flatten -> Linear(48, 4) on signed 2x6x6 inputs, with biases."""
    gen = torch.Generator().manual_seed(5)
    conv, lin = _conv(2, 3, 3, gen), _linear(3 * 4 * 4, 4, gen)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), lin).eval()
    x = torch.randn(6, 2, 6, 6, generator=gen, dtype=torch_dtype)
    return model, [_conv_layer(conv, (2, 6, 6), True), _dense_layer(lin, False)], x


def _targets(model, x):
    # Explain a positive output in each example (the largest), so value seeding is non-trivial.
    with torch.no_grad():
        return model(x).argmax(1)


def _oracle_batch(layers, rules, x, targets, mode="lrp"):
    return torch.stack([oracle(layers, rules, xi.reshape(-1), int(t), mode=mode).reshape(xi.shape)
                        for xi, t in zip(x, targets)])


def _fx_batch(model, make, x, targets):
    f, params = fxattr.functionalize(model)
    return torch.vmap(make(f), in_dims=(None, 0, 0))(params, x, targets)


SINGLE_RULES = ["z", "z_IB", "epsilon", "epsilon_IB", "w_square", "flat", "alpha_1_beta_0",
                "alpha_1_beta_0_IB", "alpha_2_beta_1", "alpha_2_beta_1_IB", "z_plus", "z_plus_fast"]


@pytest.mark.parametrize("net", ["mlp", "convnet"])
@pytest.mark.parametrize("rule", SINGLE_RULES)
def test_rule_with_bias_and_signed_input(rule, net, request):
    model, layers, x = request.getfixturevalue(net)
    targets = _targets(model, x)
    got = _fx_batch(model, lambda f: fxattr.lrp(f, rule=rule), x, targets)
    want = _oracle_batch(layers, [rule] * len(layers), x, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_bias_conventions_really_differ(mlp, convnet):
    """Guards the test above against being vacuous: on these nets every bias convention changes
    the answer (else a rule ignoring/splitting the bias wrongly could still pass)."""
    for model, layers, x in (mlp, convnet):
        t = _targets(model, x)
        for with_bias, without in [("z", "z_IB"), ("epsilon", "epsilon_IB"),
                                   ("alpha_1_beta_0", "alpha_1_beta_0_IB"),
                                   ("alpha_2_beta_1", "alpha_2_beta_1_IB"),
                                   ("alpha_1_beta_0_IB", "z_plus_fast")]:
            a = _oracle_batch(layers, [with_bias] * len(layers), x, t)
            b = _oracle_batch(layers, [without] * len(layers), x, t)
            assert (a - b).abs().max() > 1e-3 * a.abs().max(), (with_bias, without)
        # zennit's alpha-beta (b+ only in the activator, b- only in the inhibitor) differs too.
        zen = _oracle_batch(layers, [_zennit_style_alpha2_beta1] * len(layers), x, t)
        inn = _oracle_batch(layers, ["alpha_2_beta_1"] * len(layers), x, t)
        assert (zen - inn).abs().max() > 1e-3 * inn.abs().max()


def _zennit_style_alpha2_beta1(W, b, M, x, R):
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    sa = R / _safe(Wp @ xp + Wn @ xn + b.clamp(min=0))
    si = R / _safe(Wn @ xp + Wp @ xn + b.clamp(max=0))
    return 2 * (xp * (Wp.T @ sa) + xn * (Wn.T @ sa)) - (xp * (Wn.T @ si) + xn * (Wp.T @ si))


def test_alpha_beta_whole_bias_by_hand():
    """One neuron, written out: w = (2, -1), b = 0.5, x = (1, 2), explained output y = 0.5.

    activator z+ = 2*1 + 0.5 = 2.5 (W+ x+ plus the whole bias), inhibitor z- = -1*2 + 0.5 = -1.5.
    alpha_2_beta_1: R = 2 * (2*1, 0) * y/2.5 - 1 * (0, -1*2) * y/(-1.5) = (0.8, -2/3).
    _IB: z+ = 2, z- = -2: R = 2 * (2, 0) * 0.5/2 - (0, -2) * 0.5/(-2) = (1, -0.5).
    """
    lin = nn.Linear(2, 1).to(torch_dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -1.0]]))
        lin.bias.fill_(0.5)
    f, params = fxattr.functionalize(nn.Sequential(lin).eval())
    x = torch.tensor([1.0, 2.0], dtype=torch_dtype)
    torch.testing.assert_close(fxattr.lrp(f, rule="alpha_2_beta_1")(params, x, 0),
                               torch.tensor([0.8, -2 / 3], dtype=torch_dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fxattr.lrp(f, rule="alpha_2_beta_1_IB")(params, x, 0),
                               torch.tensor([1.0, -0.5], dtype=torch_dtype), rtol=1e-12, atol=1e-12)
    # alpha_1_beta_0 keeps only the activator: (2*1, 0) * 0.5 / 2.5.
    torch.testing.assert_close(fxattr.lrp(f, rule="alpha_1_beta_0")(params, x, 0),
                               torch.tensor([0.4, 0.0], dtype=torch_dtype), rtol=1e-12, atol=1e-12)


def test_z_plus_fast_uses_raw_negative_input_by_hand():
    """w = (1, 2), x = (3, -1), b = 0, y = 1: z_plus_fast divides by W+ x = 3 - 2 = 1 and returns
    (3, -2) * y / 1; z_plus (alpha 1 beta 0, no bias) keeps x+ W+ and x- W-: (3, 0) * y / 3."""
    lin = nn.Linear(2, 1, bias=False).to(torch_dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    f, params = fxattr.functionalize(nn.Sequential(lin).eval())
    x = torch.tensor([3.0, -1.0], dtype=torch_dtype)
    torch.testing.assert_close(fxattr.lrp(f, rule="z_plus_fast")(params, x, 0),
                               torch.tensor([3.0, -2.0], dtype=torch_dtype), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fxattr.lrp(f, rule="z_plus")(params, x, 0),
                               torch.tensor([1.0, 0.0], dtype=torch_dtype), rtol=1e-12, atol=1e-12)


def test_w_square_and_flat_ignore_bias(mlp):
    """w_square and flat ignore the bias (iNNvestigate drops it from the layer copy): changing
    the biases only rescales the attribution through the seed, the output's value."""
    model, layers, x = mlp
    targets = _targets(model, x)
    f, params = fxattr.functionalize(model)
    other = {k: (v + 0.75 if k.endswith("bias") else v) for k, v in params.items()}
    for rule in ("w_square", "flat"):
        explain = torch.vmap(fxattr.lrp(f, rule=rule), in_dims=(None, 0, 0))
        got, got_other = explain(params, x, targets), explain(other, x, targets)
        torch.testing.assert_close(got, _oracle_batch(layers, [rule] * 2, x, targets), rtol=1e-9, atol=1e-12)
        seed = torch.vmap(f, in_dims=(None, 0))(params, x).gather(1, targets[:, None])
        seed_other = torch.vmap(f, in_dims=(None, 0))(other, x).gather(1, targets[:, None])
        torch.testing.assert_close(got_other, got * seed_other / seed, rtol=1e-9, atol=1e-12)


def test_epsilon_sign_of_zero_is_plus():
    """A hidden neuron with pre-activation exactly 0 that still receives relevance (through a
    sigmoid, which passes relevance): epsilon divides by 0 + eps * (+1), not by -eps.

    x = (1, -2, 0.5), hidden w0 = (1, 0.5, 0), b0 = 0 -> z0 = 0 exactly, sigmoid(0) = 0.5.
    """
    l1 = nn.Linear(3, 2).to(torch_dtype)
    l2 = nn.Linear(2, 1).to(torch_dtype)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[1.0, 0.5, 0.0], [0.25, 1.0, -1.0]]))
        l1.bias.copy_(torch.tensor([0.0, 0.5]))
        l2.weight.copy_(torch.tensor([[1.0, 2.0]]))
        l2.bias.zero_()
    model = nn.Sequential(l1, nn.Sigmoid(), l2).eval()
    f, params = fxattr.functionalize(model)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch_dtype)
    eps = 1e-3
    got = fxattr.lrp(f, rule="epsilon", epsilon=eps)(params, x, 0)
    layers = [Layer("dense", lambda v, k: k @ v, l1.weight.detach(), l1.bias.detach(), activation=torch.sigmoid),
              Layer("dense", lambda v, k: k @ v, l2.weight.detach(), l2.bias.detach())]
    want = oracle(layers, [lambda *a: rule_epsilon(*a, epsilon=eps)] * 2, x, 0)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # By hand: z1 = (0, -1.75), h = sigmoid(z1), y = h0 + 2 h1 (> 0), seeded with y.
    h0, h1 = 0.5, float(torch.sigmoid(torch.tensor(-1.75, dtype=torch_dtype)))
    y = h0 + 2 * h1
    r0, r1 = h0 * 1.0 * y / (y + eps), h1 * 2.0 * y / (y + eps)  # epsilon at the output layer
    d0, d1 = 0.0 + eps, -1.75 - eps  # sign(0) = +1 at the hidden neuron with z = 0
    want_hand = torch.tensor([1.0 * (1.0 * r0 / d0 + 0.25 * r1 / d1),
                              -2.0 * (0.5 * r0 / d0 + 1.0 * r1 / d1),
                              0.5 * (0.0 * r0 / d0 - 1.0 * r1 / d1)], dtype=torch_dtype)
    torch.testing.assert_close(got, want_hand, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("composite,conv_rule", [
    ("sequential_preset_a", "alpha_1_beta_0"),
    ("sequential_preset_b", "alpha_2_beta_1"),
    ("sequential_preset_a_flat", "flat"),
    ("sequential_preset_b_flat", "flat"),
])
def test_presets_with_bias_and_signed_input(composite, conv_rule, convnet):
    """Presets: alpha-beta (with the whole bias) on convolutions, epsilon 0.1 on dense layers;
    the *_flat ones use flat on the input layer."""
    model, layers, x = convnet
    targets = _targets(model, x)
    got = _fx_batch(model, lambda f: fxattr.lrp(f, composite=composite), x, targets)
    want = _oracle_batch(layers, [conv_rule, "epsilon_0.1"], x, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_input_layer_rules_with_bias_and_signed_input(convnet):
    model, layers, x = convnet
    targets = _targets(model, x)
    got = _fx_batch(model, lambda f: fxattr.lrp(f, rule="epsilon", input_layer_rule="flat"), x, targets)
    torch.testing.assert_close(got, _oracle_batch(layers, ["flat", "epsilon"], x, targets), rtol=1e-9, atol=1e-12)
    got = _fx_batch(model, lambda f: fxattr.lrp(f, rule="z", input_layer_rule=(-3.0, 3.0)), x, targets)
    bounded = lambda *a: rule_bounded(*a, low=-3.0, high=3.0)  # noqa: E731
    torch.testing.assert_close(got, _oracle_batch(layers, [bounded, "z"], x, targets), rtol=1e-9, atol=1e-12)


def test_preset_b_flat_until_idx():
    """sequential_preset_b_flat_until_idx: flat on the kernel layers from ``until_layer_idx`` (0 =
    the input layer, counting kernel layers only) down to the input; preset B above."""
    gen = torch.Generator().manual_seed(11)
    c1, c2, lin = _conv(2, 3, 3, gen), _conv(3, 3, 3, gen), _linear(3 * 2 * 2, 4, gen)
    model = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.Flatten(), lin).eval()
    layers = [_conv_layer(c1, (2, 6, 6), True), _conv_layer(c2, (3, 4, 4), True), _dense_layer(lin, False)]
    x = torch.randn(4, 2, 6, 6, generator=gen, dtype=torch_dtype)
    targets = _targets(model, x)
    got = _fx_batch(model, lambda f: fxattr.lrp(f, composite="sequential_preset_b_flat_until_idx",
                                                until_layer_idx=1), x, targets)
    want = _oracle_batch(layers, ["flat", "flat", "epsilon_0.1"], x, targets)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["guided_backprop", "deconvnet"])
def test_guided_backprop_deconvnet_value_seeded(mode, convnet):
    """iNNvestigate seeds guided backprop and deconvnet with the output's value (its reverse
    analyzers start from the output tensor; only Gradient replaces it by ones)."""
    model, layers, x = convnet
    targets = _targets(model, x)
    got = _fx_batch(model, lambda f: getattr(fxattr, mode)(f), x, targets)
    torch.testing.assert_close(got, _oracle_batch(layers, [None, None], x, targets, mode=mode),
                               rtol=1e-9, atol=1e-12)


def test_deep_taylor_with_bias(mlp):
    """deep_taylor: z+ without bias on every kernel layer; deep_taylor_bounded: zB on the first."""
    model, layers, x = mlp
    targets = _targets(model, x)
    got = _fx_batch(model, lambda f: fxattr.deep_taylor(f), x, targets)
    torch.testing.assert_close(got, _oracle_batch(layers, ["z_plus", "z_plus"], x, targets),
                               rtol=1e-9, atol=1e-12)
    got = _fx_batch(model, lambda f: fxattr.deep_taylor_bounded(f, low=-4.0, high=4.0), x, targets)
    bounded = lambda *a: rule_bounded(*a, low=-4.0, high=4.0)  # noqa: E731
    torch.testing.assert_close(got, _oracle_batch(layers, [bounded, "z_plus"], x, targets),
                               rtol=1e-9, atol=1e-12)


def test_deep_taylor_negative_output_is_zero(mlp):
    """iNNvestigate's DeepTaylor appends a ReLU to the model's outputs ("Deep-Taylor expects only
    positive outputs", ``DeepTaylor._prepare_model``), so it seeds with relu(y): an output < 0 is
    explained by zeros (bounded or not). LRP itself seeds with the signed value."""
    model, layers, x = mlp
    with torch.no_grad():
        out = model(x)
    targets = out.argmin(1)
    assert (out.gather(1, targets[:, None]) < 0).all()
    for make in (lambda f: fxattr.deep_taylor(f), lambda f: fxattr.deep_taylor_bounded(f, low=-4.0, high=4.0)):
        got = _fx_batch(model, make, x, targets)
        torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=0)
    got = _fx_batch(model, lambda f: fxattr.lrp(f, rule="z_plus"), x, targets)
    torch.testing.assert_close(got, _oracle_batch(layers, ["z_plus"] * 2, x, targets), rtol=1e-9, atol=1e-12)
    assert got.abs().max() > 0


def test_input_layer_rule_only_on_a_layer_fed_by_the_input():
    """iNNvestigate's ``is_input_layer``: a kernel layer whose inputs are the model input, looking
    through Flatten/Permute/Reshape only. Behind a pooling layer the first convolution is not an
    input layer, so input_layer_rule changes nothing (zennit's first-layer maps differ, see
    test_zennit.py); behind a permute (the Dense twins above) it is."""
    gen = torch.Generator().manual_seed(13)
    conv, lin = _conv(2, 3, 3, gen), _linear(3 * 2 * 2, 4, gen)
    x = torch.randn(3, 2, 8, 8, generator=gen, dtype=torch_dtype)
    pooled = nn.Sequential(nn.MaxPool2d(2), conv, nn.ReLU(), nn.Flatten(), lin).eval()
    targets = _targets(pooled, x)
    plain = _fx_batch(pooled, lambda f: fxattr.lrp(f, rule="z"), x, targets)
    for rule in ("flat", (-3.0, 3.0)):
        got = _fx_batch(pooled, lambda f: fxattr.lrp(f, rule="z", input_layer_rule=rule), x, targets)
        torch.testing.assert_close(got, plain, rtol=0, atol=0)
    direct = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4).to(torch_dtype)).eval()
    t2 = _targets(direct, x)
    a = _fx_batch(direct, lambda f: fxattr.lrp(f, rule="z", input_layer_rule="flat"), x, t2)
    b = _fx_batch(direct, lambda f: fxattr.lrp(f, rule="z"), x, t2)
    assert (a - b).abs().max() > 1e-3 * b.abs().max()
