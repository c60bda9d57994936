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
    with pytest.raises(FxattrError, match="fxattr.m: k must be an int >= 1"):
        common.check_int("m", "k", 0)
    with pytest.raises(FxattrError, match="eps must be a finite number"):
        common.check_float("m", "eps", float("nan"))
    with pytest.raises(FxattrError, match="abs must be True or False"):
        common.check_bool("m", "abs", 1)
    with pytest.raises(FxattrError, match="'random' was removed"):
        common.check_baseline("m", "random")
    with pytest.raises(FxattrError, match="perturb_baseline must be one of"):
        common.check_baseline("m", "blue")
    with pytest.raises(FxattrError, match="does not broadcast"):
        common.prepare_attribution(torch.ones(2, 4, 4), normalise=False, abs=False,
                                   x=torch.ones(3, 4, 4), where="m")


# ------------------------------------------------------------------------------- Quantus harness

import functools  # noqa: E402

import quantus  # noqa: E402
from torch import nn  # noqa: E402

import fxattr  # noqa: E402
import fxattr.metrics as metrics  # noqa: E402
from tests.metrics.conftest import inputs, tiny_cnn  # noqa: E402

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
