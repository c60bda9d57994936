"""Faithfulness metrics and the shared metric helpers, against Quantus 0.6.0 on tiny models."""

import numpy as np
import pytest
import scipy.stats
import torch

from fxattr.errors import FxattrError
from fxattr.metrics import common

# ------------------------------------------------------------------------------------- helpers

def test_normalise_and_abs_match_quantus_order():
    from quantus.functions.normalise_func import normalise_by_max
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(common.normalise_batch(a), torch.from_numpy(normalise_by_max(a.numpy())))
    per_example = common.prepare_attribution(a[0], normalise=True, abs=True)
    torch.testing.assert_close(per_example, torch.from_numpy(np.abs(normalise_by_max(a[0].numpy()))))
    zero = torch.zeros(2, 3)
    assert torch.equal(common.normalise_by_max(zero), zero)


def test_descending_order_is_argsort_of_negative_and_stable():
    a = torch.tensor([0.3, 0.9, 0.3, -1.0, 0.9])
    assert common.descending_order(a).tolist() == [1, 4, 0, 2, 3]
    b = torch.randn(50, dtype=torch.float64)
    assert common.descending_order(b).tolist() == np.argsort(-b.numpy()).tolist()


def test_correlations_match_scipy_under_vmap():
    a = torch.randn(4, 30, dtype=torch.float64)
    b = torch.randn(4, 30, dtype=torch.float64)
    a[0, 1] = a[0, 2]  # a tie: average ranks as scipy
    expected_p = torch.tensor(scipy.stats.pearsonr(a.numpy(), b.numpy(), axis=1)[0])
    expected_s = torch.tensor([scipy.stats.spearmanr(u, v)[0] for u, v in zip(a.numpy(), b.numpy())])
    torch.testing.assert_close(torch.vmap(common.pearson)(a, b), expected_p)
    torch.testing.assert_close(torch.vmap(common.spearman)(a, b), expected_s)


def test_ranks_average_ties_as_scipy_under_vmap():
    a = torch.randint(0, 5, (3, 25)).double()  # many ties
    expected = torch.from_numpy(scipy.stats.rankdata(a.numpy(), axis=1))
    torch.testing.assert_close(torch.vmap(common.ranks)(a), expected)


def test_cumulative_means_equal_the_sequential_recursion():
    x = torch.randn(24, dtype=torch.float64)
    steps = torch.randperm(24).reshape(8, 3)
    means = common.cumulative_means(x, x[steps].sum(1), torch.full((8,), 3))
    current, expected = x.clone(), []
    for s in steps:
        expected.append(current.mean())
        current[s] = current.mean()
    torch.testing.assert_close(means, torch.stack(expected))


def test_config_checks_name_the_argument():
    with pytest.raises(FxattrError, match="^k must be an int >= 1"):
        common.check_int("k", 0)
    with pytest.raises(FxattrError, match="eps must be a finite number"):
        common.check_float("eps", float("nan"))
    with pytest.raises(FxattrError, match="abs must be True or False"):
        common.check_bool("abs", 1)
    with pytest.raises(FxattrError, match="'random' was removed"):
        common.check_baseline("random")
    with pytest.raises(FxattrError, match="perturb_baseline must be one of"):
        common.check_baseline("blue")
    with pytest.raises(FxattrError, match="does not broadcast"):
        common.prepare_attribution(torch.ones(2, 4, 4), normalise=False, abs=False,
                                   x=torch.ones(3, 4, 4))


# ------------------------------------------------------------------------------- Quantus harness

import functools

import quantus
from torch import nn

import fxattr
from fxattr import metrics
from tests.metrics.conftest import inputs, tiny_cnn

RTOL = 1e-4


