"""Randomisation metrics against Quantus 0.6.0: the same randomised layers (from ``seed``), the same
similarities; smooth MPRT and random logit on replayed draws.

Quantus's model wrapper casts inputs to float32, so float64 models are wrapped (``AsDouble``); its
``explain_func`` runs fxattr's explainer on the (randomised) model Quantus hands it.
"""

import copy

import numpy as np
import pytest
import quantus
import scipy.stats
import torch
from torch import nn

import fxattr
from fxattr.errors import FxattrError
from fxattr.metrics import randomisation as RM
from tests.contract import model_unchanged
from tests.metrics.conftest import inputs, tiny_cnn, tiny_mlp
from tests.models import small_cnn


class AsDouble(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.to(next(self.inner.parameters()).dtype))


def quantus_explain(model, inputs, targets, **kwargs):
    inner = model.inner if isinstance(model, AsDouble) else model
    f, params = fxattr.functionalize(inner)
    x = torch.as_tensor(inputs, dtype=next(inner.parameters()).dtype)
    return torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, torch.as_tensor(targets)).numpy()


@pytest.fixture
def setup():
    model = tiny_cnn(1)
    f, params = fxattr.functionalize(model)
    x, y = inputs((model, f, params), 3)
    a = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, y)
    return model, f, params, x, y, a


def quantus_curves(scores: dict) -> torch.Tensor:
    return torch.tensor(np.array([np.asarray(v, dtype=np.float64) for v in scores.values()])).T


@pytest.mark.parametrize("layer_order", ["top_down", "bottom_up", "independent"])
def test_mprt_matches_quantus(setup, layer_order):
    model, f, params, x, y, a = setup
    reference = quantus.MPRT(layer_order=layer_order, disable_warnings=True)
    expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=a.numpy(), explain_func=quantus_explain)
    metric = RM.mprt(f, explain=fxattr.gradient(f), layer_order=layer_order, chunk_size=2)
    with model_unchanged(model):
        curves = torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    assert ["inner." + n for n in metric.layer_names] == list(expected)[1:]
    torch.testing.assert_close(curves, quantus_curves(expected), rtol=1e-9, atol=1e-12)
    assert (curves[:, 0] == 1).all() and (curves[:, -1] < 0.9).all()  # the test can fail
    # reductions: Quantus's last layer; the average over the randomised layers (module docstring)
    last = RM.mprt(f, explain=fxattr.gradient(f), layer_order=layer_order, return_last_correlation=True)
    torch.testing.assert_close(torch.vmap(last, in_dims=(None, 0, 0, 0))(params, x, y, a), curves[:, -1])
    average = RM.mprt(f, explain=fxattr.gradient(f), layer_order=layer_order, return_average_correlation=True)
    torch.testing.assert_close(torch.vmap(average, in_dims=(None, 0, 0, 0))(params, x, y, a),
                               curves[:, 1:].mean(1))
    skip = RM.mprt(f, explain=fxattr.gradient(f), layer_order=layer_order, skip_layers=True)
    torch.testing.assert_close(torch.vmap(skip, in_dims=(None, 0, 0, 0))(params, x, y, a), curves[:, [0, -1]])


def test_randomised_sets_are_quantus_randomised_models_with_batch_norm():
    """The seeded sets equal the state of Quantus's randomised copies, batch-norm buffers included;
    neither the module nor the caller's random state changes."""
    from quantus.helpers.model.pytorch_model import PyTorchModel
    model = small_cnn()  # conv, batch norm (random eval statistics), conv, linear
    f, params = fxattr.functionalize(model)
    with model_unchanged(model):
        state = torch.random.get_rng_state()
        names, sets = RM.randomised_parameter_sets(f, params, layer_order="bottom_up", seed=7)
        assert torch.equal(torch.random.get_rng_state(), state)
        wrapped = PyTorchModel(copy.deepcopy(model), channel_first=True)
        # the generator yields one copy, mutated in place: snapshot its state at every step
        generated = [(name, copy.deepcopy(randomised.state_dict()))
                     for name, randomised in wrapped.get_random_layer_generator(order="bottom_up", seed=7)]
    assert names == [name for name, _ in generated] == ["0", "1", "4", "8"]
    for k, (_, state) in enumerate(generated):
        assert set(sets) == set(params) and set(params) <= set(state)
        for name in sets:
            assert torch.equal(sets[name][k], state[name]), (k, name)


