"""Robustness metrics against Quantus 0.6.0 on tiny models, with the noise replayed exactly.

Quantus is fed the very noise fxattr uses by replacing the metric instance's ``perturb_func`` (its
only source of randomness) inside the test. Quantus's model wrapper casts inputs to float32
(``torch.Tensor(x)``), so its model is wrapped to evaluate in float64 (``AsDouble``); its
``explain_func`` runs the same fxattr explainer on the model it is handed.
"""

import math

import numpy as np
import pytest
import quantus
import torch
from torch import nn

import fxattr
from fxattr.errors import FxattrError
from fxattr.metrics import robustness as R
from tests.contract import model_unchanged
from tests.metrics.conftest import inputs, tiny_cnn, tiny_mlp


class AsDouble(nn.Module):
    """Quantus casts inputs to float32; this evaluates the wrapped float64 model in float64."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x.double())


def quantus_explain(method=fxattr.gradient):
    """A Quantus ``explain_func`` running fxattr's ``method`` on whatever model Quantus hands it."""
    def explain_func(model, inputs, targets, **kwargs):
        inner = model.inner if isinstance(model, AsDouble) else model
        f, params = fxattr.functionalize(inner)
        x = torch.as_tensor(inputs, dtype=next(inner.parameters()).dtype)
        return torch.vmap(method(f), in_dims=(None, 0, 0))(params, x, torch.as_tensor(targets)).numpy()
    return explain_func


def replay(metric, noise):
    """Makes Quantus's ``perturb_func`` add ``noise[k]`` (batch, *x.shape) at its k-th call."""
    draws = iter(noise.transpose(0, 1))

    def perturb(arr, indices, **kwargs):
        return arr + next(draws).reshape(arr.shape).numpy()

    metric.perturb_func = perturb


def batched(metric, params, x, y, a, **replayed):
    names = list(replayed)

    def one(xx, t, aa, *draws):
        return metric(params, xx, t, aa, **dict(zip(names, draws)))

    return torch.vmap(one, randomness="different")(x, y, a, *replayed.values())


@pytest.fixture
def setup():
    model = tiny_cnn(1)
    f, params = fxattr.functionalize(model)
    x, y = inputs((model, f, params), 3)
    a = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, y)
    return model, f, params, x, y, a


SAMPLES = 6


def uniform(shape, low, high, seed=3):
    generator = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("name, quantus_class, config", [
    ("max_sensitivity", quantus.MaxSensitivity, {}),
    ("avg_sensitivity", quantus.AvgSensitivity, {}),
    ("max_sensitivity", quantus.MaxSensitivity, {"abs": True}),
    ("local_lipschitz_estimate", quantus.LocalLipschitzEstimate, {"normalise": False}),
    ("relative_input_stability", quantus.RelativeInputStability, {}),
    ("relative_output_stability", quantus.RelativeOutputStability, {}),
    ("relative_output_stability", quantus.RelativeOutputStability,
     {"return_nan_when_prediction_changes": False}),
])
def test_noise_metrics_match_quantus_on_replayed_noise(setup, name, quantus_class, config):
    model, f, params, x, y, a = setup
    noise = uniform((x.shape[0], SAMPLES, *x.shape[1:]), -0.2, 0.2)
    reference = quantus_class(nr_samples=SAMPLES, disable_warnings=True, **config)
    replay(reference, noise)
    expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=a.numpy(), explain_func=quantus_explain())
    metric = getattr(R, name)(f, explain=fxattr.gradient(f), nr_samples=SAMPLES, **config)
    ours = batched(metric, params, x, y, a, noise=noise)
    # Quantus's wrapper rounds the perturbed input to float32 for the logits (ROS), hence 1e-6
    torch.testing.assert_close(ours, torch.tensor(np.asarray(expected, dtype=np.float64)), rtol=1e-6, atol=0)