class _Double(nn.Module):
    """Quantus feeds the model ``torch.Tensor(x)`` (float32): compute in float64 all the same."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.double())


def _quantus(metric, model, x, y, a, **kwargs):
    result = metric(model=_Double(model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
                    a_batch=a.numpy(), device="cpu", channel_first=True, **kwargs)
    if isinstance(result, dict):
        return result
    return torch.as_tensor(np.asarray(result, dtype=np.float64))


def _batched(metric, params, x, y, a, *extra):
    in_dims = (None, 0, 0, 0) + (0,) * len(extra)
    return torch.vmap(metric, in_dims=in_dims, randomness="different")(params, x, y, a, *extra)


@pytest.fixture(scope="module")
def setup1():
    model = tiny_cnn(1)
    f, params = fxattr.functionalize(model)
    x, y = inputs((model,), 3)
    a = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    return model, f, params, x, y, a


@pytest.fixture(scope="module")
def setup3():
    model = tiny_cnn(3)
    f, params = fxattr.functionalize(model)
    x, y = inputs((model,), 3)
    a = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    return model, f, params, x, y, a


@pytest.fixture
def trapz(monkeypatch):
    """Quantus 0.6.0 calls ``np.trapz``, removed in numpy 2.4; ``np.trapezoid`` is the same rule."""
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)


# ------------------------------------------------------------------------- parity: deterministic

@pytest.mark.parametrize("baseline", ["black", "mean", "white", 0.3])
def test_pixel_flipping_matches_quantus(setup3, baseline):
    model, f, params, x, y, a = setup3
    ours = _batched(metrics.pixel_flipping(f, features_in_step=8, perturb_baseline=baseline),
                    params, x, y, a)
    theirs = _quantus(quantus.PixelFlipping(features_in_step=8, perturb_baseline=baseline,
                                            disable_warnings=True), model, x, y, a)
    assert ours.shape == (3, 24)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


def test_pixel_flipping_auc_and_logits_match_quantus(setup1, trapz):
    model, f, params, x, y, a = setup1
    ours = _batched(metrics.pixel_flipping(f, features_in_step=2, softmax=False,
                                           return_auc_per_sample=True), params, x, y, a)
    theirs = _quantus(quantus.PixelFlipping(features_in_step=2, return_auc_per_sample=True,
                                            disable_warnings=True), model, x, y, a, softmax=False)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("order,baseline", [("morf", "black"), ("lerf", "mean"), ("morf", 0.5)])
def test_region_perturbation_matches_quantus_with_padding(setup3, order, baseline):
    model, f, params, x, y, a = setup3
    # patch 3 on 8 x 8: padded to 9 x 9 (0 before, 1 after), edge values; 9 blocks.
    ours = _batched(metrics.region_perturbation(f, patch_size=3, order=order, regions_evaluation=6,
                                                perturb_baseline=baseline), params, x, y, a)
    theirs = _quantus(quantus.RegionPerturbation(patch_size=3, order=order, regions_evaluation=6,
                                                 perturb_baseline=baseline, disable_warnings=True),
                      model, x, y, a)
    assert ours.shape == (3, 6)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("patch_size", [3, 4])
def test_selectivity_matches_quantus(setup3, patch_size):
    model, f, params, x, y, a = setup3
    ours = _batched(metrics.selectivity(f, patch_size=patch_size, perturb_baseline="mean"),
                    params, x, y, a)
    theirs = _quantus(quantus.Selectivity(patch_size=patch_size, perturb_baseline="mean",
                                          disable_warnings=True), model, x, y, a)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


def test_sensitivity_n_matches_quantus(setup1):
    model, f, params, x, y, a = setup1
    ours = metrics.sensitivity_n(f, features_in_step=2, n_max_percentage=0.5)(params, x, y, a)
    theirs = _quantus(quantus.SensitivityN(features_in_step=2, n_max_percentage=0.5,
                                           return_aggregate=False, disable_warnings=True),
                      model, x, y, a)
    assert ours.shape == (16,)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-6)


def test_faithfulness_estimate_matches_quantus(setup3):
    model, f, params, x, y, a = setup3
    ours = _batched(metrics.faithfulness_estimate(f, features_in_step=4), params, x, y, a)
    theirs = _quantus(quantus.FaithfulnessEstimate(features_in_step=4, disable_warnings=True),
                      model, x, y, a)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("baseline", ["black", "mean"])
def test_infidelity_matches_quantus(setup3, baseline):
    model, f, params, x, y, a = setup3
    ours = _batched(metrics.infidelity(f, perturb_patch_sizes=[2, 4], perturb_baseline=baseline),
                    params, x, y, a)
    theirs = _quantus(quantus.Infidelity(perturb_patch_sizes=[2, 4], perturb_baseline=baseline,
                                         n_perturb_samples=2, disable_warnings=True), model, x, y, a)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


def test_normalise_per_example_versus_quantus_batch_normalisation(setup3):
    """fxattr normalises each example by its own maximum (== Quantus called on that example alone);
    ``normalise_batch`` + ``normalise=False`` reproduces Quantus's whole-batch normalisation."""
    model, f, params, x, y, a = setup3
    a = a * torch.tensor([1.0, 3.0, 0.2], dtype=a.dtype)[:, None, None, None]
    q_metric = functools.partial(quantus.Infidelity, perturb_patch_sizes=[4], normalise=True,
                                 disable_warnings=True)
    per_example = _batched(metrics.infidelity(f, perturb_patch_sizes=[4], normalise=True), params, x, y, a)
    one_at_a_time = torch.cat([_quantus(q_metric(), model, x[i:i + 1], y[i:i + 1], a[i:i + 1])
                               for i in range(3)])
    torch.testing.assert_close(per_example, one_at_a_time, rtol=RTOL, atol=0)
    whole = _batched(metrics.infidelity(f, perturb_patch_sizes=[4], normalise=False), params, x, y,
                     metrics.common.normalise_batch(a))
    torch.testing.assert_close(whole, _quantus(q_metric(), model, x, y, a), rtol=RTOL, atol=0)
    assert not torch.allclose(whole, per_example)  # the convention matters for infidelity


