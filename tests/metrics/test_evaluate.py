"""fxattr.metrics.evaluate (hand-computed means and standard errors on a linear model), its markdown
table, and the plots (fxattr.viz.plot_curves / plot_metrics)."""

import math

import pytest
import torch
from torch import nn

import fxattr
import fxattr.metrics
from fxattr.errors import FxattrError
from fxattr.metrics.evaluate import metric_kind

W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)


@pytest.fixture
def linear():
    model = nn.Linear(4, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W)
    f, params = fxattr.functionalize(model.eval())
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.5, 1.0, -1.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    target = torch.tensor([0, 0, 1])
    return model, f, params, x, target


def total(params, x, target, attribution):
    return attribution.sum()


def test_hand_computed_means_and_standard_errors(linear):
    model, f, params, x, target = linear
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explainers = {"gradient": fxattr.gradient(f), "input x gradient": fxattr.input_x_gradient(f)}
    table = fxattr.metrics.evaluate(explainers, {"sum": total}, params, x, target)
    # gradient: W[t] sums to 10, 10, 1 -> mean 7, sample std sqrt(27), stderr sqrt(27) / sqrt(3) = 3
    assert table["gradient", "sum"] == pytest.approx((7.0, 3.0))
    # input x gradient: x . W[t] = 10, 2 + 1 + 3 - 4 = 2, 4 -> mean 16/3, stderr of (10, 2, 4)
    values = torch.tensor([10.0, 2.0, 4.0], dtype=torch.float64)
    assert table["input x gradient", "sum"] == pytest.approx(
        (16 / 3, values.std().item() / math.sqrt(3)))
    assert torch.equal(table.scores["gradient"]["sum"], torch.tensor([10.0, 10.0, 1.0], dtype=torch.float64))
    assert table.count.tolist() == [[3], [3]]
    torch.testing.assert_close(table.attributions["gradient"], W[target])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_markdown_table(linear):
    _, f, params, x, target = linear
    table = fxattr.metrics.evaluate({"gradient": fxattr.gradient(f)},
                                    {"sum": total, "first": lambda p, x, t, a: a[0]}, params, x, target)
    # first: 1, 1, 0 -> mean 2/3, stderr sqrt(1/3) / sqrt(3) = 1/3
    expected = ("| explainer | sum | first |\n"
                "|---|---|---|\n"
                "| gradient | 7.000 ± 3.000 | 0.667 ± 0.333 |")
    assert str(table) == expected == table.to_markdown()
    assert table.to_markdown(digits=1).endswith("| gradient | 7.0 ± 3.0 | 0.7 ± 0.3 |")


def test_masks_batch_metrics_curves_and_nan(linear):
    _, f, params, x, target = linear
    masks = torch.tensor([[True, True, False, False], [False, False, False, True],
                          [False, False, False, False]])
    seen = {}

    def batch_metric(params, x, target, attribution):
        seen["shape"] = attribution.shape   # called once, on the whole batch
        return attribution.abs().sum()
    batch_metric.batch_level = True

    metrics = {
        "mass": fxattr.metrics.relevance_mass_accuracy(f, normalise=False),
        "whole": batch_metric,
        "curve": lambda p, x, t, a: torch.cumsum(a, 0),                 # a 4-step curve per example
    }
    table = fxattr.metrics.evaluate({"gradient": fxattr.gradient(f)}, metrics, params, x, target, mask=masks)
    assert seen["shape"] == (3, 4)
    # mass: (1 + 2) / 10 = 0.3 and 4 / 10 = 0.4; the empty mask's NaN is left out (n = 2)
    mean, stderr = table["gradient", "mass"]
    assert mean == pytest.approx(0.35) and stderr == pytest.approx(0.05)
    assert table.count[0].tolist() == [2, 1, 3] and "0.350 ± 0.050 (n=2)" in str(table)
    assert table["gradient", "whole"][0] == pytest.approx(21.0) and math.isnan(table["gradient", "whole"][1])
    assert "21.000 |" in str(table)
    # curve: cumsum of W[0] = 1, 3, 6, 10 on [0, 1/3, 2/3, 1]: trapezoid area (1 + 2*3 + 2*6 + 10) / 6
    curves = table.curves["gradient"]["curve"]
    assert curves.shape == (3, 4)
    assert table.scores["gradient"]["curve"][0].item() == pytest.approx(29 / 6)