def test_normalised_metrics_match_quantus_one_example_at_a_time(setup):
    """Quantus normalises over the batch; per example (batch of one) the numbers agree."""
    model, f, params, x, y, a = setup
    noise = uniform((x.shape[0], SAMPLES, *x.shape[1:]), -0.3, 0.3)
    for i in range(x.shape[0]):
        for quantus_class, name in ((quantus.LocalLipschitzEstimate, "local_lipschitz_estimate"),
                                    (quantus.MaxSensitivity, "max_sensitivity")):
            reference = quantus_class(nr_samples=SAMPLES, normalise=True, disable_warnings=True)
            replay(reference, noise[i:i + 1])
            expected = reference(model=AsDouble(model).eval(), x_batch=x[i:i + 1].numpy(),
                                 y_batch=y[i:i + 1].numpy(), a_batch=a[i:i + 1].numpy(),
                                 explain_func=quantus_explain())
            metric = getattr(R, name)(f, explain=fxattr.gradient(f), nr_samples=SAMPLES, normalise=True)
            torch.testing.assert_close(metric(params, x[i], y[i], a[i], noise=noise[i]),
                                       torch.tensor(float(expected[0]), dtype=torch.float64),
                                       rtol=1e-9, atol=0)


def test_second_moment_normalisation_matches_quantus_one_example_at_a_time(setup):
    model, f, params, x, y, a = setup
    noise = uniform((1, SAMPLES, *x.shape[1:]), 0.02, 0.2)
    reference = quantus.RelativeInputStability(nr_samples=SAMPLES, normalise=True, abs=True,
                                               disable_warnings=True)
    replay(reference, noise)
    expected = reference(model=AsDouble(model).eval(), x_batch=x[:1].numpy(), y_batch=y[:1].numpy(),
                         a_batch=a[:1].numpy(), explain_func=quantus_explain())
    metric = R.relative_input_stability(f, explain=fxattr.gradient(f), nr_samples=SAMPLES, normalise=True,
                                        abs=True)
    torch.testing.assert_close(metric(params, x[0], y[0], a[0], noise=noise[0]),
                               torch.tensor(float(expected[0]), dtype=torch.float64), rtol=1e-9, atol=0)


def test_prediction_changes_give_nan_as_quantus(setup):
    model, f, params, x, y, a = setup
    noise = uniform((x.shape[0], SAMPLES, *x.shape[1:]), -3.0, 3.0, seed=5)  # large: classes change
    for quantus_class, name in ((quantus.MaxSensitivity, "max_sensitivity"),
                                (quantus.RelativeInputStability, "relative_input_stability")):
        reference = quantus_class(nr_samples=SAMPLES, disable_warnings=True,
                                  return_nan_when_prediction_changes=True)
        replay(reference, noise)
        expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                             a_batch=a.numpy(), explain_func=quantus_explain())
        metric = getattr(R, name)(f, explain=fxattr.gradient(f), nr_samples=SAMPLES,
                                  return_nan_when_prediction_changes=True)
        ours = batched(metric, params, x, y, a, noise=noise)
        assert torch.isnan(ours).any()
        torch.testing.assert_close(ours, torch.tensor(np.asarray(expected, dtype=np.float64)),
                                   rtol=1e-9, atol=0, equal_nan=True)


