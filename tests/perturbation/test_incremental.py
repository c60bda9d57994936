"""Incremental occlusion (fxattr/perturbation/_incremental.py, on fxattr.graph.Program): the same
numbers as full occluded copies.

Every window's output is recomputed only on the boxes of the feature maps it changes; these tests
pin (1) equality with ``incremental=False`` on strided / padded / dilated convs, batch norm, max
pool with ceil_mode, avg pool, residual adds with different strides and torchvision's resnet18,
(2) the region analysis against brute force (every position a window really changes lies in its
box) and against hand-derived box sizes, (3) the composition guarantees (vmap, derivatives,
compile, no vmap fallback, the model untouched) and (4) when it applies.
"""

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from fxattr.graph import Program
from fxattr.perturbation import _incremental
from tests.contract import (assert_compile_equals_eager, assert_second_order, assert_vmap_equals_loop,
                            model_unchanged)
from tests.models import small_cnn


class Strided(nn.Module):
    """Stride, padding, dilation, batch norm, ceil-mode max pool, avg pool, a scalar multiply."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Conv2d(4, 5, 3, stride=2, padding=2, dilation=2)
        self.b = nn.Conv2d(5, 5, (3, 1), padding=(1, 0))
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.avg = nn.AvgPool2d(2, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = F.softplus(self.bn(self.stem(x)))
        h = torch.tanh(self.b(self.a(h))) * 0.5
        h = self.avg(self.pool(h))
        return self.head(h.mean((2, 3)))


class Downsample(nn.Module):
    """A ResNet-like block: two branches with different strides and kernels, added."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 1, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.relu(self.stem(x))
        out = self.conv2(self.relu(self.bn1(self.conv1(h))))
        out += self.down(h)
        out = self.relu(out)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Gated(nn.Module):
    """A batch norm that is not folded (after a ReLU), a gate of two same-shape maps
    (``h * sigmoid(conv(h))``), a constant tensor attribute multiplied in (not per position: full)
    and a subtraction of a number."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Conv2d(4, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.bn(torch.relu(self.stem(x)))
        h = h * torch.sigmoid(self.gate(h)) - 0.25
        h = torch.abs(self.pool(h))
        h = h * torch.linspace(0.5, 1.5, h.shape[-1], dtype=h.dtype)
        return self.head(h.mean((2, 3)))


def _randomise_bn(model):
    with torch.no_grad():  # test-side set-up of a random eval state; fxattr never does this
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _model(name, dtype=torch.float64):
    torch.manual_seed(0)
    if name == "strided":
        return _randomise_bn(Strided().to(dtype))
    if name == "downsample":
        return _randomise_bn(Downsample().to(dtype))
    if name == "gated":
        return _randomise_bn(Gated().to(dtype))
    return small_cnn(dtype, activation=nn.ReLU)


@contextlib.contextmanager
def _no_vmap_fallback():
    """An op without a vmap batching rule raises instead of looping per example."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def _both(f, params, x, target, **config):
    plain = fxattr.occlusion(f, incremental=False, **config)(params, x, target)
    with _no_vmap_fallback():
        fast = fxattr.occlusion(f, incremental=True, **config)(params, x, target)
    return plain, fast


def _assert_same(plain, fast, dtype, output=None):
    """Relative to the attributions' size and, where given, the output's: an attribution is a
    difference of two outputs, so float32 rounding of the outputs (~1e-7 |f|) is its noise floor."""
    scale = plain.abs().max() if output is None else max(plain.abs().max(), output.abs().max())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert (plain - fast).abs().max() <= tol * scale, (plain - fast).abs().max() / scale


# ------------------------------------------------------------------------------ equal to full copies

GEOMETRIES = [
    ((3, 4, 4), (3, 2, 2)),    # stride < window
    ((3, 3, 3), (3, 3, 3)),    # stride == window, the last window clipped at the border
    ((1, 5, 2), (1, 3, 2)),    # one channel at a time, non-square, clipped
    ((3, 1, 1), (3, 1, 1)),    # single pixels
]


@pytest.mark.parametrize("name", ["small_cnn", "strided", "downsample", "gated"])
@pytest.mark.parametrize("window,stride", GEOMETRIES)
@pytest.mark.parametrize("baseline", ["number", "tensor"])
def test_equals_full_copies(name, window, stride, baseline):
    model = _model(name)
    f, params = fxattr.functionalize(model)
    size = (3, 8, 8) if name == "small_cnn" else (3, 13, 11)
    x = torch.randn(size, dtype=torch.float64)
    base = 0.3 if baseline == "number" else torch.randn(3, 1, size[-1], dtype=torch.float64)
    with model_unchanged(model):
        plain, fast = _both(f, params, x, 2, window=window, stride=stride, baseline=base, chunk_size=7)
    _assert_same(plain, fast, torch.float64)


