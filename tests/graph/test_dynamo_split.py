"""``fxattr.graph.split`` on models torch.fx cannot trace (Hugging Face transformers, captured by
torch dynamo): layers named by their module path, Grad-CAM on a ViT token layer and a layer
method on a BERT layer equal to the autograd of a forward pass written here (the HF submodules
called one after another, the activation taken in between), clear errors, and captures whose
sequence length varies (``input_shape=(None, hidden)``)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxattr

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # each module captures a model with torch dynamo (seconds)


class _Logits(nn.Module):
    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, x):
        return self.model(**{self.name: x}).logits


def _vit(dtype=torch.float64):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=8, image_size=8, patch_size=4, num_channels=2,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                                    num_labels=3, attn_implementation="eager")
    return _Logits(transformers.ViTForImageClassification(config).eval(), "pixel_values").to(dtype).eval()


def _bert(dtype=torch.float64, attn="eager"):
    torch.manual_seed(1)
    config = transformers.BertConfig(hidden_size=8, vocab_size=20, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=16, num_labels=3, attn_implementation=attn)
    return _Logits(transformers.BertForSequenceClassification(config).eval(), "inputs_embeds").to(dtype).eval()


def _gpt2(dtype=torch.float64):
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20, n_positions=16,
                                     num_labels=3, pad_token_id=0, attn_implementation="eager")
    return _Logits(transformers.GPT2ForSequenceClassification(config).eval(), "inputs_embeds").to(dtype).eval()


@pytest.fixture(scope="module")
def vit():
    model = _vit()
    f, params = fxattr.functionalize(model, input_shape=(2, 8, 8))
    return model, f, params


@pytest.fixture(scope="module")
def bert():
    model = _bert()
    f, params = fxattr.functionalize(model, input_shape=(None, 8))  # any sequence length
    return model, f, params


# ------------------------------------------------------------------- hand-written forward passes

def _vit_from_layer_0(model, a):
    """ViT's logits from the output ``a`` of ``vit.layers.0`` (in the last layer only the class
    token reaches the classifier, so the patches' gradient there is zero)."""
    vit = model.model.vit
    return model.model.classifier(vit.layernorm(vit.layers[1](a))[:, 0])


def _vit_layer_0(model, x):
    vit = model.model.vit
    return vit.layers[0](vit.embeddings(x))


def _bert_layer_0(model, x):
    bert = model.model.bert
    return bert.encoder.layer[0](bert.embeddings(inputs_embeds=x))


def _bert_from_layer_0(model, a):
    bert = model.model.bert
    h = bert.encoder.layer[1](a)
    return model.model.classifier(bert.pooler(h))


# -------------------------------------------------------------------------------------- tests

def test_layer_names_are_module_paths(vit):
    """A dynamo graph's module calls are recorded like torch.fx's: a layer is named by the module
    path the user knows, and ``body`` returns what that module returns (checked against the
    model's own hidden states) while ``head(body(x)) == f(x)``."""
    model, f, params = vit
    gm = fxattr.graph.trace(f)
    assert gm.meta["capture"] == "dynamo"
    assert "model.vit.layers.1" in gm.meta["module_outputs"]
    body, head = fxattr.graph.split(f, "model.vit.layers.0")
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    a = torch.vmap(body, in_dims=(None, 0))(params, x)
    with torch.no_grad():
        hidden = model.model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(a, hidden[1])
    torch.testing.assert_close(torch.vmap(head, in_dims=(None, 0, 0))(params, x, a),
                               torch.vmap(f, in_dims=(None, 0))(params, x))


def test_split_reads_params_not_the_module(vit):
    """The halves read ``params`` (an explanation loss differentiates through them): scaled
    parameters give the scaled model's activation."""
    model, f, params = vit
    body, _ = fxattr.graph.split(f, "model.vit.layers.0")
    x = torch.randn(2, 8, 8, dtype=torch.float64)
    scaled = {k: 1.5 * v for k, v in params.items()}
    other = _vit()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
        want = other.model(pixel_values=x[None], output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(body(scaled, x), want)


def test_gradcam_on_hf_vit_token_layer_equals_hand_computation(vit):
    """Grad-CAM on ``vit.layers.0`` (tokens, dim): the class token dropped, the 2 x 2 patches to a
    grid, channel weights the mean gradient; equal to autograd on the hand-written forward, under
    vmap and equal to the loop."""
    model, f, params = vit
    explain = fxattr.gradcam(f, layer="model.vit.layers.0", upsample=False)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)
    want = []
    for xi, ti in zip(x, t):
        torch.testing.assert_close(_vit_from_layer_0(model, _vit_layer_0(model, xi[None])), model(xi[None]))
        a = _vit_layer_0(model, xi[None]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_vit_from_layer_0(model, a)[0, ti], a)
        grid_a, grid_g = (v[0, 1:].reshape(2, 2, 8).permute(2, 0, 1) for v in (a.detach(), g))
        want.append(F.relu((grid_g.mean(dim=(1, 2))[:, None, None] * grid_a).sum(0)))
    want = torch.stack(want)
    assert got.shape == (3, 2, 2) and want.abs().max() > 0
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.stack([explain(params, xi, ti) for xi, ti in zip(x, t)]), got)
    upsampled = fxattr.gradcam(f, layer="model.vit.layers.0")(params, x[0], t[0])
    assert upsampled.shape == (2, 8, 8)


