"""The iNNvestigate-style front door: every registered name, every neuron_selection_mode, three
kinds of network; clear errors for bad names, selections and inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).eval()


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 4)).eval()


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 4)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h) + h)
        h = F.max_pool2d(h, 2)
        return self.fc(torch.flatten(h, 1))


def residual_cnn():
    torch.manual_seed(0)
    return ResidualCNN().eval()


NETWORKS = {"mlp": (mlp, (12,), None), "cnn": (cnn, (2, 8, 8), "3"),
            "residual": (residual_cnn, (2, 8, 8), "conv2")}


def _kwargs(name, shape, layer):
    """Keywords a name needs to be built on a network of example shape ``shape``."""
    if name == "lrp":
        return {"rule": "epsilon"}
    if name in ("gradcam", "gradcam_plus_plus", "layercam", "xgradcam", "scorecam"):
        return {"layer": layer}
    if name == "occlusion":
        return {"window": (1,) * (len(shape) - 1) + (3,) if len(shape) == 1 else (1, 3, 3)}
    if name == "rise":  # drawn masks are images; a vector input takes its masks explicitly
        if len(shape) == 1:
            return {"masks": (torch.rand(16, *shape) > 0.5).float()}
        return {"num_masks": 16, "cell_size": 2}
    if name == "lrp.sequential_preset_b_flat_until_idx":
        return {"until_layer_idx": 1}
    if name == "expected_gradients":
        return {"baselines": torch.zeros(2, *shape), "samples": 4}
    if name == "feature_ablation":
        return {"feature_mask": torch.arange(int(np.prod(shape))).reshape(shape) // 2}
    if name == "smoothgrad" or name in ("smoothgrad_sq", "vargrad"):
        return {"augment_by_n": 4, "noise_scale": 0.1}
    if name == "integrated_gradients":
        return {"steps": 8}
    if name in ("deep_taylor.bounded", "lrp.epsilon_gamma_box"):
        return {"low": -3.0, "high": 3.0}
    return {}


def _applicable(name, layer):
    cam = name in ("gradcam", "gradcam_plus_plus", "layercam", "xgradcam", "scorecam")
    return not (cam and layer is None) and not name.startswith("pattern.")


CASES = [(name, net, mode) for name in fxattr.list_analyzers() for net in NETWORKS
         for mode in ("max_activation", "index", "all") if _applicable(name, NETWORKS[net][2])]


@pytest.mark.parametrize("name, net, mode", CASES)
def test_every_analyzer_runs_in_every_mode(name, net, mode):
    build, shape, layer = NETWORKS[net]
    model = build()
    x = torch.rand(3, *shape) * 2 - 1
    analyzer = fxattr.create_analyzer(name, model, neuron_selection_mode=mode,
                                      **_kwargs(name, shape, layer))
    selection = [0, 3, 1] if mode == "index" else None
    result = analyzer.analyze(x, neuron_selection=selection)
    assert isinstance(result, torch.Tensor)
    assert result.shape == x.shape and result.device == x.device
    assert torch.isfinite(result).all()


def test_analyzer_equals_its_explainer_under_vmap():
    model = cnn()
    x, labels = torch.rand(5, 2, 8, 8), torch.tensor([0, 1, 2, 3, 0])
    for name in ("gradient", "integrated_gradients", "lrp.epsilon", "lrp.sequential_preset_a"):
        analyzer = fxattr.create_analyzer(name, model, "index", batch_size=2)
        expected = torch.vmap(analyzer.explainer, in_dims=(None, 0, 0))(analyzer.params, x, labels)
        torch.testing.assert_close(analyzer.analyze(x, labels.tolist()), expected)
        top = fxattr.create_analyzer(name, model)
        by_index = fxattr.create_analyzer(name, model, "index").analyze(x, model(x).argmax(1).numpy())
        torch.testing.assert_close(top.analyze(x), by_index)


def test_all_mode_explains_the_sum_of_outputs():
    model = mlp()
    x = torch.randn(3, 12)
    got = fxattr.create_analyzer("gradient", model, "all").analyze(x)
    xr = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(xr).sum(), xr)
    torch.testing.assert_close(got, expected)


def test_innvestigate_keywords_keep_their_meaning():
    model = mlp()
    x = torch.randn(2, 12)
    ig = fxattr.create_analyzer("integrated_gradients", model)
    assert ig.explainer.config["steps"] == 64 and ig.explainer.config["method"] == "riemann_left"
    sg = fxattr.create_analyzer("smoothgrad", model, augment_by_n=5, noise_scale=0.0)
    assert sg.explainer.config["samples"] == 5
    # noise_scale is honoured: with zero noise smoothgrad is the plain gradient.
    torch.testing.assert_close(sg.analyze(x), fxattr.create_analyzer("gradient", model).analyze(x))


def test_numpy_input_and_progress_bar(capsys):
    model = mlp()
    x = np.random.rand(7, 12).astype(np.float32)
    result = fxattr.create_analyzer("gradient", model, batch_size=1, progress=True).analyze(x)
    assert isinstance(result, torch.Tensor) and result.shape == (7, 12)


@pytest.mark.parametrize("call, message", [
    (lambda m: fxattr.create_analyzer("lrp.epsilom", m), r"no analyzer named 'lrp.epsilom'; did you mean 'lrp.epsilon'"),
    (lambda m: fxattr.create_analyzer("gradient", m, "argmax"), r"neuron_selection_mode must be one of"),
    (lambda m: fxattr.create_analyzer("gradient", m, batch_size=0), r"batch_size must be an int >= 1"),
    (lambda m: fxattr.create_analyzer("gradient", m, steps=3), r"'gradient' does not take these keyword"),
    (lambda m: fxattr.create_analyzer("gradient", m).analyze(torch.randn(2, 12), 1),
     r"neuron_selection is only taken in neuron_selection_mode 'index'"),
    (lambda m: fxattr.create_analyzer("gradient", m, "index").analyze(torch.randn(2, 12)),
     r"needs neuron_selection"),
    (lambda m: fxattr.create_analyzer("gradient", m, "index").analyze(torch.randn(2, 12), [1, 2, 3]),
     r"neuron_selection must be an int or 2 ints"),
    (lambda m: fxattr.create_analyzer("gradient", m, "index").analyze(torch.randn(2, 12), [0.5, 1.0]),
     r"neuron_selection must be an int or 2 ints"),
    (lambda m: fxattr.create_analyzer("gradient", m).analyze(torch.randn(12)), r"x must be a batch"),
    (lambda m: fxattr.create_analyzer("gradient", m).analyze([[1.0]]), r"x must be a batch as a tensor"),
])
def test_clear_errors(call, message):
    with pytest.raises(fxattr.FxattrError, match=message):
        call(mlp())


def test_input_of_the_wrong_rank():
    with pytest.raises(fxattr.FxattrError, match=r"Analyzer\.analyze: .*one example of shape"):
        fxattr.create_analyzer("gradient", cnn()).analyze(torch.randn(2, 1, 2, 8, 8))
    with pytest.raises(fxattr.FxattrError, match=r"Analyzer\.analyze: .*one example of shape"):
        fxattr.create_analyzer("lrp.z", cnn()).analyze(torch.randn(2, 8, 8))


def test_index_mode_nan_and_empty_batches():
    analyzer = fxattr.create_analyzer("gradient", cnn(), neuron_selection_mode="index")
    x = torch.randn(3, 2, 8, 8)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.Analyzer\.analyze: target 99 is out of range"):
        analyzer.analyze(x, neuron_selection=99)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.Analyzer\.analyze: neuron_selection must be an index >= 0"):
        analyzer.analyze(x, neuron_selection=-1)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.Analyzer\.analyze: neuron_selection must hold indices >= 0"):
        analyzer.analyze(x, neuron_selection=[0, -1, 2])
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.Analyzer\.analyze: x holds 1 NaN or Inf value"):
        analyzer.analyze(x, neuron_selection=1)
    for name in ("gradient", "lrp.epsilon", "occlusion"):
        kwargs = {"window": (2, 2, 2)} if name == "occlusion" else {}
        out = fxattr.create_analyzer(name, cnn(), **kwargs).analyze(torch.randn(0, 2, 8, 8))
        assert out.shape == (0, 2, 8, 8)