def test_mask_per_metric_and_vmapped_randomness(linear):
    _, f, params, x, target = linear
    masks = torch.tensor([[True, True, False, False]] * 3)
    flags = torch.tensor([[1, 0, 0, 0]] * 3)

    def corner(params, x, target, attribution, quadrants):
        return quadrants[0].to(attribution.dtype) * attribution[0]

    same = x[:1].expand(3, 4)
    table = fxattr.metrics.evaluate({"random": fxattr.random(f)},
                                    {"auc": fxattr.metrics.auc(f), "corner": corner},
                                    params, same, target, mask={"auc": masks, "corner": flags})
    a = table.attributions["random"]
    assert not torch.equal(a[0], a[1])      # randomness="different": each example its own draw
    torch.testing.assert_close(table.scores["random"]["corner"], a[:, 0])


def test_builders_get_each_explainer(linear):
    _, f, params, x, target = linear
    built = []

    def reexplained_sum(explain):
        built.append(explain)
        return lambda p, x_, t, a: explain(p, 2 * x_, t).sum() - a.sum()

    explainers = {"gradient": fxattr.gradient(f), "input x gradient": fxattr.input_x_gradient(f)}
    table = fxattr.metrics.evaluate(explainers, {"re": reexplained_sum}, params, x, target)
    assert built == list(explainers.values())
    assert table["gradient", "re"] == (0.0, 0.0)                    # the gradient of a linear model
    assert table["input x gradient", "re"][0] == pytest.approx(16 / 3)  # 2 x.W - x.W
    # a builder may decline an explainer: an empty cell
    only_gradient = {"re": lambda explain: (reexplained_sum(explain) if explain is explainers["gradient"]
                                            else None)}
    table = fxattr.metrics.evaluate(explainers, only_gradient, params, x, target)
    assert table.count.tolist() == [[3], [0]] and math.isnan(table["input x gradient", "re"][0])
    assert str(table).endswith("| input x gradient | – |")
    with pytest.raises(FxattrError, match=r"metrics\['bad'\] given the explainer must build a metric"):
        fxattr.metrics.evaluate(explainers, {"bad": lambda explain: 3}, params, x, target)


def test_quantus_batch_metrics(cnn1):
    # sufficiency / consistency: a score per example; sensitivity_n: one curve for the batch, even
    # when its length equals the batch size (4 here)
    _, f, params = cnn1
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    explain = fxattr.gradient(f)
    a = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, y)
    metrics = {"sufficiency": fxattr.metrics.sufficiency(f), "consistency": fxattr.metrics.consistency(f),
               "sensitivity_n": fxattr.metrics.sensitivity_n(f, n_max_percentage=0.125, features_in_step=2)}
    assert {metric_kind(m) for m in metrics.values()} == {"batch"}
    table = fxattr.metrics.evaluate({"gradient": explain}, metrics, params, x, y)
    for name in ("sufficiency", "consistency"):
        torch.testing.assert_close(table.scores["gradient"][name], metrics[name](params, x, y, a).double())
    curve = metrics["sensitivity_n"](params, x, y, a)
    assert curve.shape == (4,)
    torch.testing.assert_close(table.curves["gradient"]["sensitivity_n"], curve[None].double())
    assert table.count[0].tolist() == [4, 4, 1]
    assert table["gradient", "sensitivity_n"][0] == pytest.approx(torch.trapezoid(curve, dx=1 / 3).item())