def test_layer_gradient_x_activation_on_hf_bert_layer_equals_hand_computation(bert):
    """captum's LayerGradientXActivation on ``bert.encoder.layer.0`` (a dynamo capture with a free
    sequence length): ``a * d logit / d a`` equal to autograd on the hand-written forward, for two
    lengths with the same explainer, under vmap."""
    model, f, params = bert
    explain = fxattr.layers.layer_gradient_x_activation(f, layer="model.bert.encoder.layer.0")
    for length in (4, 6):
        x = torch.randn(2, length, 8, dtype=torch.float64)
        t = torch.tensor([2, 0])
        got = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t)
        for xi, ti, gi in zip(x, t, got):
            torch.testing.assert_close(_bert_from_layer_0(model, _bert_layer_0(model, xi[None])),
                                       model(xi[None]))  # the hand-written forward is the model
            a = _bert_layer_0(model, xi[None]).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(_bert_from_layer_0(model, a)[0, ti], a)
            torch.testing.assert_close(gi, (a * g)[0].detach())


def test_graph_layer_methods_and_layer_inputs_on_hf_bert(bert):
    """The cut halves of a dynamo capture are models of their own: layer DeepLIFT on a BERT layer
    sums to ``f(x) - f(baseline)`` (float64); the input of ``encoder.layer.1`` (what it reads from
    x's data; its mask is built from the length alone) is the output of ``encoder.layer.0``, so
    the layer attributions there are equal."""
    model, f, params = bert
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    t = torch.tensor([0, 2])
    deeplift = fxattr.layers.layer_deeplift(f, layer="model.bert.encoder.layer.0")
    got = torch.vmap(deeplift, in_dims=(None, 0, 0))(params, x, t)
    outputs = torch.vmap(f, in_dims=(None, 0))(params, x)
    baseline_out = f(params, torch.zeros_like(x[0]))
    torch.testing.assert_close(got.sum(dim=(1, 2)), outputs[[0, 1], t] - baseline_out[t])
    at_output = fxattr.layers.layer_gradient_x_activation(f, layer="model.bert.encoder.layer.0")
    at_input = fxattr.layers.layer_gradient_x_activation(f, layer="model.bert.encoder.layer.1",
                                                         attribute_to_layer_input=True)
    torch.testing.assert_close(torch.vmap(at_input, in_dims=(None, 0, 0))(params, x, t),
                               torch.vmap(at_output, in_dims=(None, 0, 0))(params, x, t))


def test_free_sequence_length_graph_methods_match_fixed_captures(bert):
    """One explainer on a capture with ``input_shape=(None, 8)`` handles every length: equal to a
    capture fixed to that length (DeepLIFT and AttnLRP under vmap), and DeepLIFT sums to the
    output's difference at another length."""
    model, f, params = bert
    deeplift = fxattr.deeplift(f)
    lrp = fxattr.lrp(f, composite="attnlrp")
    fixed, fixed_params = fxattr.functionalize(model, input_shape=(5, 8))
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    t = torch.tensor([1, 2])
    for explain, reference in ((deeplift, fxattr.deeplift(fixed)), (lrp, fxattr.lrp(fixed, composite="attnlrp"))):
        torch.testing.assert_close(torch.vmap(explain, in_dims=(None, 0, 0))(params, x, t),
                                   torch.vmap(reference, in_dims=(None, 0, 0))(fixed_params, x, t))
    for length in (3, 9):
        xi = torch.randn(length, 8, dtype=torch.float64)
        delta = f(params, xi)[1] - f(params, torch.zeros_like(xi))[1]
        torch.testing.assert_close(deeplift(params, xi, 1).sum(), delta)
        assert lrp(params, xi, 1).shape == (length, 8)


