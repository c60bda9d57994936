"""fxattr.text.generation_attribution: all T generated tokens in one vmapped call over output
cotangents equal the per-token loop of the same method, on padded batches; causality holds."""

import pytest
import torch

import fxattr
import fxattr.text
from tests.contract import model_unchanged
from tests.text.models import PAD, VOCAB, tiny

FACTORIES = {"gradient": fxattr.gradient, "input_x_gradient": fxattr.input_x_gradient,
             "integrated_gradients": fxattr.integrated_gradients}


def _loop(f, params, method, ids, mask, start, **config):
    per_token = fxattr.text.attribute(FACTORIES[method], f, **config)
    rows = [per_token(params, ids, mask, fxattr.text.next_token(ids[s], s - 1)) for s in range(start, len(ids))]
    return torch.stack(rows) * mask[start:, None]


@pytest.mark.parametrize("kind,method", [("gpt2", "input_x_gradient"), ("llama", "gradient"),
                                         ("gpt2", "integrated_gradients")])
def test_generation_equals_per_token_loop_on_a_padded_batch(kind, method):
    model = tiny(kind, "sdpa")
    f, params = fxattr.text.functionalize(model)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0   # a left-padded prompt
    mask[2, 7:] = 0   # a generation that stopped early (right padding)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD))
    config = {"steps": 4, "baseline": "pad"} if method == "integrated_gradients" else {}
    start = 4
    explain = fxattr.text.generation_attribution(f, method=method, chunk_size=2, **config)
    with model_unchanged(model):
        relevance = torch.vmap(explain, in_dims=(None, 0, 0, None))(params, ids, mask, start)
    assert relevance.shape == (3, 5, 9)
    for i in range(3):
        torch.testing.assert_close(relevance[i], _loop(f, params, method, ids[i], mask[i], start, **config),
                                   rtol=1e-4, atol=1e-6)
    # causality: token s depends only on tokens before it
    later = torch.ones(5, 9, dtype=torch.bool).triu(start)
    assert (relevance[:, later] == 0).all()
    assert (relevance[2, 3:] == 0).all() and (relevance[1, :, :2] == 0).all()
    assert relevance[0, :, :start].abs().sum() > 0


def test_generation_keeps_the_embedding_axis_and_is_differentiable():
    model = tiny("gpt2", "sdpa", torch.float64)
    f, params = fxattr.text.functionalize(model)
    ids = torch.randint(3, VOCAB, (6,))
    explain = fxattr.text.generation_attribution(f, method="input_x_gradient", reduce=None)
    full = explain(params, ids, None, 3)
    assert full.shape == (3, 6, 16)
    torch.testing.assert_close(full.sum(-1), fxattr.text.generation_attribution(f)(params, ids, None, 3))
    # second order w.r.t. one parameter against finite differences
    name = "transformer.h.0.ln_1.weight"
    v = torch.randn(3, 6, dtype=torch.float64)

    def loss(weight):
        return (fxattr.text.generation_attribution(f)({**params, name: weight}, ids, None, 3) * v).sum()
    weight = params[name].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(loss, (weight,), fast_mode=True)


def test_generation_errors():
    f, params = fxattr.text.functionalize(tiny("gpt2"))
    ids = torch.randint(3, VOCAB, (6,))
    explain = fxattr.text.generation_attribution(f)
    with pytest.raises(fxattr.FxattrError, match="1 <= start < length"):
        explain(params, ids, None, 6)
    with pytest.raises(fxattr.FxattrError, match="Python int"):
        explain(params, ids, None, torch.tensor(3))
    with pytest.raises(fxattr.FxattrError, match="method must be"):
        fxattr.text.generation_attribution(f, method="lrp")
    with pytest.raises(fxattr.FxattrError, match="chunk_size"):
        fxattr.text.generation_attribution(f, chunk_size=0)
    with pytest.raises(fxattr.FxattrError, match="steps"):
        fxattr.text.generation_attribution(f, method="integrated_gradients", steps=0)
    bert, _ = fxattr.text.functionalize(tiny("bert"))
    with pytest.raises(fxattr.FxattrError, match="causal"):
        fxattr.text.generation_attribution(bert)


@pytest.mark.slow
def test_compile_equals_eager():
    model = tiny("gpt2", "sdpa", layers=1)
    f, params = fxattr.text.functionalize(model)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    explain = torch.vmap(fxattr.text.generation_attribution(f, chunk_size=2), in_dims=(None, 0, 0, None))
    torch._dynamo.reset()
    eager = explain(params, ids, mask, 3)
    compiled = torch.compile(explain, fullgraph=True, backend="aot_eager")(params, ids, mask, 3)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