def test_metric_kind():
    assert metric_kind(fxattr.metrics.pointing_game()) == "extra"
    assert metric_kind(fxattr.metrics.sparseness()) == "example"
    assert metric_kind(total) == "example"
    assert metric_kind(lambda explain: total) == "builder"

    def sufficiency(params, x, target, attribution):
        return attribution.sum()
    assert metric_kind(sufficiency) == "batch"   # the Quantus names that compare examples
    total.batch_level = False
    try:
        assert metric_kind(total) == "example"
    finally:
        del total.batch_level


def test_errors(linear):
    _, f, params, x, target = linear
    ok = {"gradient": fxattr.gradient(f)}
    evaluate = fxattr.metrics.evaluate
    with pytest.raises(FxattrError, match="metrics.evaluate: explainers must be a non-empty dict"):
        evaluate([fxattr.gradient(f)], {"sum": total}, params, x, target)
    with pytest.raises(FxattrError, match=r"metrics\['sum'\] must be a callable"):
        evaluate(ok, {"sum": 3}, params, x, target)
    with pytest.raises(FxattrError, match=r"target must be None or a \(3,\) integer tensor, "
                                          r"got \(3,\) of dtype torch.float32"):
        evaluate(ok, {"sum": total}, params, x, target.float())
    with pytest.raises(FxattrError, match="x must be a batch"):
        evaluate(ok, {"sum": total}, params, [1.0], target)
    with pytest.raises(FxattrError, match="metric 'pg' takes a fifth argument"):
        evaluate(ok, {"pg": fxattr.metrics.pointing_game(f)}, params, x, target)
    with pytest.raises(FxattrError, match=r"mask for metric 'pg' must be a \(3, ...\) tensor, got \(2, 4\)"):
        evaluate(ok, {"pg": fxattr.metrics.pointing_game(f)}, params, x, target,
                 mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(FxattrError, match="chunk_size must be None or an int >= 1"):
        evaluate(ok, {"sum": total}, params, x, target, chunk_size=0)
    with pytest.raises(FxattrError, match="gave shape"):
        evaluate(ok, {"outer": lambda p, x, t, a: torch.outer(a, a)}, params, x, target)


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 3000


def test_plots(linear, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    _, f, params, x, target = linear
    table = fxattr.metrics.evaluate(
        {"gradient": fxattr.gradient(f), "input x gradient": fxattr.input_x_gradient(f)},
        {"curve": lambda p, x, t, a: torch.cumsum(a, 0), "sum": total,
         "sparseness": fxattr.metrics.sparseness(f)},
        params, x, target)
    figure = fxattr.viz.plot_curves(table, "curve", file=tmp_path / "curves.png")
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2 and "AUC" in lines[0].get_label()
    # the drawn line is the mean curve over the examples
    assert lines[0].get_ydata().tolist() == pytest.approx(table.curves["gradient"]["curve"].mean(0).tolist())
    _png(tmp_path / "curves.png")
    figure = fxattr.viz.plot_metrics(table, ["sum", "sparseness"], file=tmp_path / "metrics.png", title="t")
    assert sum(ax.get_visible() for ax in figure.axes) == 2
    _png(tmp_path / "metrics.png")
    figure = fxattr.viz.plot_curves({"a": torch.rand(5), "b": torch.rand(3, 5)}, step_labels="vwxyz")
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == list("vwxyz")
    with pytest.raises(FxattrError, match=r"step_labels has 2 labels for curves of \[5\] steps"):
        fxattr.viz.plot_curves({"a": torch.rand(5)}, step_labels=["a", "b"])
    with pytest.raises(FxattrError, match="viz.plot_curves: metric 'sum' gave one score per example"):
        fxattr.viz.plot_curves(table, "sum")
    with pytest.raises(FxattrError, match="metric must name one of its metrics"):
        fxattr.viz.plot_curves(table)
    with pytest.raises(FxattrError, match="viz.plot_metrics: metrics must name some"):
        fxattr.viz.plot_metrics(table, ["nope"])
    with pytest.raises(FxattrError, match="table must be a MetricTable"):
        fxattr.viz.plot_metrics({"a": 1})
    with pytest.raises(AttributeError):
        fxattr.viz.plot_nothing  # noqa: B018