def test_irof_matches_quantus_on_the_same_segments(setup1, trapz, monkeypatch):
    # one channel: Quantus 0.6.0's IROF fails on more (its (B, 1, H, W) mask against the image).
    model, f, params, x, y, a = setup1
    generator = torch.Generator().manual_seed(3)
    segments = torch.randint(0, 6, (3, 8, 8), generator=generator)
    assert all(len(s.unique()) == 6 for s in segments)
    queue = iter(segments.numpy())
    import quantus.metrics.faithfulness.irof as quantus_irof
    monkeypatch.setattr(quantus_irof.utils, "get_superpixel_segments",
                        lambda img, segmentation_method: next(queue))
    # Quantus's "mean" is over the whole batch it is given: one example per batch, as fxattr.
    theirs = _quantus(quantus.IROF(return_aggregate=False, disable_warnings=True), model, x, y, a,
                      batch_size=1)
    # max_segments=8: labels 6 and 7 have no pixels and are skipped.
    ours = _batched(metrics.irof(f, max_segments=8), params, x, y, a, segments)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)
    unbatched = metrics.irof(f)(params, x[0], y[0], a[0], segments[0])
    torch.testing.assert_close(unbatched, ours[0])


def test_road_matches_quantus_without_noise(setup1):
    model, f, params, x, y, a = setup1
    percentages = [5, 30, 60, 95]
    theirs = _quantus(quantus.ROAD(noise=0.0, percentages=percentages, return_aggregate=False,
                                   disable_warnings=True), model, x, y, a)
    ours = _batched(metrics.road(f, noise=0.0, percentages=percentages), params, x, y, a)
    assert ours.shape == (3, 4)
    torch.testing.assert_close(ours.mean(0), torch.tensor([theirs[p] for p in percentages]))