def test_relative_representation_stability_matches_quantus_layer(setup):
    model, f, params, x, y, a = setup
    head = model[:2]  # conv -> ReLU: Quantus's layer_names=["inner.1"] on the wrapper

    def representation(p, xx):
        return torch.func.functional_call(head, {k: v for k, v in p.items() if k.startswith("0.")},
                                          (xx[None],))[0]

    noise = uniform((x.shape[0], SAMPLES, *x.shape[1:]), 0.02, 0.2)
    reference = quantus.RelativeRepresentationStability(nr_samples=SAMPLES, layer_names=["inner.1"],
                                                        disable_warnings=True)
    replay(reference, noise)
    expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=a.numpy(), explain_func=quantus_explain())
    metric = R.relative_representation_stability(f, explain=fxattr.gradient(f), nr_samples=SAMPLES,
                                                   representation=representation)
    # Quantus's hooks see the input rounded to float32 (its wrapper's torch.Tensor(x)), hence 1e-6
    torch.testing.assert_close(batched(metric, params, x, y, a, noise=noise),
                               torch.tensor(np.asarray(expected, dtype=np.float64)), rtol=1e-6, atol=0)
    by_name = R.relative_representation_stability(f, explain=fxattr.gradient(f), nr_samples=SAMPLES,
                                                    representation="1")
    torch.testing.assert_close(batched(by_name, params, x, y, a, noise=noise),
                               batched(metric, params, x, y, a, noise=noise))
    # several layers: Quantus concatenates the hooked outputs in execution order
    reference = quantus.RelativeRepresentationStability(nr_samples=SAMPLES, disable_warnings=True,
                                                        layer_names=["inner.1", "inner.4"])
    replay(reference, noise)
    expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=a.numpy(), explain_func=quantus_explain())
    two = R.relative_representation_stability(f, explain=fxattr.gradient(f), nr_samples=SAMPLES,
                                               representation=["1", "4"])
    torch.testing.assert_close(batched(two, params, x, y, a, noise=noise),
                               torch.tensor(np.asarray(expected, dtype=np.float64)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("nr_steps", [4, 8])
def test_continuity_matches_quantus(setup, nr_steps, monkeypatch):
    model, f, params, x, y, a = setup
    metric = R.continuity(f, explain=fxattr.gradient(f), nr_steps=nr_steps)
    for i in range(2):  # Quantus normalises over the batch: one example at a time
        reference = quantus.Continuity(nr_steps=nr_steps, disable_warnings=True)
        expected = reference(model=AsDouble(model).eval(), x_batch=x[i:i + 1].numpy(),
                             y_batch=y[i:i + 1].numpy(), a_batch=a[i:i + 1].numpy(),
                             explain_func=quantus_explain())
        torch.testing.assert_close(metric(params, x[i], y[i], a[i]),
                                   torch.tensor(float(expected[0]), dtype=torch.float64), rtol=1e-9, atol=0)
    reference = quantus.Continuity(nr_steps=nr_steps, normalise=False, disable_warnings=True)
    expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=a.numpy(), explain_func=quantus_explain())
    ours = torch.vmap(R.continuity(f, explain=fxattr.gradient(f), nr_steps=nr_steps, normalise=False),
                      in_dims=(None, 0, 0, 0))(params, x, y, a)
    torch.testing.assert_close(ours, torch.tensor(np.asarray(expected, dtype=np.float64)), rtol=1e-9, atol=0)
    # a shift whose predicted class is not the target: NaN (Quantus compares with y_batch); Quantus
    # writes np.NaN, removed in numpy 2: give it back for this call
    monkeypatch.setattr(np, "NaN", np.nan, raising=False)
    reference = quantus.Continuity(nr_steps=nr_steps, normalise=False, disable_warnings=True,
                                   return_nan_when_prediction_changes=True)
    expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                         a_batch=a.numpy(), explain_func=quantus_explain())
    flagged = R.continuity(f, explain=fxattr.gradient(f), nr_steps=nr_steps, normalise=False,
                           return_nan_when_prediction_changes=True)
    ours = torch.vmap(flagged, in_dims=(None, 0, 0, 0))(params, x, y, a)
    assert torch.isnan(ours).any()
    torch.testing.assert_close(ours, torch.tensor(np.asarray(expected, dtype=np.float64)), rtol=1e-9, atol=0,
                               equal_nan=True)


def test_translation_is_quantus_batched_translation():
    from quantus.functions.perturb_func import batched_translation
    x = torch.rand(2, 5, 7, dtype=torch.float64)
    for shift in (-7, -3, 0, 2, 7):
        expected = batched_translation(x[None].numpy(), "black", shift, direction="x")[0]
        ours = R.translate(x, torch.tensor([shift]), x.amin())[0]
        torch.testing.assert_close(ours, torch.from_numpy(expected))