@pytest.mark.parametrize("name", ["strided", "downsample"])
def test_equals_full_copies_in_float32(name):
    f, params = fxattr.functionalize(_model(name, torch.float32))
    x = torch.randn(3, 16, 15)
    plain, fast = _both(f, params, x, None, window=(3, 5, 4), stride=(3, 3, 3))
    _assert_same(plain, fast, torch.float32, f(params, x))
    assert fast.dtype == torch.float32


@pytest.mark.slow
def test_equals_full_copies_on_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.resnet18(weights=None))
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 64, 64)
    with model_unchanged(model):
        plain, fast = _both(f, params, x, 7, window=(3, 16, 16), stride=(3, 12, 12), chunk_size=16)
    _assert_same(plain, fast, torch.float32, f(params, x)[7])


@pytest.mark.slow
def test_agrees_with_captum_on_resnet18():
    captum = pytest.importorskip("captum.attr")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.resnet18(weights=None))
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 48, 48)
    ours = fxattr.occlusion(f, window=(3, 12, 12), stride=(3, 8, 8), incremental=True)(params, x, 5)
    theirs = captum.Occlusion(model).attribute(x[None], sliding_window_shapes=(3, 12, 12),
                                               strides=(3, 8, 8), target=5)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


# ----------------------------------------------------------------------------- the region analysis

def _plan(f, params, x, window, stride):
    program = Program(f, "occlusion")
    values = _incremental.reference(program, params, x)[0]
    counts = [math.ceil((s - w) / k) + 1 for s, w, k in zip(x.shape, window, stride)]
    grids = torch.meshgrid(*[torch.arange(c) for c in counts], indexing="ij")
    return program, values, _incremental.plan(program, values, tuple(x.shape), window, stride, grids,
                                              x.device)


@pytest.mark.parametrize("name", ["strided", "downsample", "gated"])
def test_boxes_cover_every_changed_position(name):
    """Brute force: evaluate every occluded copy fully; wherever a node differs from the
    reference, the position lies inside that window's box of the node (or the node is full)."""
    f, params = fxattr.functionalize(_model(name))
    x = torch.randn(3, 13, 11, dtype=torch.float64)
    window, stride = (3, 4, 3), (3, 3, 2)
    program, ref, plan = _plan(f, params, x, window, stride)
    counts = [math.ceil((s - w) / k) + 1 for s, w, k in zip(x.shape, window, stride)]
    checked = 0
    for k, (ph, pw) in enumerate((a, b) for a in range(counts[1]) for b in range(counts[2])):
        occluded = x.clone()
        occluded[:, ph * stride[1]:ph * stride[1] + window[1], pw * stride[2]:pw * stride[2] + window[2]] = 7.0
        values = _incremental.reference(program, params, occluded)[0]
        for slot, kind in plan.kinds.items():
            if not isinstance(ref[slot], torch.Tensor) or kind == "full":
                continue
            changed = (values[slot] != ref[slot]).reshape(-1, *ref[slot].shape[-2:]).any(0)
            if kind == "ref":
                assert not changed.any(), slot
                continue
            start = plan.starts[k, plan.column[slot]]
            inside = torch.zeros_like(changed)
            (sh, sw), (h0, w0) = plan.sizes[slot], start.tolist()
            inside[h0:h0 + sh, w0:w0 + sw] = True
            assert not (changed & ~inside).any(), (slot, k)
            checked += 1
    assert checked > 50


def test_plan_reads_the_catalogue_kinds():
    """The gated model's steps get the boxes their kinds allow: the unfolded batch norm and the
    gate's product keep the box, the constant-tensor product and everything after it are full."""
    f, params = fxattr.functionalize(_model("gated"))
    program, _, plan = _plan(f, params, torch.randn(3, 13, 11, dtype=torch.float64), (3, 3, 3), (3, 2, 2))
    by_name = {st.name: plan.kinds[st.slot] for st in program.steps}
    assert by_name["stem"] == by_name["gate"] == by_name["pool"] == "window"
    assert by_name["bn"] == by_name["sigmoid"] == by_name["abs_1"] == "pointwise"
    assert by_name["mul"] == "binary" and by_name["sub"] == "pointwise"
    assert by_name["mul_1"] == by_name["head"] == "full"