def test_road_imputation_matches_quantus_linear_system():
    from quantus.functions.perturb_func import noisy_linear_imputation
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(2, 7, 9, dtype=torch.float64, generator=generator)
    for fraction in (0.1, 0.6, 0.97):
        missing = torch.rand(7, 9, generator=generator) < fraction
        indices = np.flatnonzero(missing.numpy().reshape(-1))
        theirs = noisy_linear_imputation(x.numpy(), indices, noise=0.0)
        torch.testing.assert_close(metrics.road_imputation(x, missing), torch.from_numpy(theirs))
    # a constant image is reproduced exactly; vmap over masks works.
    flat = torch.full((1, 5, 5), 0.7, dtype=torch.float64)
    masks = torch.rand(4, 5, 5, generator=generator) < 0.5
    out = torch.vmap(metrics.road_imputation, in_dims=(None, 0))(flat, masks)
    torch.testing.assert_close(out, flat.expand(4, 1, 5, 5))


def test_sufficiency_matches_quantus(setup1):
    model, f, params, x, y, _ = setup1
    generator = torch.Generator().manual_seed(4)
    x = 3 * torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(6, dtype=torch.int64)
    assert model(x).argmax(1).tolist() == [3, 1, 1, 1, 3, 3]
    centres = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=generator)
    a = centres[torch.tensor([0, 0, 0, 1, 1, 1])] + 0.3 * torch.randn(6, 1, 8, 8, dtype=torch.float64,
                                                                        generator=generator)
    ours = metrics.sufficiency(f, threshold=0.9)(params, x, y, a)
    theirs = _quantus(quantus.Sufficiency(threshold=0.9, disable_warnings=True), model, x, y, a)
    assert (ours > 0).any() and (ours < 1).any(), ours  # a case that can fail
    torch.testing.assert_close(ours, theirs)


# ---------------------------------------------------------------------------- parity: replayed

def test_faithfulness_correlation_matches_quantus_on_replayed_subsets(setup3, monkeypatch):
    model, f, params, x, y, a = setup3
    runs, size = 12, 20
    generator = torch.Generator().manual_seed(7)
    subsets = torch.stack([torch.stack([torch.randperm(192, generator=generator)[:size]
                                        for _ in range(runs)]) for _ in range(3)])
    # Quantus draws one subset per example inside the loop over runs.
    queue = iter([subsets[b, r].numpy() for r in range(runs) for b in range(3)])
    monkeypatch.setattr(np.random, "choice", lambda *args, **kwargs: next(queue))
    theirs = _quantus(quantus.FaithfulnessCorrelation(nr_runs=runs, subset_size=size,
                                                      return_aggregate=False, disable_warnings=True),
                      model, x, y, a)
    ours = _batched(metrics.faithfulness_correlation(f, nr_runs=runs, subset_size=size),
                    params, x, y, a, subsets)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


def test_monotonicity_correlation_matches_quantus_on_replayed_draws(setup1, monkeypatch):
    model, f, params, x, y, a = setup1
    groups, samples = 32, 3
    draws = torch.rand(3, groups, samples, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    # Quantus draws one uniform value per example for each (group, sample) perturbation.
    queue = iter([draws[:, g, s].numpy() for g in range(groups) for s in range(samples)])
    monkeypatch.setattr(np.random, "uniform", lambda low=0.0, high=1.0, size=None: next(queue))
    theirs = _quantus(quantus.MonotonicityCorrelation(nr_samples=samples, features_in_step=2,
                                                      disable_warnings=True), model, x, y, a)
    ours = _batched(metrics.monotonicity_correlation(f, nr_samples=samples, features_in_step=2),
                    params, x, y, a, draws)
    torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-7)


def _insertion(arr, indices, perturb_baseline, source, **kwargs):
    """The paper's monotonicity step: insert x's values (Quantus writes the baseline again)."""
    out = arr.copy()
    rows = np.arange(arr.shape[0])[:, None]
    out[rows, indices] = source[rows, indices]
    return out