def test_gpt2_split_and_free_length():
    """GPT-2 (causal mask built from the length): the cut at ``transformer.h.0`` with a free
    length gives the model's hidden state for each length, and the head completes the model."""
    model = _gpt2()
    f, params = fxattr.functionalize(model, input_shape=(None, 8))
    body, head = fxattr.graph.split(f, "model.transformer.h.0")
    for length in (3, 7):
        x = torch.randn(2, length, 8, dtype=torch.float64)
        a = torch.vmap(body, in_dims=(None, 0))(params, x)
        with torch.no_grad():
            hidden = model.model(inputs_embeds=x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(a, hidden[1])
        torch.testing.assert_close(torch.vmap(head, in_dims=(None, 0, 0))(params, x, a), model(x))


def test_split_halves_are_twice_differentiable(bert):
    """gradgradcheck in float64 through the dynamo-captured head of BERT (an explanation loss of a
    layer attribution differentiates twice), and the body's gradient in a parameter against
    finite differences. (HF ViT computes its softmax in float32, too coarse for finite
    differences.)"""
    model, f, params = bert
    body, head = fxattr.graph.split(f, "model.bert.encoder.layer.0")
    x = torch.randn(3, 8, dtype=torch.float64)
    a = body(params, x).detach().requires_grad_(True)
    torch.autograd.gradgradcheck(lambda a_: head(params, x, a_)[1], (a,))
    name = "model.bert.encoder.layer.0.intermediate.dense.weight"
    weight = params[name].clone().requires_grad_(True)
    torch.autograd.gradcheck(lambda w: body({**params, name: w}, x).sum(), (weight,))


def test_model_unchanged_and_float32(vit):
    model = _vit(torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f, params = fxattr.functionalize(model, input_shape=(2, 8, 8))
    x = torch.randn(2, 2, 8, 8)
    maps = torch.vmap(fxattr.gradcam(f, layer="model.vit.layers.0", upsample=False),
                      in_dims=(None, 0, 0))(params, x, torch.tensor([0, 1]))
    assert maps.dtype == torch.float32 and maps.shape == (2, 2, 2)
    reference = torch.vmap(fxattr.gradcam(vit[1], layer="model.vit.layers.0", upsample=False),
                           in_dims=(None, 0, 0))(vit[2], x.double(), torch.tensor([0, 1]))
    torch.testing.assert_close(maps.double(), reference, rtol=1e-4, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_clear_errors(vit, bert):
    model, f, params = vit
    with pytest.raises(fxattr.FxattrError, match=r"'model.vit.layer.1' is not a module .*close matches: "
                                                  r"'model.vit.layers.1'"):
        fxattr.graph.split(f, "model.vit.layer.1")
    with pytest.raises(fxattr.FxattrError, match=r"'model.vit.layers.0.dropout' is called 2 times"):
        fxattr.graph.split(f, "model.vit.layers.0.dropout")
    # BERT's (tokens, features) layer has no patch grid: never tokens taken as channels
    _, g, q = bert
    explain = fxattr.gradcam(g, layer="model.bert.encoder.layer.0")
    with pytest.raises(fxattr.FxattrError, match=r"gradcam: .*\(tokens, features\).*reshape="):
        explain(q, torch.randn(4, 8, dtype=torch.float64), 0)
    # with reshape= (features as channels over the token axis) it runs
    maps = fxattr.gradcam(g, layer="model.bert.encoder.layer.0", reshape=lambda a: a.T, upsample=False)(
        q, torch.randn(4, 8, dtype=torch.float64), 0)
    assert maps.shape == (4,)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x), self.b(x)


class _Untraceable(nn.Module):
    """torch.fx cannot trace ``int(x.shape[-1])``; dynamo can."""

    def __init__(self):
        super().__init__()
        self.pair = _Pair()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        width = int(x.shape[-1])
        first, second = self.pair(x)
        return self.out(torch.tanh(first) * second / width)


def test_module_returning_two_tensors_is_a_clear_error():
    """A module whose call returns two tensors has no single activation: the error names the
    graph nodes to choose from, and choosing one by its node name cuts there."""
    torch.manual_seed(0)
    f, params = fxattr.functionalize(_Untraceable().double().eval(), input_shape=(3, 4))
    with pytest.raises(fxattr.FxattrError, match=r"split: layer 'pair' returns a structure.*name a node .*\("):
        fxattr.graph.split(f, "pair")
    node = fxattr.graph.trace(f).meta["module_escapes"]["pair"][0][0]
    body, head = fxattr.graph.split(f, node)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(body(params, x), F.linear(x, params["pair.a.weight"], params["pair.a.bias"]))
    torch.testing.assert_close(head(params, x, body(params, x)), f(params, x))
    torch.testing.assert_close(fxattr.graph.split(f, "pair.b")[0](params, x),
                               F.linear(x, params["pair.b.weight"], params["pair.b.bias"]))


def test_specialised_free_size_is_a_clear_error():
    """ViT checks the image size against its config: a free image size cannot be captured."""
    f, _ = fxattr.functionalize(_vit(), input_shape=(2, None, 8))
    with pytest.raises(fxattr.FxattrError, match=r"input_shape leaves free"):
        fxattr.graph.trace(f)


def test_compile_equals_eager(vit):
    """Grad-CAM through the dynamo-captured halves under torch.compile (fullgraph, aot_eager)."""
    _, f, params = vit
    batched = torch.vmap(fxattr.gradcam(f, layer="model.vit.layers.0"), in_dims=(None, 0, 0))
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 1])
    torch.testing.assert_close(torch.compile(batched, fullgraph=True, backend="aot_eager")(params, x, t),
                               batched(params, x, t))