def test_runs_on_the_program_not_on_its_own_interpreter():
    """The one forward interpreter (fxattr.graph.Program) runs incremental occlusion: the module
    neither reads torch.fx nor evaluates nodes itself."""
    import inspect
    import types
    modules = {v.__name__ for v in vars(_incremental).values() if isinstance(v, types.ModuleType)}
    assert "torch.fx" not in modules and not hasattr(_incremental, "Step")
    source = inspect.getsource(_incremental)
    assert "call_privately" not in source and "getattr(args[0]" not in source
    assert "program.run_step(" in source


@pytest.mark.slow
def test_resnet18_boxes_are_the_receptive_field_growth():
    """16x16 windows, stride 8, at 224 px: conv1 (k7 s2 p3) changes rows
    [ceil((8i + 3 - 6) / 2), (8i + 15 + 3) // 2] = 11 rows, max pool (k3 s2 p1) 6 (+1 at the
    clamped start), every 3x3 conv adds one row on each side; layer4 is changed everywhere."""
    torchvision = pytest.importorskip("torchvision")
    f, params = fxattr.functionalize(torchvision.models.resnet18(weights=None).eval())
    x = torch.randn(3, 224, 224)
    program, _, plan = _plan(f, params, x, (3, 16, 16), (3, 8, 8))
    sizes = {st.target: plan.sizes.get(st.slot) for st in program.steps if st.op == "module"}
    assert sizes["conv1"] == (11, 11)
    assert sizes["maxpool"] == (7, 7)
    assert sizes["layer1.0.conv1"] == (9, 9)
    assert sizes["layer1.0.conv2"] == (11, 11)
    assert sizes["layer2.0.downsample.0"] == (7, 7)
    assert all(plan.kinds[st.slot] == "full" for st in program.steps if str(st.target).startswith("layer4"))
    assert 0.9 < plan.saved < 0.95


# ------------------------------------------------------------------------------------- guarantees

def _explainer(**config):
    return lambda f: fxattr.occlusion(f, window=(3, 3, 3), stride=(3, 2, 2), baseline=0.1, chunk_size=5,
                                      incremental=True, **config)


def test_vmap_equals_loop(dtype):
    model = _model("downsample", dtype)
    f, params = fxattr.functionalize(model)
    explain = _explainer()(f)
    xs, targets = torch.randn(3, 3, 9, 9, dtype=dtype), torch.tensor([0, 2, 1])
    with model_unchanged(model), _no_vmap_fallback():
        out = assert_vmap_equals_loop(explain, params, xs, targets)
    assert out.dtype == dtype


def test_derivatives_match_finite_differences():
    """w.r.t. x and parameters of an early conv (boxed), the batch norm and the head."""
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Softplus(), nn.Conv2d(3, 2, 3, stride=2),
        nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 2)).double())
    f, params = fxattr.functionalize(model)
    explain = fxattr.occlusion(f, window=(2, 2, 2), stride=(2, 2, 2), baseline=0.2, incremental=True)
    assert_second_order(explain, params, torch.randn(2, 6, 6, dtype=torch.float64), 1,
                        param_names=["0.weight", "1.weight", "3.bias", "6.weight"], gradgrad=True)


@pytest.mark.slow
def test_compile_equals_eager():
    f, params = fxattr.functionalize(_model("small_cnn", torch.float32))
    explain = fxattr.occlusion(f, window=(3, 3, 3), stride=(3, 2, 2), chunk_size=None, incremental=True)
    assert_compile_equals_eager(explain, params, torch.randn(2, 3, 8, 8), torch.tensor([1, 3]))


# ----------------------------------------------------------------------------- when it applies