@pytest.mark.parametrize("discretise", ["top_n_sign", "sign", "rank"])
def test_consistency_matches_quantus(setup, discretise):
    from quantus.functions import discretise_func
    model, f, params, _, _, _ = setup
    x, y = inputs((model, f, params), 8, seed=4)
    a = torch.randn(8, *x.shape[1:], dtype=torch.float64)
    a[4:] = a[:4]            # pairs with equal explanations ...
    a[1, 0, 0, :5] = -a[1, 0, 0, :5]
    a[6] = a[1] * 2          # ... and a scaled copy (equal after normalisation)
    for abs_ in (False, True):
        reference = quantus.Consistency(discretise_func=getattr(discretise_func, discretise), abs=abs_,
                                        disable_warnings=True)
        expected = reference(model=AsDouble(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                             a_batch=a.numpy())
        ours = R.consistency(f, discretise_func=discretise, abs=abs_)(params, x, y, a)
        torch.testing.assert_close(ours, torch.tensor(np.asarray(expected, dtype=np.float64)))
    assert 0 < ours.sum() < 8  # the batch mixes agreeing and disagreeing examples


def test_default_noise_is_quantus_uniform_statistically():
    """With the input itself as explanation, a(x + eps) - a(x) = eps: the metric reads the noise."""
    model = tiny_mlp()
    f, params = fxattr.functionalize(model)
    x = torch.full((6,), 2.0, dtype=torch.float64)
    a = x.clone()
    torch.manual_seed(0)
    mean_ratio = R.avg_sensitivity(f, explain=fxattr.input(f), nr_samples=2000)(params, x, 0, a)
    # E||eps|| for eps ~ U(-0.2, 0.2)^6 is close to sqrt(6 * 0.2^2 / 3) (Jensen gap < 3%)
    assert mean_ratio.item() == pytest.approx(math.sqrt(6 * 0.04 / 3) / a.norm().item(), rel=0.04)
    worst = R.max_sensitivity(f, explain=fxattr.input(f), nr_samples=500)(params, x, 0, a)
    assert worst.item() <= 0.2 * math.sqrt(6) / a.norm().item()
    # relative input stability draws a positive shift in [0.02, 0.2]: (x - x') / x in [-0.1, -0.01]
    torch.manual_seed(1)
    batch = torch.vmap(R.relative_input_stability(f, explain=fxattr.input(f), nr_samples=50,
                                                  return_nan_when_prediction_changes=False),
                       in_dims=(None, 0, 0, 0), randomness="different")
    ris = batch(params, x.expand(3, 6), torch.zeros(3, dtype=torch.long), a.expand(3, 6))
    torch.testing.assert_close(ris, torch.full((3,), 1.0, dtype=torch.float64))  # a = x: ratio 1


def test_seeded_runs_reproduce_and_differ_per_example(setup):
    _, f, params, x, y, a = setup
    metric = torch.vmap(R.max_sensitivity(f, explain=fxattr.gradient(f), nr_samples=4),
                        in_dims=(None, 0, 0, 0), randomness="different")
    same = x[:1].expand(2, *x.shape[1:])
    torch.manual_seed(3)
    first = metric(params, same, y[:1].expand(2), a[:1].expand(2, *a.shape[1:]))
    torch.manual_seed(3)
    torch.testing.assert_close(metric(params, same, y[:1].expand(2), a[:1].expand(2, *a.shape[1:])), first)
    assert first[0] != first[1]


@pytest.mark.parametrize("name", ["max_sensitivity", "local_lipschitz_estimate", "relative_output_stability"])
def test_vmap_equals_loop_and_model_unchanged(setup, name):
    model, f, params, x, y, a = setup
    noise = uniform((x.shape[0], SAMPLES, *x.shape[1:]), -0.1, 0.1)
    metric = getattr(R, name)(f, explain=fxattr.gradient(f), nr_samples=SAMPLES, chunk_size=4)
    with model_unchanged(model):
        vmapped = batched(metric, params, x, y, a, noise=noise)
        looped = torch.stack([metric(params, x[i], y[i], a[i], noise=noise[i]) for i in range(len(x))])
    torch.testing.assert_close(vmapped, looped)
    continuity = R.continuity(f, explain=fxattr.gradient(f), nr_steps=4)
    torch.testing.assert_close(torch.vmap(continuity, in_dims=(None, 0, 0, 0))(params, x, y, a),
                               torch.stack([continuity(params, *t) for t in zip(x, y, a)]))


def test_float32_agrees_with_float64(setup):
    model, f, params, x, y, a = setup
    model32 = tiny_cnn(1).float()
    f32, params32 = fxattr.functionalize(model32)
    noise = uniform((SAMPLES, *x.shape[1:]), -0.2, 0.2)
    for name in ("max_sensitivity", "relative_input_stability"):
        m64 = getattr(R, name)(f, explain=fxattr.gradient(f), nr_samples=SAMPLES)
        m32 = getattr(R, name)(f32, explain=fxattr.gradient(f32), nr_samples=SAMPLES)
        out32 = m32(params32, x[0].float(), y[0], a[0].float(), noise=noise.float())
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), m64(params, x[0], y[0], a[0], noise=noise),
                                   rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["max_sensitivity", "avg_sensitivity"])
