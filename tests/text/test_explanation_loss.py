"""Explanation losses on transformers: torch.func.grad of a loss of an explanation with respect to
the parameters of BERT (through fxattr.text) and ViT (fxattr.functionalize + math_attention) agrees
with finite differences in float64. The fused CPU attention kernel has no double backward: the
math kernel (attention="math", the front door's default, or fxattr.text.math_attention) is needed,
and the fused one fails loudly (never silently)."""

import pytest
import torch

import fxattr
import fxattr.text
from tests.contract import assert_second_order, model_unchanged
from tests.text.models import VOCAB, tiny

BERT_PARAMS = ["bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight",
               "classifier.weight"]
VIT_PARAMS = ["vit.layers.0.attention.k_proj.weight", "vit.embeddings.cls_token", "classifier.bias"]


def _bert_case(attention="math"):
    model = tiny("bert", "sdpa", torch.float64)
    f, params = fxattr.text.functionalize(model, attention=attention)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return model, f, params, ids, mask, torch.tensor([0, 2])


@pytest.mark.parametrize("method,config", [(fxattr.gradient, {}),
                                           (fxattr.integrated_gradients, {"steps": 3, "baseline": "pad"})])
def test_bert_explanation_loss_matches_finite_differences(method, config):
    model, f, params, ids, mask, labels = _bert_case()
    explain = torch.vmap(fxattr.text.attribute(method, f, **config), in_dims=(None, 0, 0, 0))
    v = torch.randn(ids.shape, dtype=torch.float64)

    def loss(*chosen):
        return (explain({**params, **dict(zip(BERT_PARAMS, chosen))}, ids, mask, labels) * v).sum()
    chosen = [params[n].clone().requires_grad_(True) for n in BERT_PARAMS]
    with model_unchanged(model):
        assert torch.autograd.gradcheck(loss, chosen, fast_mode=True)
        # the functional route over ALL params (integer buffers stay in the module) agrees
        functional = torch.func.grad(lambda p: (explain(p, ids, mask, labels) * v).sum())(params)
    autograd = torch.autograd.grad(loss(*chosen), chosen)
    for name, g in zip(BERT_PARAMS, autograd):
        torch.testing.assert_close(functional[name], g)


def test_fused_attention_has_no_double_backward_and_fails_loudly():
    _, f, params, ids, mask, labels = _bert_case(attention="auto")
    explain = torch.vmap(fxattr.text.attribute(fxattr.gradient, f), in_dims=(None, 0, 0, 0))
    first_order = explain(params, ids, mask, labels)   # fine: first order
    _, f_math, _, _, _, _ = _bert_case()
    torch.testing.assert_close(first_order, torch.vmap(fxattr.text.attribute(fxattr.gradient, f_math),
                                                       in_dims=(None, 0, 0, 0))(params, ids, mask, labels))
    with pytest.raises(RuntimeError, match="_scaled_dot_product_flash_attention_for_cpu_backward"):
        torch.func.grad(lambda p: explain(p, ids, mask, labels).square().sum())(params)


@pytest.mark.parametrize("method,config", [(fxattr.gradient, {}), (fxattr.integrated_gradients, {"steps": 3})])
def test_vit_explanation_loss_matches_finite_differences(method, config):
    model = tiny("vit", "sdpa", torch.float64)
    f, params = fxattr.functionalize(model, output=lambda out: out.logits)
    explain = method(fxattr.text.math_attention(f), **config)
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    with model_unchanged(model):
        assert_second_order(explain, params, x, 1, param_names=VIT_PARAMS)
    with pytest.raises(RuntimeError, match="_scaled_dot_product_flash_attention_for_cpu_backward"):
        torch.func.grad(lambda p: method(f, **config)(p, x, 1).square().sum())(params)


def test_math_attention_rejects_a_non_callable():
    with pytest.raises(fxattr.FxattrError, match="callable"):
        fxattr.text.math_attention(3)