def test_auto_falls_back_where_it_cannot_apply_and_true_says_why():
    E = fxattr.FxattrError
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double().eval()
    f, params = fxattr.functionalize(mlp)
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    auto = fxattr.occlusion(f, window=(1, 2, 2))(params, x, 0)
    torch.testing.assert_close(auto, fxattr.occlusion(f, window=(1, 2, 2), incremental=False)(params, x, 0))
    with pytest.raises(E, match="occlusion: incremental=True cannot be used: no convolution or pooling"):
        fxattr.occlusion(f, window=(1, 2, 2), incremental=True)(params, x, 0)
    # input_shape: a 4-d x is meant (else it is refused earlier, as a batch of images)
    f_cnn, params_cnn = fxattr.functionalize(_model("small_cnn"), input_shape=(1, 3, 8, 8))
    with pytest.raises(E, match=r"occlusion: incremental=True cannot be used: x must be an image \(C, H, W\)"):
        fxattr.occlusion(f_cnn, window=(1, 1, 2, 2), incremental=True)(params_cnn, torch.randn(1, 3, 8, 8, dtype=torch.float64), 0)
    with pytest.raises(E, match="occlusion: incremental=True needs f from fxattr.functionalize"):
        fxattr.occlusion(lambda p, x_: f_cnn(p, x_), window=1, incremental=True)
    with pytest.raises(E, match="occlusion: incremental must be 'auto', True or False, got 'yes'"):
        fxattr.occlusion(f_cnn, window=1, incremental="yes")

    class Untraceable(nn.Module):
        def forward(self, x):
            # control flow on a shape: vmappable, but torch.fx cannot trace it
            return x.sum((1, 2, 3))[:, None] if x.shape[-1] > 1 else -x.sum((1, 2, 3))[:, None]

    f_bad, _ = fxattr.functionalize(Untraceable())
    with pytest.raises(E, match="occlusion: incremental=True needs a traceable model"):
        fxattr.occlusion(f_bad, window=1, incremental=True)
    x = torch.randn(1, 2, 2)
    torch.testing.assert_close(fxattr.occlusion(f_bad, window=1)({}, x, 0),
                               fxattr.occlusion(f_bad, window=1, incremental=False)({}, x, 0))


# ------------------------------------------------------- feature ablation of grid cells (internal)

def _grid_mask(height, width, cell_h, cell_w, seed=0):
    """Cells of ``cell_h x cell_w`` (clipped at the border), numbered in a random order."""
    cols = math.ceil(width / cell_w)
    cell = torch.arange(height)[:, None] // cell_h * cols + torch.arange(width)[None, :] // cell_w
    order = torch.randperm(int(cell.max()) + 1, generator=torch.Generator().manual_seed(seed))
    return order[cell][None]


@pytest.mark.parametrize("name", ["strided", "downsample"])
def test_grid_ablation_equals_feature_ablation(name):
    """Ablating grid cells through incremental occlusion gives fxattr.feature_ablation's numbers,
    vmapped over a batch, for cells clipped at the border and numbered in any order."""
    f, params = fxattr.functionalize(_model(name))
    xs, targets = torch.randn(2, 3, 13, 11, dtype=torch.float64), torch.tensor([2, 0])
    mask = _grid_mask(13, 11, 4, 3)
    cells = _incremental.grid_cells(mask.expand(3, 13, 11))
    assert cells is not None and cells[:2] == (4, 3)
    program = _incremental.program_for("feature_ablation", f, required=True)

    def explain(p, x, t):
        ref, scores = _incremental.grid_ablation_scores("feature_ablation", f, program, p, x,
                                                        torch.full_like(x, 0.5), cells, t, 5, required=True)
        return (ref - scores)[mask.expand(x.shape)]

    with _no_vmap_fallback():
        fast = torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, targets)
    plain = torch.vmap(fxattr.feature_ablation(f, feature_mask=mask, baseline=0.5), in_dims=(None, 0, 0))(
        params, xs, targets)
    _assert_same(plain, fast, torch.float64)


def test_grid_cells_refuses_what_is_not_a_grid():
    assert _incremental.grid_cells(_grid_mask(8, 8, 2, 4).expand(3, 8, 8))[:2] == (2, 4)
    irregular = _grid_mask(8, 8, 4, 4)
    irregular[0, 0, 1] = irregular[0, 5, 5]  # one pixel in another cell's group
    assert _incremental.grid_cells(irregular.expand(3, 8, 8)) is None
    uneven = torch.tensor([[0, 0, 1], [0, 0, 1], [2, 2, 3]])[None]  # cells of 2 then 1
    assert _incremental.grid_cells(uneven.expand(2, 3, 3)) is not None  # clipped at the border: a grid
    uneven = torch.tensor([[0, 1, 1], [0, 1, 1], [2, 3, 3]])[None]  # cells of 1 then 2: not a grid
    assert _incremental.grid_cells(uneven.expand(2, 3, 3)) is None
    per_channel = torch.stack([_grid_mask(8, 8, 4, 4, 0)[0], _grid_mask(8, 8, 4, 4, 1)[0]])
    assert _incremental.grid_cells(per_channel) is None
    assert _incremental.grid_cells(_grid_mask(8, 8, 4, 4)) is not None  # (1, H, W): one channel
