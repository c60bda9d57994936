"""fxattr.viz against hand-derived numbers and iNNvestigate's conventions (colour tables from
matplotlib itself, percentiles from numpy)."""

import io
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch

from fxattr import viz
from fxattr.errors import FxattrError

matplotlib.use("Agg")

DARK_RED = (0.5, 0.0, 0.0)      # seismic at level 255
DARK_BLUE = (0.0, 0.0, 0.3)     # seismic at level 0
NEAR_WHITE = (1 - 2 / 255, 1 - 2 / 255, 1.0)  # seismic at level 127 = 127.5 truncated


# ---------------------------------------------------------------- project

def test_project_normalises_each_example_by_its_absmax():
    x = torch.tensor([[-2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [3.0, -6.0, 0.0]])
    expected = torch.tensor([[0.0, 0.5, 0.75], [0.5, 0.5, 0.5], [0.75, 0.0, 0.5]])
    torch.testing.assert_close(viz.project(x), expected)
    torch.testing.assert_close(viz.project(x, output_range=(0, 255)), 255 * expected)
    torch.testing.assert_close(viz.project(x, output_range=(-1, 1)), 2 * expected - 1)
    assert torch.equal(x, torch.tensor([[-2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [3.0, -6.0, 0.0]]))


def test_project_given_absmax_and_positive_only():
    x = torch.tensor([[-2.0, 0.0, 1.0]])
    # shared absmax 4: [-.5, 0, .25] -> (v + 1) / 2
    torch.testing.assert_close(viz.project(x, absmax=4.0), torch.tensor([[0.25, 0.5, 0.625]]))
    # absmax 1: -2 maps below the range and is clipped to 0
    torch.testing.assert_close(viz.project(x, absmax=1.0), torch.tensor([[0.0, 0.5, 1.0]]))
    torch.testing.assert_close(viz.project(torch.tensor([[1.0, 2.0, 4.0]]), input_is_positive_only=True),
                               torch.tensor([[0.25, 0.5, 1.0]]))
    # one absmax per example
    two = torch.tensor([[2.0, -2.0], [2.0, 1.0]])
    torch.testing.assert_close(viz.project(two, absmax=torch.tensor([2.0, 4.0])),
                               torch.tensor([[1.0, 0.0], [0.75, 0.625]]))


def test_project_numpy_in_numpy_out_and_unmodified():
    x = np.array([[[-1.0, 3.0]], [[0.5, 0.25]]])
    y = viz.project(x)
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, [[[1 / 3, 1.0]], [[1.0, 0.75]]])
    np.testing.assert_array_equal(x, [[[-1.0, 3.0]], [[0.5, 0.25]]])


def test_project_errors():
    with pytest.raises(FxattrError, match="viz.project.*absmax"):
        viz.project(torch.ones(3, 2), absmax=torch.ones(2))
    with pytest.raises(FxattrError, match="output_range"):
        viz.project(torch.ones(3, 2), output_range=5)
    with pytest.raises(FxattrError, match="tensor or a numpy array"):
        viz.project("abc")


# ---------------------------------------------------------------- heatmap

def test_builtin_colour_maps_equal_matplotlibs():
    # values whose projected level is exactly k + 0.25 for k = 0..255 (absmax pinned to 1)
    k = torch.arange(256, dtype=torch.float64)
    ramp = ((2 * k + 0.5) / 255 - 1).reshape(1, 1, 256)
    for name in ("seismic", "bwr", "gray"):
        np.testing.assert_allclose(viz.heatmap(ramp, cmap=name, absmax=1.0)[0].numpy(),
                                   matplotlib.colormaps[name](np.arange(256))[:, :3], atol=1e-12)
    # a colour map that is not built in goes through matplotlib
    np.testing.assert_allclose(viz.heatmap(torch.tensor([[[1.0, -1.0]]]), cmap="viridis")[0].numpy(),
                               matplotlib.colormaps["viridis"]([255, 0])[:, :3], atol=1e-6)


def test_heatmap_seismic_positive_is_red_negative_blue_zero_white():
    x = torch.tensor([[[2.0, -2.0, 0.0]]])  # (C=1, H=1, W=3)
    rgb = viz.heatmap(x)
    assert rgb.shape == (1, 3, 3)
    torch.testing.assert_close(rgb[0, 0], torch.tensor(DARK_RED))
    torch.testing.assert_close(rgb[0, 1], torch.tensor(DARK_BLUE))
    torch.testing.assert_close(rgb[0, 2], torch.tensor(NEAR_WHITE))
    bwr = viz.heatmap(x, cmap="bwr")
    torch.testing.assert_close(bwr[0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(bwr[0, 1], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(bwr[0, 2], torch.tensor([1 - 1 / 255, 1 - 1 / 255, 1.0]))


def test_heatmap_reductions():
    # (C=3, H=1, W=3): columns hold channel triples
    x = torch.tensor([[[1.0, 2.0, 0.5]], [[-3.0, -2.0, 0.5]], [[2.0, 0.0, 0.5]]])
    # sum: [0, 0, 1.5] -> absmax 1.5 -> levels [127, 127, 255]
    torch.testing.assert_close(viz.heatmap(x, reduce="sum")[0],
                               torch.tensor([NEAR_WHITE, NEAR_WHITE, DARK_RED]))
    # absmax: the signed value of largest magnitude: [-3, +2 (tie with -2 goes to +), 0.5]
    rgb = viz.heatmap(x, reduce="absmax")[0]
    torch.testing.assert_close(rgb[0], torch.tensor(DARK_BLUE))
    # +2 / 3 -> level floor((2/3 + 1) / 2 * 255) = 212 -> seismic between (1,0,0) and (.5,0,0)
    frac = 212 / 255 * 4 - 3
    torch.testing.assert_close(rgb[1], torch.tensor([1 - 0.5 * frac, 0.0, 0.0]))
    # +0.5 / 3 -> level floor(7/12 * 255) = 148 -> between white and red
    frac = 148 / 255 * 4 - 2
    torch.testing.assert_close(rgb[2], torch.tensor([1.0, 1 - frac, 1 - frac]))


def test_heatmap_batches_per_example_and_keeps_type():
    a = torch.tensor([[[[1.0, -1.0]]], [[[10.0, 5.0]]]])  # (N=2, C=1, H=1, W=2)
    rgb = viz.heatmap(a)
    assert rgb.shape == (2, 1, 2, 3)
    torch.testing.assert_close(rgb[0, 0], torch.tensor([DARK_RED, DARK_BLUE]))
    torch.testing.assert_close(rgb[1, 0, 0], torch.tensor(DARK_RED))  # each map its own absmax
    out = viz.heatmap(a.numpy())
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, rgb.numpy())
    # maps without channels (Grad-CAM): channel_axis=None
    torch.testing.assert_close(viz.heatmap(a[:, 0], channel_axis=None), rgb)
    torch.testing.assert_close(viz.heatmap(a[0, 0], channel_axis=None), rgb[0])


def test_graymap_levels():
    x = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    g = viz.graymap(x, input_is_positive_only=True)
    expected = torch.tensor([[0.0, 63 / 255], [127 / 255, 1.0]])
    torch.testing.assert_close(g, expected[..., None].expand(2, 2, 3))


def test_heatmap_errors():
    with pytest.raises(FxattrError, match="viz.heatmap.*reduce"):
        viz.heatmap(torch.ones(1, 2, 2), reduce="max")
    with pytest.raises(FxattrError, match="channel_axis=None"):
        viz.heatmap(torch.ones(2, 2))
    with pytest.raises(FxattrError, match="shape"):
        viz.heatmap(torch.ones(1, 1, 1, 2, 2))
    with pytest.raises(FxattrError, match="cmap"):
        viz.heatmap(torch.ones(1, 2, 2), cmap="no_such_map")


# ---------------------------------------------------------------- gamma, clip_quantile

def test_gamma_hand_values():
    torch.testing.assert_close(viz.gamma(torch.tensor([-4.0, 1.0, 4.0]), gamma=0.5),
                               torch.tensor([-4.0, 2.0, 4.0]))
    torch.testing.assert_close(viz.gamma(torch.tensor([-2.0, 1.0, 2.0]), gamma=2.0),
                               torch.tensor([-2.0, 0.5, 2.0]))
    # around minamp = 1: v = [0, 1, 4], amp 4 -> sqrt([0, .25, 1]) * 4 + 1
    torch.testing.assert_close(viz.gamma(torch.tensor([1.0, 2.0, 5.0]), gamma=0.5, minamp=1.0),
                               torch.tensor([1.0, 3.0, 5.0]))
    # given maxamp: 1 / 4 -> sqrt -> .5 * 4
    torch.testing.assert_close(viz.gamma(torch.tensor([1.0]), gamma=0.5, maxamp=4.0), torch.tensor([2.0]))
    np.testing.assert_allclose(viz.gamma(np.array([-1.0, 0.25]), gamma=0.5), [-1.0, 0.5])
    assert torch.equal(viz.gamma(torch.zeros(3)), torch.zeros(3))


def test_gamma_keeps_order_and_identity():
    x = torch.randn(200, dtype=torch.float64)
    torch.testing.assert_close(viz.gamma(x, gamma=1.0), x)
    for g in (0.3, 0.5, 2.0):
        y = viz.gamma(x, gamma=g)
        assert torch.equal(x.argsort(), y.argsort())
        assert torch.equal(torch.sign(x), torch.sign(y))
        assert y.abs().max() == x.abs().max()
    with pytest.raises(FxattrError, match="gamma must be"):
        viz.gamma(x, gamma=0)


def test_clip_quantile_matches_numpy_percentile():
    torch.testing.assert_close(viz.clip_quantile(torch.arange(11.0), 10),
                               torch.tensor([1.0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]))
    x = np.random.default_rng(0).normal(size=(3, 17, 5))
    for q in (1, 7.5, (5, 80)):
        lo, hi = np.percentile(x, q if isinstance(q, tuple) else (q, 100 - q))
        expected = np.clip(x, lo, hi)
        np.testing.assert_allclose(viz.clip_quantile(x, q), expected, rtol=1e-12)
        np.testing.assert_allclose(viz.clip_quantile(torch.from_numpy(x), q).numpy(), expected, rtol=1e-12)
    before = x.copy()
    viz.clip_quantile(x, 10)
    np.testing.assert_array_equal(x, before)
    with pytest.raises(FxattrError, match="quantile"):
        viz.clip_quantile(x, 120)


# ---------------------------------------------------------------- overlay

def test_overlay_blends_gray_image_and_heatmap():
    image = torch.tensor([[[0.0, 2.0], [4.0, 4.0]]])  # (1, 2, 2) -> gray [[0, .5], [1, 1]]
    attribution = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])
    out = viz.overlay(image, attribution, alpha=0.5)
    assert out.shape == (2, 2, 3)
    torch.testing.assert_close(out[0, 0], 0.5 * torch.tensor(DARK_RED))
    torch.testing.assert_close(out[0, 1], 0.25 + 0.5 * torch.tensor(NEAR_WHITE))
    torch.testing.assert_close(out[1, 1], 0.5 + 0.5 * torch.tensor(DARK_BLUE))
    torch.testing.assert_close(viz.overlay(image, attribution, alpha=0.0)[..., 0],
                               torch.tensor([[0.0, 0.5], [1.0, 1.0]]))
    torch.testing.assert_close(viz.overlay(image, attribution, alpha=1.0), viz.heatmap(attribution))


def test_overlay_upsamples_a_coarse_map_and_batches():
    images = torch.rand(3, 3, 8, 8)
    cam = torch.ones(3, 2, 2)  # constant positive maps: dark red everywhere after resizing
    out = viz.overlay(images, cam, alpha=1.0, channel_axis=None)
    assert out.shape == (3, 8, 8, 3)
    torch.testing.assert_close(out, torch.tensor(DARK_RED).expand(3, 8, 8, 3))
    out_np = viz.overlay(images.numpy(), cam.numpy(), alpha=0.3, channel_axis=None)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (3, 8, 8, 3)
    assert out_np.min() >= 0 and out_np.max() <= 1
    with pytest.raises(FxattrError, match="alpha"):
        viz.overlay(images, cam, alpha=1.5, channel_axis=None)
    with pytest.raises(FxattrError, match="3 image"):
        viz.overlay(images, cam[:2], channel_axis=None)


# ---------------------------------------------------------------- plot_grid

def test_plot_grid_writes_a_png(tmp_path):
    x = torch.rand(3, 1, 8, 8)
    a = torch.randn(3, 1, 8, 8)
    rows = [[viz.graymap(x[i]), viz.heatmap(a[i]), viz.overlay(x[i], a[i]), x[i, 0], None]
            for i in range(3)]
    path = tmp_path / "grid.png"
    figure = viz.plot_grid(rows, row_labels=["a", "b", "c"],
                           col_labels=["input", "heat", "overlay", "raw", "empty"], file=path, dpi=50)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    picture = matplotlib.image.imread(path)
    width, height = figure.get_size_inches() * 50
    assert picture.shape[:2] == (round(height), round(width))
    assert picture[..., :3].std() > 0.05  # not a blank canvas
    buffer = io.BytesIO()
    viz.plot_grid([[x[0]]], file=buffer)
    assert buffer.getvalue()[:4] == b"\x89PNG"


def test_plot_grid_errors():
    with pytest.raises(FxattrError, match="col_labels has 1"):
        viz.plot_grid([[torch.rand(4, 4), torch.rand(4, 4)]], col_labels=["one"])
    with pytest.raises(FxattrError, match="row_labels"):
        viz.plot_grid([[torch.rand(4, 4)]], row_labels=["a", "b"])
    with pytest.raises(FxattrError, match="rows must be"):
        viz.plot_grid([])
    with pytest.raises(FxattrError, match="each image"):
        viz.plot_grid([[torch.rand(2, 4, 4, 5)]])


def test_matplotlib_is_optional(monkeypatch):
    # importing fxattr.viz does not import matplotlib
    code = "import sys, fxattr.viz; assert 'matplotlib' not in sys.modules, 'imported matplotlib'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # without matplotlib: the built-in maps work, plotting says what is missing
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert viz.heatmap(torch.ones(1, 2, 2)).shape == (2, 2, 3)
    with pytest.raises(FxattrError, match="matplotlib is needed for plot_grid"):
        viz.plot_grid([[torch.rand(4, 4)]])
    with pytest.raises(FxattrError, match="matplotlib is needed"):
        viz.heatmap(torch.ones(1, 2, 2), cmap="viridis")
