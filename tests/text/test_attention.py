"""Attention rollout and gradient-weighted attention relevance (Chefer et al. 2021) against the
rules computed by hand from the model's own output_attentions, on tiny ViT and BERT."""

import pytest
import torch

import fxattr
import fxattr.text
from tests.contract import model_unchanged
from tests.text.models import VOCAB, tiny


def _vit(dtype=torch.float64, attention="eager"):
    model = tiny("vit", attention, dtype)
    f, params = fxattr.functionalize(model, output=lambda out: out.logits)
    return model, f, params, torch.randn(3, 1, 8, 8, dtype=dtype), torch.tensor([0, 2, 1])


def _reference(model, x, target):
    """Both rules by hand from the attentions the model returns (output_attentions=True)."""
    out = model(pixel_values=x[None], output_attentions=True)
    maps = torch.stack([a[0] for a in out.attentions])              # (layers, heads, L, L)
    grads = torch.stack([g[0] for g in torch.autograd.grad(out.logits[0, target], out.attentions)])
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype)
    rollout = eye
    for a in maps.detach():
        a = 0.5 * a.mean(0) + 0.5 * eye
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    relevance = eye
    for a, g in zip(maps.detach(), grads):
        relevance = relevance + (g * a).clamp(min=0).mean(0) @ relevance
    return rollout[0], relevance[0]


def test_vit_rollout_and_relevance_match_the_rules_by_hand():
    model, f, params, x, y = _vit()
    with model_unchanged(model):
        rollout = torch.vmap(fxattr.text.attention_rollout(f), in_dims=(None, 0, 0))(params, x, y)
        relevance = torch.vmap(fxattr.text.attention_relevance(f), in_dims=(None, 0, 0))(params, x, y)
    assert rollout.shape == relevance.shape == (3, 5)       # class token + 2x2 patches
    for i in range(3):
        want_rollout, want_relevance = _reference(model, x[i], int(y[i]))
        torch.testing.assert_close(rollout[i], want_rollout)
        torch.testing.assert_close(relevance[i], want_relevance)
        torch.testing.assert_close(relevance[i], fxattr.text.attention_relevance(f)(params, x[i], y[i]))
    torch.testing.assert_close(rollout.sum(-1), torch.ones(3, dtype=rollout.dtype))  # rows stay stochastic
    assert (relevance[:, 1:] > 0).any()


def test_relevance_is_differentiable():
    _, f, params, x, _ = _vit()
    name = "vit.layers.0.attention.q_proj.weight"
    weight = params[name].clone().requires_grad_(True)
    v = torch.randn(5, dtype=torch.float64)

    def loss(w):
        return (fxattr.text.attention_relevance(f)({**params, name: w}, x[0], 1) * v).sum()
    assert torch.autograd.gradcheck(loss, (weight,), fast_mode=True)


def test_text_rollout_on_a_padded_batch_equals_each_sequence_alone():
    model = tiny("bert", "eager")
    f, params = fxattr.text.functionalize(model)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    for method in (fxattr.text.attention_rollout, fxattr.text.attention_relevance):
        explain = fxattr.text.attribute(method, f)
        batched = torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, torch.tensor([0, 1]))
        torch.testing.assert_close(batched[1, :4], explain(params, ids[1, :4], None, torch.tensor(1)))
        assert (batched[1, 4:] == 0).all()


def test_fused_attention_gives_a_clear_error():
    _, f, params, x, _ = _vit(torch.float32, "sdpa")
    for method in (fxattr.text.attention_rollout, fxattr.text.attention_relevance):
        with pytest.raises(fxattr.FxattrError, match="attn_implementation='eager'"):
            method(f)(params, x[0], 1)
    with pytest.raises(fxattr.FxattrError, match="head_fusion"):
        fxattr.text.attention_rollout(f, head_fusion="sum")
    with pytest.raises(fxattr.FxattrError, match="query"):
        fxattr.text.attention_relevance(f, query=1.0)


@pytest.mark.slow
def test_compile_equals_eager():
    """The capturing TorchFunctionMode and the vjp through zero offsets compile in one graph."""
    model = tiny("vit", "eager", layers=1)
    f, params = fxattr.functionalize(model, output=lambda out: out.logits)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    explain = torch.vmap(fxattr.text.attention_relevance(f), in_dims=(None, 0, 0))
    torch._dynamo.reset()
    eager = explain(params, x, y)
    compiled = torch.compile(explain, fullgraph=True, backend="aot_eager")(params, x, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_captured_maps_are_the_models_own_attentions(kind):
    model = tiny(kind, "eager", torch.float64)
    f, params = fxattr.text.functionalize(model)
    ids = torch.randint(3, VOCAB, (5,))
    maps = fxattr.text.attention_maps(lambda p, e: f(p, e), params, f.embed(params, ids))
    with torch.no_grad():
        own = model(input_ids=ids[None], output_attentions=True).attentions
    assert maps.shape == (2, 2, 5, 5)
    torch.testing.assert_close(maps, torch.stack([a[0] for a in own]))