def test_monotonicity_follows_the_paper_and_matches_patched_quantus(monkeypatch):
    # A linear model: the softmax-free score after inserting a set S of features from the
    # black baseline b is c + sum_{i in S} w_i (x_i - b): monotone iff every w_i (x_i - b) >= 0.
    torch.manual_seed(0)
    model_q = model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).double().eval()
    f, params = fxattr.functionalize(model)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.1
    w = model[1].weight[0].detach().reshape(1, 4, 4)
    x[:2] = torch.where(w > 0, x[:2], x[:2].amin(dim=(1, 2, 3), keepdim=True))  # contributions >= 0
    y = torch.zeros(4, dtype=torch.int64)
    a = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    ours = _batched(metrics.monotonicity(f, softmax=False), params, x, y, a)
    assert ours.tolist() == [True, True, False, False]
    quantus_metric = quantus.Monotonicity(disable_warnings=True)
    assert _quantus(quantus_metric, model_q, x, y, a, softmax=False).tolist() == [1, 1, 1, 1]  # the bug
    patched = quantus.Monotonicity(disable_warnings=True)
    patched.perturb_func = functools.partial(_insertion, perturb_baseline="black",
                                             source=x.reshape(4, -1).numpy())
    theirs = _quantus(patched, model_q, x, y, a, softmax=False)
    assert ours.tolist() == theirs.bool().tolist()


# ---------------------------------------------------------------------------------- composition

def _replays(x):
    """Per-example replay arguments and the metrics that take them."""
    generator = torch.Generator().manual_seed(11)
    n = x[0].numel()
    subsets = torch.stack([torch.stack([torch.randperm(n, generator=generator)[:6] for _ in range(5)])
                           for _ in range(len(x))])
    draws = torch.rand(len(x), 16, 2, dtype=x.dtype, generator=generator)
    road_draws = torch.randn(len(x), 3, *x.shape[1:], dtype=x.dtype, generator=generator)
    segments = torch.randint(0, 5, (len(x), *x.shape[2:]), generator=generator)
    return {"subsets": subsets, "draws": draws, "road_draws": road_draws, "segments": segments}


_CASES = {
    "pixel_flipping": (lambda f: metrics.pixel_flipping(f, features_in_step=4, perturb_baseline="mean"), None),
    "region_perturbation": (lambda f: metrics.region_perturbation(f, patch_size=3, regions_evaluation=4), None),
    "selectivity": (lambda f: metrics.selectivity(f, patch_size=4), None),
    "irof": (lambda f: metrics.irof(f, max_segments=6), "segments"),
    "faithfulness_correlation": (lambda f: metrics.faithfulness_correlation(f, nr_runs=5, subset_size=6), "subsets"),
    "faithfulness_estimate": (lambda f: metrics.faithfulness_estimate(f, features_in_step=8), None),
    "monotonicity": (lambda f: metrics.monotonicity(f, features_in_step=4), None),
    "monotonicity_correlation": (lambda f: metrics.monotonicity_correlation(f, nr_samples=2, features_in_step=4), "draws"),
    "infidelity": (lambda f: metrics.infidelity(f, perturb_patch_sizes=[2, 4]), None),
    "road": (lambda f: metrics.road(f, percentages=[10, 40, 80], noise=0.05), "road_draws"),
}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_vmap_equals_loop(setup1, name):
    _model, f, params, x, y, a = setup1
    build, replay = _CASES[name]
    metric = build(f)
    extra = () if replay is None else (_replays(x)[replay],)
    vmapped = _batched(metric, params, x, y, a, *extra)
    looped = torch.stack([metric(params, x[i], y[i], a[i], *(e[i] for e in extra)) for i in range(len(x))])
    torch.testing.assert_close(vmapped, looped)


