"""Localisation metrics against Quantus 0.6.0 (random continuous attributions: no ties), hand-made
cases, scikit-learn's ROC AUC (ties included), vmap == loop, dtypes, compile and errors."""

import numpy as np
import pytest
import torch

import fxattr
from fxattr.errors import FxattrError
from fxattr.metrics import common

from tests.metrics.conftest import inputs

B = 6
MASK_METRICS = ["pointing_game", "attribution_localisation", "top_k_intersection",
                "relevance_rank_accuracy", "relevance_mass_accuracy", "auc"]


def random_masks(n: int, size: int = 8, seed: int = 3) -> torch.Tensor:
    """Boxes of random position and size, never empty, never full."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for i in range(n):
        top, left = torch.randint(0, size - 3, (2,), generator=generator).tolist()
        height, width = torch.randint(2, 5, (2,), generator=generator).tolist()
        masks[i, 0, top:top + height, left:left + width] = True
    return masks


def batched(metric, extra: bool = True):
    dims = (None, 0, 0, 0, 0) if extra else (None, 0, 0, 0)
    return torch.vmap(metric, in_dims=dims, randomness="different")


def quantus_scores(name: str, model, x, y, a, s=None, custom=None, **config):
    import quantus
    cls = getattr(quantus, name)
    metric = cls(disable_warnings=True, **config)
    kwargs = {"custom_batch": custom} if custom is not None else {}
    scores = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(),
                    s_batch=None if s is None else s.numpy().astype(np.float64), **kwargs)
    return torch.tensor(np.asarray(scores, dtype=np.float64))


@pytest.fixture
def case(cnn1):
    model, f, params = cnn1
    x, y = inputs(cnn1, B)
    masks = random_masks(B)
    # relevance leaning towards the mask, so that hits and misses both occur
    a = torch.randn(B, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + masks
    return model, f, params, x, y, a, masks


QUANTUS_CASES = [
    ("PointingGame", "pointing_game", {}),
    ("PointingGame", "pointing_game", {"abs": True}),
    ("AttributionLocalisation", "attribution_localisation", {}),
    ("AttributionLocalisation", "attribution_localisation", {"positive_attributions": True, "abs": False}),
    ("TopKIntersection", "top_k_intersection", {"k": 7}),
    ("TopKIntersection", "top_k_intersection", {"k": 12, "concept_influence": True, "abs": True}),
    ("RelevanceRankAccuracy", "relevance_rank_accuracy", {}),
    ("RelevanceRankAccuracy", "relevance_rank_accuracy", {"abs": True}),
    ("RelevanceMassAccuracy", "relevance_mass_accuracy", {"abs": True}),
    ("RelevanceMassAccuracy", "relevance_mass_accuracy", {"normalise": False}),
    ("AUC", "auc", {}),
    ("AUC", "auc", {"abs": True}),
]


@pytest.mark.parametrize("quantus_name, name, config", QUANTUS_CASES,
                         ids=[f"{n}-{'-'.join(map(str, c.values())) or 'default'}"
                              for _, n, c in QUANTUS_CASES])
def test_matches_quantus(case, quantus_name, name, config):
    model, f, params, x, y, a, masks = case
    expected = quantus_scores(quantus_name, model, x, y, a, masks, **config)
    got = batched(getattr(fxattr.metrics, name)(f, **config))(params, x, y, a, masks)
    assert got.dtype == torch.float64 and got.shape == (B,)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    if name == "pointing_game":
        assert 0 < got.sum() < B  # both hits and misses were compared


def test_focus_matches_quantus(cnn1):
    model, f, params = cnn1
    x, y = inputs(cnn1, B)
    a = torch.randn(B, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    flags = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]])
    expected = quantus_scores("Focus", model, x, y, a, custom=flags.numpy())
    got = batched(fxattr.metrics.focus(f))(params, x, y, a, flags)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    # bool flags and an odd-sized map (split at H // 2, W // 2)
    odd = torch.rand(3, 7, 5, dtype=torch.float64)
    flag = torch.tensor([True, False, False, False])
    score = fxattr.metrics.focus(f, normalise=False)(params, x[0], y[0], odd, flag)
    torch.testing.assert_close(score, odd[:, :3, :2].sum() / (odd.sum() + 1e-9))


def test_weighted_variants_follow_the_paper(case):
    # Quantus 0.6.0 writes these into bool arrays / divides by the batch's size (documented): the
    # numbers here are the intended ones, built from Quantus's unweighted scores.
    model, f, params, x, y, a, masks = case
    share = masks.double().mean((1, 2, 3))
    hits = quantus_scores("PointingGame", model, x, y, a, masks)
    got = batched(fxattr.metrics.pointing_game(f, weighted=True))(params, x, y, a, masks)
    torch.testing.assert_close(got, hits * (1 - share))
    inside = quantus_scores("AttributionLocalisation", model, x, y, a, masks)
    got = batched(fxattr.metrics.attribution_localisation(f, weighted=True))(params, x, y, a, masks)
    torch.testing.assert_close(got, inside * share, rtol=1e-4, atol=1e-9)


def test_hand_computed_values(mlp):
    _, f, params = mlp
    x, t = torch.zeros(6), torch.tensor(0)
    a = torch.tensor([[[0.1, 0.9], [0.4, -0.2]]], dtype=torch.float64)          # (1, 2, 2)
    inside = torch.tensor([[[False, True], [False, False]]])
    outside = torch.tensor([[[True, False], [False, False]]])
    m = fxattr.metrics
    assert m.pointing_game(f)(params, x, t, a, inside) == 1
    assert m.pointing_game(f)(params, x, t, a, outside) == 0
    assert m.pointing_game(f, weighted=True)(params, x, t, a, inside) == 0.75
    # abs: |a| = [.1, .9, .4, .2], total 1.6; inside .9
    torch.testing.assert_close(m.attribution_localisation(f)(params, x, t, a, inside),
                               torch.tensor(0.9 / (1.6 + 1e-9 * 0.9), dtype=torch.float64))
    torch.testing.assert_close(m.relevance_mass_accuracy(f, normalise=False)(params, x, t, a, outside),
                               torch.tensor(0.1 / 1.2, dtype=torch.float64))
    two = torch.tensor([[[True, True], [False, False]]])
    # top-2 by value: 0.9, 0.4 -> one of two inside
    assert m.relevance_rank_accuracy(f)(params, x, t, a, two) == 0.5
    assert m.top_k_intersection(f, k=1)(params, x, t, a, two) == 1
    assert m.top_k_intersection(f, k=3, concept_influence=True)(params, x, t, a, two) == (2 / 3) / 0.5
    # ROC: inside scores {.1, .9} vs outside {.4, -.2}: pairs won 3 of 4
    assert m.auc(f)(params, x, t, a, two) == 0.75


def test_auc_with_ties_matches_sklearn_and_channels_broadcast(mlp):
    from sklearn.metrics import roc_auc_score
    _, f, params = mlp
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (3, 6, 6), generator=generator).double()            # many ties, 3 channels
    mask = torch.rand(1, 6, 6, generator=generator) > 0.6
    got = fxattr.metrics.auc(f, normalise=False)(params, torch.zeros(6), 0, a, mask)
    expected = roc_auc_score(mask.expand(3, 6, 6).reshape(-1).numpy(), a.reshape(-1).numpy())
    assert abs(got.item() - expected) < 1e-12
    # a full-channel mask gives the same as the broadcast one
    same = fxattr.metrics.auc(f, normalise=False)(params, torch.zeros(6), 0, a, mask.expand(3, 6, 6))
    assert same == got


@pytest.mark.parametrize("name", MASK_METRICS)
def test_empty_mask_gives_nan(case, name):
    _, f, params, x, y, a, masks = case
    masks = masks.clone()
    masks[1] = False
    config = {"k": 5} if name == "top_k_intersection" else {}
    scores = batched(getattr(fxattr.metrics, name)(f, **config))(params, x, y, a, masks)
    assert torch.isnan(scores[1]) and not torch.isnan(scores[[0, 2, 3, 4, 5]]).any()


@pytest.mark.parametrize("name", [*MASK_METRICS, "focus"])
def test_vmap_equals_loop_and_dtypes(case, name, dtype):
    _, f, params, x, y, a, masks = case
    a = a.to(dtype)
    extra = torch.eye(4, dtype=torch.int64)[torch.arange(B) % 4] if name == "focus" else masks
    config = {"k": 5} if name == "top_k_intersection" else {}
    metric = getattr(fxattr.metrics, name)(f, **config)
    vmapped = batched(metric)(params, x, y, a, extra)
    looped = torch.stack([metric(params, x[i], y[i], a[i], extra[i]) for i in range(B)])
    assert vmapped.dtype == dtype and vmapped.shape == (B,)
    torch.testing.assert_close(vmapped, looped, equal_nan=True)


def test_normalise_batch_convention_gives_the_same_scores(case):
    # every localisation score is invariant to a positive scale: per-example == Quantus's batch
    _, f, params, x, y, a, masks = case
    for name in MASK_METRICS:
        config = {"k": 5} if name == "top_k_intersection" else {}
        per_example = batched(getattr(fxattr.metrics, name)(f, **config))(params, x, y, a, masks)
        config["normalise"] = False
        metric = batched(getattr(fxattr.metrics, name)(f, **config))
        whole = metric(params, x, y, common.normalise_batch(a), masks)
        torch.testing.assert_close(per_example, whole, rtol=1e-6, atol=1e-9)


def test_errors(mlp):
    _, f, params = mlp
    x, t = torch.zeros(6), 0
    a = torch.rand(1, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    m = fxattr.metrics
    with pytest.raises(FxattrError, match="metrics.auc: mask must be a bool tensor, got dtype torch.float32"):
        m.auc(f)(params, x, t, a, mask.float())
    with pytest.raises(FxattrError, match=r"mask has shape \(1, 4, 5\) but the attribution has "
                                          r"shape \(1, 4, 4\)"):
        m.pointing_game(f)(params, x, t, a, torch.zeros(1, 4, 5, dtype=torch.bool))
    with pytest.raises(FxattrError, match=r"mask has shape \(4, 4\)"):
        m.relevance_rank_accuracy(f)(params, x, t, a, mask[0])
    with pytest.raises(FxattrError, match="attribution must be a floating-point tensor"):
        m.relevance_mass_accuracy(f)(params, x, t, a.long(), mask)
    with pytest.raises(FxattrError, match="mask must be a bool tensor of shape"):
        m.attribution_localisation(f)(params, x, t, a, [[True]])
    with pytest.raises(FxattrError, match="k=17 exceeds the attribution's 16 features"):
        m.top_k_intersection(f, k=17)(params, x, t, a, mask)
    with pytest.raises(FxattrError, match="top_k_intersection: k must be an int >= 1"):
        m.top_k_intersection(f, k=0)
    with pytest.raises(FxattrError, match="pointing_game: weighted must be True or False"):
        m.pointing_game(f, weighted=1)
    with pytest.raises(FxattrError, match="auc: f must be a function"):
        m.auc(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        m.auc(f, True)  # configuration is keyword-only
    with pytest.raises(FxattrError, match=r"quadrants must be a \(4,\) tensor"):
        m.focus(f)(params, x, t, a, torch.ones(3, dtype=torch.long))
    with pytest.raises(FxattrError, match="quadrants must be bool or 0/1 integers"):
        m.focus(f)(params, x, t, a, torch.ones(4))
    with pytest.raises(FxattrError, match=r"focus: the attribution must be \(C, H, W\)"):
        m.focus(f)(params, x, t, a[0], torch.ones(4, dtype=torch.bool))


@pytest.mark.slow
def test_compile_equals_eager(case):
    _, f, params, x, y, a, masks = case
    for name in ("relevance_rank_accuracy", "auc"):
        metric = batched(getattr(fxattr.metrics, name)(f))
        torch._dynamo.reset()
        compiled = torch.compile(metric, backend="aot_eager", fullgraph=False)
        torch.testing.assert_close(compiled(params, x, y, a, masks), metric(params, x, y, a, masks))
