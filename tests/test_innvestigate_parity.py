"""Parity with iNNvestigate 2.1.2 on whole networks.

``tests/reference/<network>.npz`` hold iNNvestigate's own attributions (made by
``tests/reference/make_references.py`` in a separate TensorFlow venv; layout in
``tests/reference/README.md``) for four small float64 networks with non-zero biases and signed
inputs: an MLP, a CNN with max pooling, one with average pooling and a residual CNN with an Add,
in the neuron selection modes "max_activation", "index" (one index per example) and "all".

The torch twins are rebuilt here from the Keras weights (HWIO -> OIHW, Dense kernel -> its
transpose, Flatten in NHWC order by permuting before flattening) and explained with
``fxattr.create_analyzer(name, model, neuron_selection_mode=..., **kwargs).analyze(x)`` on NCHW
inputs; every attribution must match iNNvestigate's at rtol 1e-4. The gradient family is also
checked against the functional core directly (fxattr.gradient, input_x_gradient,
integrated_gradients riemann_left 64 steps, noise_tunnel with the recorded noise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxattr

REFERENCES = Path(__file__).parent / "reference"
NETWORKS = ("mlp", "cnn_max", "cnn_avg", "resnet")
RTOL = 1e-4


# ---------------------------------------------------------------------------------------------
# Loading the references and rebuilding the networks in torch
# ---------------------------------------------------------------------------------------------

_CACHE: dict = {}


def load(network: str):
    if network not in _CACHE:
        with np.load(REFERENCES / f"{network}.npz") as data:
            arrays = {k: data[k] for k in data.files}
        _CACHE[network] = (arrays, json.loads(str(arrays.pop("description"))))
    return _CACHE[network]


def to_torch_layout(a: np.ndarray) -> torch.Tensor:
    """A batch in Keras layout (N, H, W, C) as torch's (N, C, H, W); vectors unchanged."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t