def test_float32_and_float64_agree(setup1):
    _model, f, params, x, y, a = setup1
    f32, params32 = fxattr.functionalize(tiny_cnn(1).float())
    for build in (lambda g: metrics.pixel_flipping(g, features_in_step=4),
                  lambda g: metrics.infidelity(g, perturb_patch_sizes=[4]),
                  lambda g: metrics.faithfulness_estimate(g, features_in_step=4)):
        out64 = _batched(build(f), params, x, y, a)
        out32 = _batched(build(f32), params32, x.float(), y, a.float())
        assert out32.dtype == torch.float32 and out64.dtype == torch.float64
        torch.testing.assert_close(out32, out64.float(), rtol=1e-3, atol=1e-4)


def test_model_unchanged(setup1):
    model, f, params, x, y, a = setup1
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(p.requires_grad, m.training) for m in model.modules() for p in m.parameters(recurse=False)]
    replays = _replays(x)
    for build, replay in _CASES.values():
        extra = () if replay is None else (replays[replay],)
        _batched(build(f), params, x, y, a, *extra)
    metrics.sensitivity_n(f, features_in_step=4)(params, x, y, a)
    metrics.sufficiency(f)(params, x, y, a)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == [(p.requires_grad, m.training) for m in model.modules() for p in m.parameters(recurse=False)]


_DIFFERENTIABLE = {
    "infidelity": lambda f: metrics.infidelity(f, perturb_patch_sizes=[4], normalise=True),
    "faithfulness_correlation": lambda f: metrics.faithfulness_correlation(f, nr_runs=6, subset_size=8),
    "faithfulness_estimate": lambda f: metrics.faithfulness_estimate(f, features_in_step=16),
}


@pytest.mark.parametrize("name", sorted(_DIFFERENTIABLE))
def test_gradients_match_finite_differences(setup1, name):
    _model, f, params, x, y, a = setup1
    metric = _DIFFERENTIABLE[name](f)
    extra = ()
    if name == "faithfulness_correlation":  # fixed subsets: a deterministic function to check
        extra = (torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(i))[:8]
                              for i in range(6)]),)
    names = ["0.weight", "6.bias"]

    def of_attribution(a_):
        return metric(params, x[0], y[0], a_, *extra)

    def of_params(*chosen):
        return metric({**params, **dict(zip(names, chosen))}, x[0], y[0], a[0], *extra)

    a0 = a[0].clone().requires_grad_(True)
    chosen = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(of_attribution, (a0,), fast_mode=True)
    assert torch.autograd.gradgradcheck(of_attribution, (a0,), fast_mode=True)
    assert torch.autograd.gradcheck(of_params, chosen, fast_mode=True)
    # torch.func.grad (a metric as a training objective) agrees with autograd, and is not zero.
    functional = torch.func.grad(of_attribution)(a[0])
    (autograd,) = torch.autograd.grad(of_attribution(a0), a0)
    torch.testing.assert_close(functional, autograd)
    assert functional.abs().sum() > 0
    batched = torch.func.grad(lambda a_: _batched(metric, params, x, y, a_,
                                                  *(e.expand(3, *e.shape) for e in extra)).sum())(a)
    torch.testing.assert_close(batched[0], functional)


@pytest.mark.slow
def test_compile_equals_eager(setup1):
    _model, f, params, x, y, a = setup1
    torch._dynamo.reset()
    batch = torch.vmap(metrics.pixel_flipping(f, features_in_step=8), in_dims=(None, 0, 0, 0))
    torch.testing.assert_close(torch.compile(batch)(params, x, y, a), batch(params, x, y, a))


# ------------------------------------------------------------------------- random draws, replay