def test_mprt_with_batch_norm_and_explicit_sets_matches_quantus():
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    generator = torch.Generator().manual_seed(2)
    x, y = torch.rand(3, 3, 8, 8, generator=generator), torch.tensor([0, 3, 4])
    a = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, y)
    reference = quantus.MPRT(layer_order="bottom_up", seed=7, disable_warnings=True)
    expected = reference(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(),
                         explain_func=quantus_explain)
    metric = RM.mprt(f, explain=fxattr.gradient(f), layer_order="bottom_up", seed=7)
    seeded = torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
    torch.testing.assert_close(seeded.double(), quantus_curves(expected), rtol=1e-6, atol=1e-7)
    _, sets = RM.randomised_parameter_sets(f, params, layer_order="bottom_up", seed=7)
    explicit = torch.vmap(lambda xx, t, aa: metric(params, xx, t, aa, parameter_sets=sets))(x, y, a)
    torch.testing.assert_close(explicit, seeded)
    efficient = RM.efficient_mprt(f, explain=fxattr.gradient(f), layer_order="bottom_up", seed=7)
    torch.testing.assert_close(
        torch.vmap(lambda xx, t, aa: efficient(params, xx, t, aa, parameter_sets=sets))(x, y, a),
        torch.vmap(efficient, in_dims=(None, 0, 0, 0))(params, x, y, a))


def test_smooth_mprt_matches_quantus_on_replayed_noise(setup, monkeypatch):
    import quantus.metrics.randomisation.smooth_mprt as smooth_module
    model, f, params, x, y, a = setup
    samples, models = 3, 4  # the original and 3 randomised layers
    noise = torch.randn(models, samples - 1, *x.shape, dtype=torch.float64)
    draws = iter(noise.reshape(-1, *x.shape).numpy())
    # SmoothMPRT draws np.random.randn(*x_batch.shape) per sample and model, in this order
    monkeypatch.setattr(smooth_module.np.random, "randn", lambda *shape: next(draws))
    reference = quantus.SmoothMPRT(nr_samples=samples, disable_warnings=True)
    # SmoothMPRT explains with quantus.explain (its vanilla gradient), not with explain_func
    with pytest.warns(UserWarning, match="vanilla 'Gradient'"):
        expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                             a_batch=a.numpy(), explain_func=quantus_explain, explain_func_kwargs={})
    monkeypatch.undo()
    metric = RM.smooth_mprt(f, explain=fxattr.gradient(f), nr_samples=samples)
    ours = torch.vmap(lambda xx, t, aa, n: metric(params, xx, t, aa, noise=n),
                      in_dims=(0, 0, 0, 2))(x, y, a, noise)
    torch.testing.assert_close(ours, quantus_curves(expected), rtol=1e-9, atol=1e-12)


def test_efficient_mprt_matches_quantus(setup):
    model, f, params, x, y, a = setup
    for order in ("bottom_up", "independent"):
        reference = quantus.EfficientMPRT(layer_order=order, disable_warnings=True)
        expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                             a_batch=a.numpy(), explain_func=quantus_explain)
        metric = RM.efficient_mprt(f, explain=fxattr.gradient(f), layer_order=order)
        with model_unchanged(model):
            ours = torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a)
        torch.testing.assert_close(ours, torch.tensor(np.asarray(expected, dtype=np.float64)),
                                   rtol=1e-9, atol=1e-12)