class ChannelsLastFlatten(nn.Module):
    """Keras' Flatten of an NHWC tensor: (N, C, H, W) -> permute to NHWC -> flatten."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


class Residual(nn.Module):
    """The "resnet" network: conv1 -> [block_conv1 -> block_conv2] + conv1 -> relu -> pool -> out."""

    def __init__(self, layers: dict):
        super().__init__()
        self.conv1, self.relu1 = layers["conv1"], nn.ReLU()
        self.block_conv1, self.relu2 = layers["block_conv1"], nn.ReLU()
        self.block_conv2 = layers["block_conv2"]
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = ChannelsLastFlatten()
        self.out = layers["out"]

    def forward(self, x):
        h = self.relu1(self.conv1(x))
        y = self.block_conv2(self.relu2(self.block_conv1(h)))
        return self.out(self.flatten(self.pool(self.relu(y + h))))


def _kernel_layer(spec: dict, arrays: dict):
    kernel = torch.from_numpy(arrays[f"w/{spec['name']}/kernel"])
    bias = torch.from_numpy(arrays[f"w/{spec['name']}/bias"])
    if spec["type"] == "Dense":
        layer = nn.Linear(kernel.shape[0], kernel.shape[1], dtype=torch.float64)
        weight = kernel.T                                   # (in, out) -> (out, in)
    else:
        assert spec["strides"] == [1, 1] and spec["kernel_size"] == [3, 3]
        padding = {"same": 1, "valid": 0}[spec["padding"]]
        layer = nn.Conv2d(kernel.shape[2], kernel.shape[3], 3, padding=padding, dtype=torch.float64)
        weight = kernel.permute(3, 2, 0, 1)                 # HWIO -> OIHW
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def build(network: str) -> nn.Module:
    """The torch twin of a reference network, float64, eval mode."""
    arrays, description = load(network)
    layers = {s["name"]: _kernel_layer(s, arrays)
              for s in description["layers"] if s["type"] in ("Dense", "Conv2D")}
    if network == "resnet":
        kinds = [(s["name"], s["type"], s.get("activation")) for s in description["layers"]]
        assert kinds == [("conv1", "Conv2D", "relu"), ("block_conv1", "Conv2D", "relu"),
                         ("block_conv2", "Conv2D", "linear"), ("residual_add", "Add", None),
                         ("relu", "Activation", "relu"), ("pool", "MaxPooling2D", None),
                         ("flatten", "Flatten", None), ("out", "Dense", "linear")], kinds
        return Residual(layers).eval()
    modules = []
    for spec in description["layers"]:
        assert spec["inputs"] is None, spec  # a chain
        kind = spec["type"]
        if kind in ("Dense", "Conv2D"):
            modules.append(layers[spec["name"]])
            if spec["activation"] == "relu":
                modules.append(nn.ReLU())
            else:
                assert spec["activation"] == "linear", spec
        elif kind == "MaxPooling2D":
            assert spec["pool_size"] == [2, 2]
            modules.append(nn.MaxPool2d(2))
        elif kind == "AveragePooling2D":
            assert spec["pool_size"] == [2, 2]
            modules.append(nn.AvgPool2d(2))
        elif kind == "Flatten":
            modules.append(ChannelsLastFlatten())
        else:
            raise AssertionError(f"unexpected layer {spec}")
    return nn.Sequential(*modules).eval()


def reference(network: str, label: str, mode: str) -> torch.Tensor:
    arrays, _ = load(network)
    return to_torch_layout(arrays[f"{label}__{mode}"])


def inputs(network: str) -> torch.Tensor:
    return to_torch_layout(load(network)[0]["x"])


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    actual, expected = actual.detach().to(torch.float64), expected.to(torch.float64)
    # rtol 1e-4, plus an atol far below the attribution's scale for entries that are (almost) 0
    atol = 1e-9 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def _cases():
    # every file holds the same analyzers and modes (test_reference_files_are_small_and_complete)
    _, description = load(NETWORKS[0])
    for network in NETWORKS:
        for entry in description["analyzers"]:
            for mode in description["modes"]:
                yield pytest.param(network, entry["label"], mode, id=f"{network}-{entry['label']}-{mode}")


def _sum_of_outputs(output):
    return output.sum()


# ---------------------------------------------------------------------------------------------
# The references themselves
# ---------------------------------------------------------------------------------------------


def test_reference_files_are_small_and_complete():
    total = sum((REFERENCES / f"{n}.npz").stat().st_size for n in NETWORKS)
    assert total < 5 * 2**20
    for network in NETWORKS:
        arrays, description = load(network)
        assert description["network"] == network and description["dtype"].startswith("float64")
        assert description["versions"]["innvestigate"] == "2.1.2"
        assert description["analyzers"] == load(NETWORKS[0])[1]["analyzers"]
        for entry in description["analyzers"]:
            for mode in description["modes"]:
                a = arrays[f"{entry['label']}__{mode}"]
                assert a.shape == arrays["x"].shape and np.isfinite(a).all()
        # the analyses are not degenerate: signed inputs, non-zero biases, non-zero attributions
        assert (arrays["x"] < 0).any() and (arrays["x"] > 0).any()
        assert all(np.abs(arrays[k]).min() > 0 for k in arrays if k.endswith("/bias"))
        assert np.abs(arrays["lrp.z__max_activation"]).max() > 0


@pytest.mark.parametrize("network", NETWORKS)
def test_torch_twin_reproduces_keras_outputs(network):
    # pins the layout conversion (NHWC, HWIO, Flatten in NHWC order) before any attribution
    arrays, _ = load(network)
    with torch.no_grad():
        out = build(network)(inputs(network))
    assert_matches(out, torch.from_numpy(arrays["outputs"]), f"{network} outputs")


@pytest.mark.parametrize("network", NETWORKS)
def test_input_analyzer_is_x(network):
    assert_matches(reference(network, "input", "max_activation"), inputs(network), network)


# ---------------------------------------------------------------------------------------------
# The gradient family against fxattr's functional core (independent of the analyzer API)
# ---------------------------------------------------------------------------------------------


def _core_explain(label: str, f, arrays):
    if label in ("gradient", "gradient.baseline"):
        return fxattr.gradient(f), None
    if label == "input_t_gradient":
        return fxattr.input_x_gradient(f), None
    if label == "integrated_gradients":
        return fxattr.integrated_gradients(f, steps=64, method="riemann_left"), None
    if label == "smoothgrad":
        # iNNvestigate adds the recorded standard-normal draws unscaled (noise_scale is ignored)
        noise = to_noise_layout(arrays["smoothgrad_noise"])
        explain = fxattr.noise_tunnel(fxattr.gradient(f), kind="smoothgrad", samples=noise.shape[1],
                                      sigma=1.0, relative=False)
        return explain, noise
    raise AssertionError(label)


def to_noise_layout(noise: np.ndarray) -> torch.Tensor:
    """(N, n, H, W, C) -> (N, n, C, H, W); (N, n, D) unchanged."""
    t = torch.from_numpy(np.ascontiguousarray(noise))
    return t.permute(0, 1, 4, 2, 3).contiguous() if t.ndim == 5 else t


GRADIENT_FAMILY = ("gradient", "gradient.baseline", "input_t_gradient", "integrated_gradients", "smoothgrad")


@pytest.mark.parametrize("mode", ("max_activation", "index", "all"))
@pytest.mark.parametrize("label", GRADIENT_FAMILY)
@pytest.mark.parametrize("network", NETWORKS)
def test_gradient_family_matches_innvestigate_through_the_core(network, label, mode):
    arrays, _ = load(network)
    x = inputs(network)
    f, params = fxattr.functionalize(build(network))
    explain, noise = _core_explain(label, f, arrays)
    if mode == "max_activation":
        targets = None
    elif mode == "index":
        targets = torch.from_numpy(arrays["index"]).long()
    else:
        targets = _sum_of_outputs  # iNNvestigate's "all": the sum of all outputs

    def one(xi, ti, ni):
        if noise is None:
            return explain(params, xi, ti)
        return explain(params, xi, ti, noise=ni)

    t_dim = 0 if isinstance(targets, torch.Tensor) else None
    n_dim = 0 if noise is not None else None
    actual = torch.vmap(one, in_dims=(0, t_dim, n_dim))(x, targets, noise)
    assert_matches(actual, reference(network, label, mode), f"{network} {label} {mode}")


# ---------------------------------------------------------------------------------------------
# Every analyzer through fxattr.create_analyzer
# ---------------------------------------------------------------------------------------------


def _kwargs(entry: dict, description: dict) -> dict:
    kwargs = dict(entry["kwargs"])
    if isinstance(kwargs.get("input_layer_rule"), list):  # JSON turned the (low, high) tuple into a list
        kwargs["input_layer_rule"] = tuple(kwargs["input_layer_rule"])
    if "until_layer_idx" in kwargs:
        kwargs["until_layer_idx"] = _kernel_index(kwargs["until_layer_idx"], description)
    return kwargs


def _kernel_index(keras_index: int, description: dict) -> int:
    """A deliberate difference: iNNvestigate's until_layer_idx counts positions in Keras'
    model.layers (the InputLayer is 0; pooling and Flatten count), fxattr's counts kernel layers
    (convolutions and dense layers) from 0, as a torch model has no Keras layer list."""
    positions = [i + 1 for i, layer in enumerate(description["layers"])
                 if layer["type"] in ("Dense", "Conv2D")]
    return sum(p <= keras_index for p in positions) - 1


@pytest.mark.parametrize(("network", "label", "mode"), list(_cases()))
def test_analyzer_matches_innvestigate(network, label, mode):
    arrays, description = load(network)
    entry = next(e for e in description["analyzers"] if e["label"] == label)
    model = build(network)
    x = inputs(network)
    analyzer = fxattr.create_analyzer(entry["name"], model, neuron_selection_mode=mode,
                                      **_kwargs(entry, description))
    selection = arrays["index"].tolist() if mode == "index" else None
    if entry["name"] == "smoothgrad":
        # analyze() draws fresh noise; replay iNNvestigate's through the analyzer's own explainer
        noise = to_noise_layout(arrays["smoothgrad_noise"])
        if mode == "index":
            targets, t_dim = torch.tensor(selection), 0
        else:
            targets, t_dim = (None if mode == "max_activation" else _sum_of_outputs), None
        actual = torch.vmap(lambda xi, ti, ni: analyzer.explainer(analyzer.params, xi, ti, noise=ni),
                            in_dims=(0, t_dim, 0))(x, targets, noise)
    else:
        actual = analyzer.analyze(x, neuron_selection=selection)
    assert_matches(actual, reference(network, label, mode), f"{network} {label} {mode}")