def test_uniform_baseline_draws_in_range_and_per_example(setup1):
    _model, f, params, x, y, a = setup1
    fixed = _batched(metrics.pixel_flipping(f, features_in_step=4, perturb_baseline=0.4), params, x, y, a)
    degenerate = _batched(metrics.pixel_flipping(f, features_in_step=4, perturb_baseline="uniform",
                                                 uniform_low=0.4, uniform_high=0.4), params, x, y, a)
    torch.testing.assert_close(degenerate, fixed)
    same = (x[:1].expand(2, -1, -1, -1), y[:1].expand(2), a[:1].expand(2, -1, -1, -1))
    drawn = _batched(metrics.pixel_flipping(f, features_in_step=4, perturb_baseline="uniform"), params, *same)
    assert not torch.allclose(drawn[0], drawn[1])  # randomness="different": one draw per example


def test_irof_uniform_baseline_draws_per_feature(setup3):
    _model, f, params, x, y, a = setup3
    segments = torch.randint(0, 4, (8, 8), generator=torch.Generator().manual_seed(13))
    fixed = metrics.irof(f, perturb_baseline=0.25)(params, x[0], y[0], a[0], segments)
    degenerate = metrics.irof(f, perturb_baseline="uniform", uniform_low=0.25, uniform_high=0.25)
    torch.testing.assert_close(degenerate(params, x[0], y[0], a[0], segments), fixed)
    drawn = metrics.irof(f, perturb_baseline="uniform")
    assert not torch.allclose(drawn(params, x[0], y[0], a[0], segments), fixed)


def test_faithfulness_correlation_draws_distinct_uniform_subsets(setup1):
    _model, f, params, x, y, a = setup1
    metric = metrics.faithfulness_correlation(f, nr_runs=5, subset_size=6)
    torch.manual_seed(3)
    drawn = metric(params, x[0], y[0], a[0])
    torch.manual_seed(3)
    subsets = torch.argsort(torch.rand(5, 64), dim=1)[:, :6]
    assert all(len(s.unique()) == 6 for s in subsets)
    torch.testing.assert_close(drawn, metric(params, x[0], y[0], a[0], subsets))


def test_road_replayed_noise_is_added_to_the_imputed_pixels(setup1):
    model, f, params, x, y, a = setup1
    draws = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    ours = metrics.road(f, percentages=[10, 40, 80], noise=0.5)(params, x[0], y[0], a[0], draws)
    order = np.argsort(-a[0].numpy().reshape(-1))
    expected = []
    for p, draw in zip([10, 40, 80], draws):
        missing = torch.zeros(64, dtype=torch.bool)
        missing[torch.from_numpy(order[:int(64 * p / 100)])] = True
        missing = missing.reshape(8, 8)
        imputed = torch.where(missing, metrics.road_imputation(x[0], missing) + 0.5 * draw, x[0])
        expected.append(float(model(imputed[None]).argmax() == y[0]))
    assert ours.tolist() == expected


def test_region_perturbation_random_order_removes_the_same_regions(setup3):
    _model, f, params, x, y, a = setup3
    morf = metrics.region_perturbation(f, patch_size=4, regions_evaluation=4)(params, x[0], y[0], a[0])
    shuffled = metrics.region_perturbation(f, patch_size=4, regions_evaluation=4, order="random")
    draws = torch.stack([shuffled(params, x[0], y[0], a[0]) for _ in range(6)])
    torch.testing.assert_close(draws[:, -1], morf[-1].expand(6))  # all 4 blocks gone: same image
    assert not torch.allclose(draws, morf.expand(6, 4))


# ------------------------------------------------------------------------------------- errors