def test_sensitivity_is_differentiable(name):
    """d metric / d (x, a weight, the attribution) against finite differences in float64; the
    gradient explainer of a smooth (tanh) model makes the re-explanations smooth in x and params."""
    model = tiny_mlp()
    f, params = fxattr.functionalize(model)
    x = torch.rand(6, dtype=torch.float64)
    noise = uniform((4, 6), -0.2, 0.2)
    metric = getattr(R, name)(f, explain=fxattr.gradient(f), nr_samples=4)

    def loss(x_, w, a_):
        return metric({**params, "0.weight": w}, x_, 1, a_, noise=noise)

    w = params["0.weight"].clone().requires_grad_()
    a = fxattr.gradient(f)(params, x, 1).detach().requires_grad_()
    assert torch.autograd.gradcheck(loss, (x.clone().requires_grad_(), w, a))
    functional = torch.func.grad(loss, argnums=(0, 1, 2))(x, params["0.weight"], a.detach())
    autograd = torch.autograd.grad(loss(x.clone().requires_grad_(), w, a), (w, a))
    torch.testing.assert_close(functional[1:], autograd)


@pytest.mark.slow
def test_compile_equals_eager():
    model = tiny_mlp()
    f, params = fxattr.functionalize(model)
    x, y = torch.rand(2, 6, dtype=torch.float64), torch.tensor([0, 2])
    a = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, y)
    noise = uniform((2, 3, 6), -0.2, 0.2)
    metric = R.max_sensitivity(f, explain=fxattr.gradient(f), nr_samples=3)

    def run(p, xx, t, aa, n):
        return torch.vmap(lambda *args: metric(p, *args[:3], noise=args[3]))(xx, t, aa, n)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(run)(params, x, y, a, noise), run(params, x, y, a, noise))


def test_bad_configuration_and_inputs(setup):
    _, f, params, x, y, a = setup
    g = fxattr.gradient(f)
    for kwargs, message in [
        ({}, r"explain is required"),
        ({"explain": g, "nr_samples": 0}, r"nr_samples must be an int >= 1"),
        ({"explain": g, "lower_bound": float("nan")}, r"lower_bound must be a finite number"),
        ({"explain": g, "lower_bound": 0.3, "upper_bound": 0.1}, r"upper_bound must be larger"),
        ({"explain": g, "norm_numerator": "l3"}, r"norm_numerator must be one of"),
        ({"explain": g, "abs": 1}, r"abs must be True or False"),
        ({"explain": "gradient"}, r"explain must be an explainer"),
    ]:
        with pytest.raises(FxattrError, match=rf"fxattr\.metrics\.max_sensitivity: {message}"):
            R.max_sensitivity(f, **kwargs)
    with pytest.raises(FxattrError, match=r"representation must be a callable"):
        R.relative_representation_stability(f, explain=g)
    with pytest.raises(FxattrError, match=r"relative_representation_stability"):
        R.relative_representation_stability(f, explain=g, representation="no_such_layer")
    with pytest.raises(FxattrError, match=r"discretise_func must be one of"):
        R.consistency(f, discretise_func="hash")
    with pytest.raises(FxattrError, match=r"not an nn.Module"):
        R.continuity(nn.Linear(2, 2), explain=g)
    metric = R.max_sensitivity(f, explain=g, nr_samples=3)
    with pytest.raises(FxattrError, match=r"noise must have shape \(3, 1, 8, 8\), got \(2, 1, 8, 8\)"):
        metric(params, x[0], y[0], a[0], noise=torch.zeros(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(FxattrError, match=r"attribution has shape \(3, 1, 8, 8\) but x has shape "
                                          r"\(1, 8, 8\)"):
        metric(params, x[0], y[0], a)
    with pytest.raises(FxattrError, match=r"shifts up to 9 pixels, more than the width 8"):
        R.continuity(f, explain=g, nr_steps=17)(params, x[0], y[0], a[0])
    with pytest.raises(FxattrError, match=r"called on a whole batch"):
        R.consistency(f)(params, x[0], y[0], a[0, 0])


def test_random_explainers_are_re_explained_with_fresh_noise():
    """SmoothGrad inside max_sensitivity / mprt: the re-explaining vmaps allow randomness."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(2 * 6 * 6, 3)).eval()
    f, params = fxattr.functionalize(model)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    explain = fxattr.smoothgrad(f, samples=4)
    a = torch.vmap(explain, in_dims=(None, 0, 0), randomness="different")(params, x, y)
    for metric in (fxattr.metrics.max_sensitivity(f, explain=explain, nr_samples=3),
                   fxattr.metrics.mprt(f, explain=explain)):
        out = torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")(params, x, y, a)
        assert torch.isfinite(out).all()