def test_histogram_and_entropy_are_numpy_and_scipy():
    from quantus.functions.complexity_func import discrete_entropy
    values = torch.randn(4, 300, dtype=torch.float64)
    values[1, :50] = values[1, 0]               # repeated values
    values[2] = torch.linspace(-1, 1, 300, dtype=torch.float64)  # values on the bin edges
    values[3] = 0.25                            # constant: numpy's range is (v - 0.5, v + 0.5)
    for v in values:
        assert RM.histogram(v, 17).tolist() == np.histogram(v.numpy(), bins=17)[0].tolist()
    entropies = torch.vmap(lambda v: RM.discrete_entropy(v, 100))(values)
    expected = [discrete_entropy(a=v.numpy(), x=v.numpy(), n_bins=100) for v in values]
    torch.testing.assert_close(entropies, torch.tensor(expected, dtype=torch.float64))


def test_average_ranks_are_scipy_rankdata_under_vmap():
    values = torch.randn(5, 60, dtype=torch.float64)
    values[0, :20] = 0.5                      # a long tie
    values[1] = torch.randint(0, 4, (60,))    # many ties
    values[2] = 1.0                           # constant
    ours = torch.vmap(RM.average_ranks)(values)
    torch.testing.assert_close(ours, torch.tensor(scipy.stats.rankdata(values.numpy(), axis=1)))
    b = torch.randn(5, 60, dtype=torch.float64)
    kept = [0, 1, 3, 4]  # not the constant row (no correlation)
    expected = [scipy.stats.spearmanr(u, v)[0] for u, v in zip(values[kept].numpy(), b[kept].numpy())]
    spearman = torch.vmap(RM.ranked_spearman)(ours[[0, 1, 3, 4]], b[[0, 1, 3, 4]])
    torch.testing.assert_close(spearman, torch.tensor(expected, dtype=torch.float64))


def test_ssim_is_skimage_on_flat_arrays():
    from quantus.functions.similarity_func import ssim
    a, b = torch.rand(2, 5, 40, dtype=torch.float64)
    ours = torch.vmap(RM.ssim)(a, b)
    expected = torch.tensor(ssim(a.numpy(), b.numpy(), batched=True), dtype=torch.float64)
    torch.testing.assert_close(ours, expected)


def quantus_off_targets(y: np.ndarray, num_classes: int, seed: int = 42) -> np.ndarray:
    """Quantus's draw of the other class (RandomLogit.evaluate_batch)."""
    np.random.seed(seed)
    batch = len(y)
    classes = np.stack([np.arange(num_classes)] * batch)
    keep = np.ones_like(classes)
    keep[np.arange(batch)[None, :], y] = 0
    index = np.random.randint(0, num_classes - 1, batch)
    return classes[keep.astype(bool)].reshape(batch, -1)[np.arange(batch)[None, :], index].flatten()


