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
