"""Token heat maps: colours by sign and size, escaped HTML, a PNG that shows something."""

import matplotlib
import numpy as np
import pytest
import torch

import fxattr
import fxattr.text

matplotlib.use("Agg")


def test_colours_are_blue_white_red_by_relative_size():
    colours = fxattr.text.token_colors(torch.tensor([-2.0, 0.0, 1.0, 2.0]))
    np.testing.assert_allclose(colours, [[0, 0, 1], [1, 1, 1], [1, 0.5, 0.5], [1, 0, 0]])
    shared = fxattr.text.token_colors(np.array([1.0]), absmax=4.0)
    np.testing.assert_allclose(shared, [[1, 0.75, 0.75]])
    np.testing.assert_allclose(fxattr.text.token_colors([0.0, 0.0]), np.ones((2, 3)))


def test_html_escapes_tokens_and_colours_each_row():
    page = fxattr.text.token_heatmap_html([["<s>", "a"], ["b"]], [torch.tensor([1.0, -1.0]), [0.5]],
                                          labels=["one", "two"])
    assert "&lt;s&gt;" in page and "<s>" not in page
    assert "rgb(255, 0, 0)" in page and "rgb(0, 0, 255)" in page and page.count("<span") == 3
    assert "<b>one</b>" in page and "<b>two</b>" in page
    assert fxattr.text.token_heatmap_html(["x"], [2.0]).count("rgb(255, 0, 0)") == 1


def test_png(tmp_path):
    file = tmp_path / "tokens.png"
    tokens = [f"tok{i}" for i in range(30)]
    fxattr.text.token_heatmap_png([("IG", tokens, torch.linspace(-1, 1, 30)), ("gradient", tokens, torch.rand(30))],
                                  file)
    picture = matplotlib.image.imread(file)
    assert picture.shape[1] > 500 and picture[..., :3].std() > 0.05
    red = (picture[..., 0] > 0.9) & (picture[..., 1] < 0.2) & (picture[..., 2] < 0.2)
    blue = (picture[..., 2] > 0.9) & (picture[..., 0] < 0.2) & (picture[..., 1] < 0.2)
    assert red.any() and blue.any()


def test_errors():
    with pytest.raises(fxattr.FxattrError, match="one value per token"):
        fxattr.text.token_heatmap_html(["a", "b"], [1.0])
    with pytest.raises(fxattr.FxattrError, match="NaN"):
        fxattr.text.token_colors([float("nan")])
    with pytest.raises(fxattr.FxattrError, match="absmax"):
        fxattr.text.token_colors([1.0], absmax=0)
    with pytest.raises(fxattr.FxattrError, match="labels"):
        fxattr.text.token_heatmap_html([["a"]], [[1.0]], labels=["x", "y"])
    with pytest.raises(fxattr.FxattrError, match="empty"):
        fxattr.text.token_heatmap_png([])
