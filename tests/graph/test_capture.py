"""Capture: what the graph sees of the model (defaults, tensor attributes, hooks, tied parameters,
modules called several times) and the torch dynamo fallback for models torch.fx cannot trace
(Hugging Face transformers, tiny random configs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr
from fxattr.graph import Program, run, trace
from tests.propagation.test_regressions import OptionalScale, Permuted, Tied


def _placeholders(gm):
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def test_unpassed_parameters_take_their_defaults():
    f, params = fxattr.functionalize(OptionalScale().eval())
    gm = trace(f)
    assert _placeholders(gm) == ["x"]
    assert any(n.target is F.relu for n in gm.graph.nodes)  # the ``scale is None`` branch
    both = trace(f, ("x", "scale"))
    assert _placeholders(both) == ["x", "scale"]
    assert not any(n.target is F.relu for n in both.graph.nodes)
    x, s = torch.randn(4), torch.rand(6)
    torch.testing.assert_close(run(f, gm, params, x), f(params, x))
    torch.testing.assert_close(run(f, both, params, (x, s)), f(params, (x, s)))
    assert fxattr.graph.input_names(f, (x, s)) == ("x", "scale")
    assert fxattr.graph.input_names(f, {"scale": s, "x": x}) == ("x", "scale")


def test_tensor_attributes_are_constants_not_parameters():
    model = Permuted().double().eval()
    f, params = fxattr.functionalize(model)
    gm = trace(f)
    assert "perm" not in gm.meta["state_names"] and "gain" not in gm.meta["state_names"]
    program = Program(f, "test")
    x = torch.randn(4, dtype=torch.float64)
    _, _, raw = program.forward(params, x)
    torch.testing.assert_close(raw[0], f(params, x))


def test_hooked_module_is_traced_with_its_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    model[0].register_forward_hook(lambda module, args, out: out * 3.0 - 1.0)
    model[2].register_forward_pre_hook(lambda module, args: (args[0] + 0.5,))
    f, params = fxattr.functionalize(model)
    gm = trace(f)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "0" not in called and "2" not in called  # traced through, hooks inlined
    x = torch.randn(3)
    torch.testing.assert_close(run(f, gm, params, x), f(params, x))
    body, head = fxattr.graph.split(f, "1")
    torch.testing.assert_close(head(params, x, body(params, x)), f(params, x))


def test_hook_on_the_model_itself_is_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 2)).eval()
    model.register_forward_hook(lambda module, args, out: out * 2)
    f, _ = fxattr.functionalize(model)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr.lrp: .*Sequential\) has forward hooks"):
        fxattr.lrp(f, rule="z")


def test_tied_parameters_and_call_sites():
    torch.manual_seed(0)
    model = Tied().eval()
    f, params = fxattr.functionalize(model)
    gm = trace(f)
    assert gm.meta["aliases"] == {"head2.weight": "head.weight"}
    assert len([n for n in gm.graph.nodes if n.op == "call_module" and n.target == "shared"]) == 2
    x = torch.randn(4)
    torch.testing.assert_close(run(f, gm, params, x), f(params, x))
    # a gradient through the tied weight reaches the one entry of params
    grad = torch.func.grad(lambda p: run(f, gm, p, x).sum())(params)
    want = torch.func.grad(lambda p: f(p, x).sum())(params)
    torch.testing.assert_close(grad["head.weight"], want["head.weight"])


def test_untraceable_model_without_shape_says_how_to_capture_it():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    f, _ = fxattr.functionalize(Branchy())
    with pytest.raises(fxattr.FxattrError, match=r"input_shape"):
        trace(f)


def _hf(kind: str, attn: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    small = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, attn_implementation=attn)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(hidden_size=8, vocab_size=20, **small))
        return model, (4, 8), "inputs_embeds"
    if kind == "gpt2":
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            n_embd=8, n_layer=1, n_head=2, vocab_size=20, pad_token_id=0, attn_implementation=attn))
        return model, (4, 8), "inputs_embeds"
    if kind == "llama":
        model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(
            hidden_size=8, vocab_size=20, num_key_value_heads=1, pad_token_id=0, **small))
        return model, (4, 8), "inputs_embeds"
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=8, image_size=8, patch_size=4, num_channels=2, **small))
    return model, (2, 8, 8), "pixel_values"


class _Logits(nn.Module):
    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x):
        return self.model(**{self.name: x}).logits


@pytest.mark.slow
@pytest.mark.parametrize("kind,attn", [("bert", "eager"), ("bert", "sdpa"), ("gpt2", "eager"),
                                       ("llama", "sdpa"), ("vit", "eager")])
def test_transformers_models_are_captured(kind, attn):
    """torch.fx cannot trace these; with ``input_shape`` fxattr captures them with torch dynamo,
    parameters under the user's names, and the program computes the model: guided backprop on
    these ReLU-free models is exactly the gradient, under vmap."""
    model, shape, name = _hf(kind, attn)
    wrapped = _Logits(model.eval(), name).eval()
    f, params = fxattr.functionalize(wrapped, input_shape=shape)
    gm = trace(f)
    assert gm.meta["capture"] == "dynamo"
    program = Program(f, "test")
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert any(r.startswith("model.") and r in params for r in reads)
    origins = {info.origin for info in program.nodes.values() if info.origin}
    assert any("layer" in o or "h.0" in o for o in origins)
    x = torch.randn(2, *shape)
    t = torch.tensor([0, 1])
    torch.testing.assert_close(program.forward(params, x[0])[2][0], f(params, x[0]))
    guided = torch.vmap(fxattr.guided_backprop(f, seed="one"), in_dims=(None, 0, 0))(params, x, t)
    torch.testing.assert_close(guided, torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, x, t))


class _Conv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2): ``addmm(bias, x, weight)`` with weight (in, out)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(x.shape[0], x.shape[1], -1)


def test_addmm_is_a_kernel_layer():
    """``addmm(bias, x, W)`` is the dense layer ``F.linear(x, W.T, bias)`` for every rule: the
    same relevance as the ``nn.Linear`` form of the same model."""
    torch.manual_seed(0)
    conv1d = nn.Sequential(_Conv1D(4, 5), nn.ReLU(), _Conv1D(5, 3)).double().eval()
    linear = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():
        for a, b in ((conv1d[0], linear[0]), (conv1d[2], linear[2])):
            b.weight.copy_(a.weight.T)
            b.bias.copy_(a.bias)
    (f, p), (g, q) = (fxattr.functionalize(m, input_shape=(2, 4)) for m in (conv1d, linear))
    assert [i.kind for i in Program(f, "test").nodes.values()].count("kernel") == 2
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 2])

    def target(i):
        return lambda out: out[:, i].sum()
    for method in (lambda h: fxattr.lrp(h, composite="epsilon_alpha2_beta1"), lambda h: fxattr.deeplift(h)):
        got = torch.stack([method(f)(p, xi, target(ti)) for xi, ti in zip(x, t)])
        want = torch.stack([method(g)(q, xi, target(ti)) for xi, ti in zip(x, t)])
        torch.testing.assert_close(got, want)