def test_configuration_errors_are_clear(setup1):
    model, f, _params, _x, _y, _a = setup1
    cases = [
        (lambda: metrics.pixel_flipping(model), "not an nn.Module"),
        (lambda: metrics.pixel_flipping(f, features_in_step=0), "features_in_step must be an int >= 1"),
        (lambda: metrics.pixel_flipping(f, perturb_baseline="random"), "'random' was removed"),
        (lambda: metrics.pixel_flipping(f, perturb_baseline=float("inf")), "finite number"),
        (lambda: metrics.pixel_flipping(f, softmax="yes"), "softmax must be True or False"),
        (lambda: metrics.region_perturbation(f, order="top"), "order must be one of"),
        (lambda: metrics.sensitivity_n(f, n_max_percentage=1.5), "n_max_percentage must be <= 1.0"),
        (lambda: metrics.infidelity(f, perturb_patch_sizes=[]), "perturb_patch_sizes must be"),
        (lambda: metrics.road(f, percentages=[50, 100]), "percentages must be < 100"),
        (lambda: metrics.road(f, noise=-1.0), "noise must be >= 0.0"),
        (lambda: metrics.monotonicity_correlation(f, eps=float("nan")), "eps must be a finite number"),
        (lambda: metrics.faithfulness_correlation(f, nr_runs=1), "nr_runs must be an int >= 2"),
        (lambda: metrics.irof(f, max_segments=1), "max_segments must be an int >= 2"),
        (lambda: metrics.sufficiency(f, threshold="high"), "threshold must be a finite number"),
        (lambda: metrics.pixel_flipping(f, uniform_low=1.0, uniform_high=0.0), "uniform_high"),
    ]
    for build, message in cases:
        with pytest.raises(FxattrError, match=message):
            build()


def test_call_errors_are_clear(setup1, setup3):
    _model, f, params, x, y, a = setup1
    _, f3, params3, x3, y3, a3 = setup3
    cases = [
        (lambda: metrics.pixel_flipping(f)(params, x[0], y[0], a[0].long()), "attribution must be a floating"),
        (lambda: metrics.pixel_flipping(f)(params, x[0], y[0], torch.ones(2, 8, 8)), "does not broadcast"),
        (lambda: metrics.pixel_flipping(f, features_in_step=65)(params, x[0], y[0], a[0]), "exceeds the 64"),
        (lambda: metrics.region_perturbation(f, patch_size=9)(params, x[0], y[0], a[0]), "larger than x's"),
        (lambda: metrics.infidelity(f, perturb_patch_sizes=[3])(params, x[0], y[0], a[0]), "not a multiple"),
        (lambda: metrics.selectivity(f)(params, x[0, 0], y[0], a[0, 0]), r"shape \(C, H, W\)"),
        (lambda: metrics.faithfulness_correlation(f, nr_runs=3, subset_size=4)(
            params, x[0], y[0], a[0], torch.zeros(3, 5, dtype=torch.int64)), r"subsets must have shape \(3, 4\)"),
        (lambda: metrics.faithfulness_correlation(f, subset_size=64)(params, x[0], y[0], a[0]), "smaller than"),
        (lambda: _batched(metrics.irof(f), params, x, y, a, torch.zeros(3, 8, 8, dtype=torch.int64)),
         "pass max_segments="),
        (lambda: metrics.irof(f, max_segments=3)(params, x[0], y[0], a[0], torch.full((8, 8), 3)),
         r"labels must be in \[0, 3\)"),
        (lambda: metrics.road(f3)(params3, x3[0], y3[0], a3[0]), "must be one map"),
        (lambda: metrics.road(f)(params, x[0], lambda out: out[0], a[0]), "class index"),
        (lambda: metrics.monotonicity_correlation(f, perturb_baseline="black")(
            params, x[0], y[0], a[0], torch.zeros(64, 100)), "replays the 'uniform' baseline only"),
        (lambda: metrics.sensitivity_n(f)(params, x[:1], y[:1], a[:1]), "at least 2 examples"),
        (lambda: metrics.sufficiency(f)(params, x, y, a[:2]), "same length"),
    ]
    for call, message in cases:
        with pytest.raises(FxattrError, match=message):
            call()


def test_road_imputation_is_differentiable():
    generator = torch.Generator().manual_seed(12)
    x = torch.rand(2, 4, 5, dtype=torch.float64, generator=generator).requires_grad_(True)
    missing = torch.rand(4, 5, generator=generator) < 0.5
    v = torch.randn(2, 4, 5, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda x_: (metrics.road_imputation(x_, missing) * v).sum(), (x,))