@pytest.mark.parametrize("similarity", ["ssim", "spearman"])
def test_random_logit_matches_quantus_on_replayed_class(setup, similarity):
    model, f, params, x, y, a = setup
    functions = {"ssim": quantus.similarity_func.ssim,
                 "spearman": quantus.similarity_func.correlation_spearman}
    reference = quantus.RandomLogit(num_classes=4, normalise=False, similarity_func=functions[similarity],
                                    disable_warnings=True)
    expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=a.numpy(), explain_func=quantus_explain)
    off = torch.as_tensor(quantus_off_targets(y.numpy(), 4))
    metric = RM.random_logit(f, explain=fxattr.gradient(f), normalise=False, similarity_func=similarity)
    ours = torch.vmap(lambda xx, t, aa, o: metric(params, xx, t, aa, off_target=o))(x, y, a, off)
    torch.testing.assert_close(ours, torch.tensor(np.asarray(expected, dtype=np.float64)),
                                   rtol=1e-9, atol=1e-12)
    # normalise=True: Quantus normalises over the batch, so compare one example at a time
    normalised = RM.random_logit(f, explain=fxattr.gradient(f))
    for i in range(2):
        one = quantus.RandomLogit(num_classes=4, disable_warnings=True)(
            model=AsDouble(model).eval(), x_batch=x[i:i + 1].numpy(), y_batch=y[i:i + 1].numpy(),
            a_batch=a[i:i + 1].numpy(), explain_func=quantus_explain)
        off_i = torch.as_tensor(quantus_off_targets(y[i:i + 1].numpy(), 4)[0])
        torch.testing.assert_close(normalised(params, x[i], y[i], a[i], off_target=off_i),
                                   torch.tensor(float(one[0]), dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_random_logit_draws_every_other_class_uniformly():
    """An explainer that returns the class it is asked for, read back by the similarity function."""
    model = tiny_mlp(classes=4)
    f, params = fxattr.functionalize(model)

    def echo(p, x, t):
        return torch.zeros_like(x) + t

    metric = RM.random_logit(f, explain=echo, normalise=False, similarity_func=lambda a, b: b[0])
    x = torch.rand(3000, 6, dtype=torch.float64)
    targets = torch.full((3000,), 2)
    torch.manual_seed(0)
    drawn = torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, targets, x)
    counts = torch.bincount(drawn.long(), minlength=4)
    assert counts[2] == 0 and counts.sum() == 3000
    assert scipy.stats.chisquare(counts[[0, 1, 3]].numpy()).pvalue > 1e-3


def test_vmap_equals_loop_float32_and_errors(setup):
    model, f, params, x, y, a = setup
    metric = RM.mprt(f, explain=fxattr.gradient(f), layer_order="bottom_up")
    torch.testing.assert_close(torch.vmap(metric, in_dims=(None, 0, 0, 0))(params, x, y, a),
                               torch.stack([metric(params, *t) for t in zip(x, y, a)]))
    smooth = RM.smooth_mprt(f, explain=fxattr.gradient(f), nr_samples=2)
    noise = torch.randn(3, 4, 1, *x.shape[1:], dtype=torch.float64)
    torch.testing.assert_close(
        torch.vmap(lambda xx, t, aa, n: smooth(params, xx, t, aa, noise=n))(x, y, a, noise),
        torch.stack([smooth(params, x[i], y[i], a[i], noise=noise[i]) for i in range(3)]))
    model32 = tiny_cnn(1).float()
    f32, params32 = fxattr.functionalize(model32)
    mprt32 = RM.mprt(f32, explain=fxattr.gradient(f32), layer_order="bottom_up")
    curve32 = mprt32(params32, x[0].float(), y[0], a[0].float())
    assert curve32.dtype == torch.float32
    # reset_parameters draws differently in float32 and float64: compare on the float32 sets
    _, sets32 = RM.randomised_parameter_sets(f32, params32, layer_order="bottom_up")
    sets64 = {name: value.double() for name, value in sets32.items()}
    torch.testing.assert_close(curve32.double(), metric(params, x[0], y[0], a[0], parameter_sets=sets64),
                               rtol=1e-4, atol=1e-4)
    g = fxattr.gradient(f)
    for build, kwargs, message in [
        (RM.mprt, {}, r"explain is required"),
        (RM.mprt, {"explain": g, "layer_order": "random"}, r"layer_order must be one of"),
        (RM.mprt, {"explain": g, "similarity_func": "kendall"}, r"similarity_func must be one of"),
        (RM.mprt, {"explain": g, "return_average_correlation": True, "return_last_correlation": True},
         r"cannot both be True"),
        (RM.smooth_mprt, {"explain": g, "nr_samples": 0}, r"nr_samples must be an int >= 1"),
        (RM.efficient_mprt, {"explain": g, "n_bins": 0}, r"n_bins must be an int >= 1"),
        (RM.random_logit, {"explain": g, "num_classes": 1}, r"num_classes must be an int >= 2"),
    ]:
        with pytest.raises(FxattrError, match=message):
            build(f, **kwargs)
    plain = RM.mprt(lambda p, xx: f(p, xx), explain=g)
    with pytest.raises(FxattrError, match=r"needs the module behind f"):
        plain(params, x[0], y[0], a[0])
    with pytest.raises(FxattrError, match=r"parameter_sets\['0.weight'\] has shape"):
        metric(params, x[0], y[0], a[0], parameter_sets={"0.weight": params["0.weight"]})
    with pytest.raises(FxattrError, match=r"noise must have shape \(4, 1, 1, 8, 8\)"):
        smooth(params, x[0], y[0], a[0], noise=torch.zeros(4, 2, 1, 8, 8, dtype=torch.float64))
