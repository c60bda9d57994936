"""A batch passed as one example, beyond ``nn.Sequential`` MLPs and embedding-first models.

Before: an MLP written as its own module (``fc2(relu(fc1(x)))``) took a ``(B, F)`` batch as one
example and every explainer returned a ``(B, F)`` map whose rows but the first were zero, no
error; token ids ``(B, T)`` into a model whose first registered layer was a ``batch_first``
attention raised a raw ``AssertionError`` from MultiheadAttention; layer methods (layer IG) took
``(B, T)`` ids silently; convolutional models failed with conv2d's rank message. Now each is an
``FxattrError`` under the explainer's name that says it looks like a batch, and legitimate inputs
of models that look alike (a set model pooling its rows, a flat-input model that reshapes, an
attention model over token features, the zoo's inputs) are never refused.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fxattr


class ModuleMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SetModel(nn.Module):
    """DeepSets: one example is a set of rows (N, 6), pooled: never a batch."""

    def __init__(self):
        super().__init__()
        self.phi, self.rho = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.rho(torch.relu(self.phi(x)).sum(-2))


class FlatImageMLP(nn.Module):
    """Takes one image (1, 4, 4) or its flat (16,) and reshapes: never a batch."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))


class Conv(nn.Module):
    def __init__(self, dims):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv, self.head = conv(3, 4, 3, padding=1), nn.Linear(4, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(2).mean(-1))


class Tokens(nn.Module):
    """A batch_first encoder registered BEFORE the embedding (registration order is not
    execution order): ids (B, T) gave a raw AssertionError from MultiheadAttention."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids)).mean(-2))


class DictTokens(nn.Module):
    """A transformers-style call: model(input_ids=..., attention_mask=...)."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 8), nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) * attention_mask[..., None]
        return self.head(h.sum(-2))


class TokenFeatures(nn.Module):
    """An attention model over float token features (T, 6): a 2-d x is one example."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.proj(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(-2))


def _model(cls, *args):
    torch.manual_seed(0)
    return fxattr.functionalize(cls(*args).eval())


GENERAL = {
    "gradient": lambda f: fxattr.gradient(f),
    "integrated_gradients": lambda f: fxattr.integrated_gradients(f, steps=2),
    "lrp": lambda f: fxattr.lrp(f, rule="epsilon"),
    "deeplift": lambda f: fxattr.deeplift(f),
    "feature_ablation": lambda f: fxattr.feature_ablation(f),
}
BATCHES = {  # (model, a batch passed as one example, its first example)
    "module mlp": ((ModuleMLP,), torch.randn(3, 6)),
    "conv1d": ((Conv, 1), torch.randn(3, 3, 5)),
    "conv2d": ((Conv, 2), torch.randn(3, 3, 5, 5)),
    "conv3d": ((Conv, 3), torch.randn(2, 3, 3, 3, 3)),
}


@pytest.mark.parametrize("kind", sorted(BATCHES))
@pytest.mark.parametrize("name", sorted(GENERAL))
def test_a_batch_is_a_clear_error_and_one_example_is_explained(kind, name):
    model, xs = BATCHES[kind]
    f, params = _model(*model)
    explain = GENERAL[name](f)
    with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.{name}: x has shape {re.escape(str(tuple(xs.shape)))}"
                                                 r".*looks like a batch.*torch\.vmap.*input_shape="):
        explain(params, xs, 0)
    one = explain(params, xs[0], 0)
    assert one.shape == xs[0].shape and torch.isfinite(one).all()
    # the same examples under vmap (the README's usage) are explained, each as one example
    batched = torch.vmap(explain, in_dims=(None, 0, None))(params, xs, 0)
    torch.testing.assert_close(batched[0], one)


def test_a_batch_of_batches_under_vmap_is_a_clear_error():
    f, params = _model(ModuleMLP)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.gradient: x has shape \(3, 6\).*looks like a batch"):
        torch.vmap(fxattr.gradient(f), in_dims=(None, 0, None))(params, torch.randn(2, 3, 6), 0)


@pytest.mark.parametrize("build", [
    lambda f: fxattr.layers.layer_integrated_gradients(f, layer="embed", steps=2),
    lambda f: fxattr.layers.layer_gradient_x_activation(f, layer="encoder"),
], ids=["layer_integrated_gradients", "layer_gradient_x_activation"])
def test_token_ids_of_a_batch_are_a_clear_error(build):
    f, params = _model(Tokens)
    ids = torch.randint(0, 20, (3, 5))
    explain = build(f)
    with pytest.raises(fxattr.FxattrError, match=r"token ids of shape \(3, 5\).*nn\.Embedding 'embed'.*looks like "
                                                 r"a batch"):
        f(params, ids)
    name = explain.__name__
    with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.{name}: x holds token ids of shape \(3, 5\)"):
        explain(params, ids, 0)
    out = torch.vmap(explain, in_dims=(None, 0, None))(params, ids, 0)  # one example each: fine
    assert out.shape[0] == 3 and torch.isfinite(out).all()


def test_token_ids_in_a_dict_are_checked():
    f, params = _model(DictTokens)
    ids, mask = torch.randint(0, 20, (2, 5)), torch.ones(2, 5)
    assert f(params, {"input_ids": ids[0], "attention_mask": mask[0]}).shape == (4,)
    with pytest.raises(fxattr.FxattrError, match=r"x\['input_ids'\] holds token ids of shape \(2, 5\)"):
        f(params, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("model, x", [
    ((SetModel,), torch.randn(5, 6)),                 # a set of rows, pooled
    ((FlatImageMLP,), torch.randn(1, 4, 4)),          # an image reshaped
    ((FlatImageMLP,), torch.randn(16)),
    ((TokenFeatures,), torch.randn(7, 6)),            # float token features through attention
    ((Conv, 2), torch.randn(3, 5, 5)),
    ((Conv, 1), torch.randn(3, 5)),
    ((ModuleMLP,), torch.randn(6)),
], ids=["set", "image", "flat", "token_features", "conv2d", "conv1d", "module_mlp"])
def test_no_false_alarm_on_one_example(model, x):
    f, params = _model(*model)
    for name, build in GENERAL.items():
        out = build(f)(params, x, 0)
        assert out.shape == x.shape and torch.isfinite(out).all(), name


class DictMLP(ModuleMLP):
    def forward(self, x):
        return {"logits": super().forward(x)}


def test_a_batch_into_a_row_wise_model_with_an_output_selector():
    torch.manual_seed(0)
    f, params = fxattr.functionalize(DictMLP().eval(), output=lambda out: out["logits"])
    assert f(params, torch.randn(6)).shape == (4,)
    with pytest.raises(fxattr.FxattrError, match=r"^fxattr\.gradient: x has shape \(3, 6\).*looks like a batch"):
        fxattr.gradient(f)(params, torch.randn(3, 6), 0)


def test_input_shape_says_a_two_dimensional_example_is_meant():
    """A per-row model on a (T, 6) example: refused as a likely batch, accepted once said."""
    torch.manual_seed(0)
    model = ModuleMLP().eval()
    xs = torch.randn(3, 6)
    f, params = fxattr.functionalize(model)
    with pytest.raises(fxattr.FxattrError, match="input_shape="):
        f(params, xs)
    f, params = fxattr.functionalize(model, input_shape=(3, 6))
    torch.testing.assert_close(f(params, xs), model(xs).detach())
    assert fxattr.gradient(f)(params, xs, 5).shape == (3, 6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet1_0", "shufflenet_v2_x0_5", "mobilenet_v3_small", "hf_vit", "hf_gpt2"])
def test_zoo_inputs_are_one_example_and_their_batches_are_caught(name):
    """No false alarm on the zoo's legitimate inputs (without input_shape=, so only the structure
    speaks), and their batch caught by the structure alone, before any example was seen (every
    zoo model was checked the same way, see bench/RESULTS.md, reliability). GPT-2 is explained
    through inputs_embeds (T, D) floats: nothing in its structure tells T from a batch, so there
    only a first example (or input_shape=) catches it."""
    from tests.zoo.models import build

    model, xs = build(name, dtype=torch.float32)
    f, params = fxattr.functionalize(model)
    if name == "hf_gpt2":
        f.check_input(xs, "zoo", params)  # no verdict from the structure
        f, params = fxattr.functionalize(model)
    else:
        with pytest.raises(fxattr.FxattrError, match="first layer .* looks like a batch"):
            f.check_input(xs, "zoo", params)
    # a first example is learnt from a pass that succeeded (a failing first call teaches nothing)
    f.guarded(xs[0], lambda: f(params, xs[0]), "zoo", params=params)
    with pytest.raises(fxattr.FxattrError, match="looks like a batch"):
        f.check_input(xs, "zoo", params)


@pytest.mark.parametrize("name", sorted(GENERAL))
def test_a_tuple_or_dict_that_the_forward_cannot_take_is_a_clear_error(name):
    """Graph explainers (LRP, DeepLIFT) explained a 2-tuple x into a one-input model and returned a
    tuple of maps, no error; the forward's signature says how many inputs it takes."""
    f, params = _model(Conv, 2)
    x = torch.randn(3, 5, 5)
    explain = GENERAL[name](f)
    with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.{name}: x is a tuple of 2 inputs, but the model's "
                                                 r"forward takes 1 input \(x\)"):
        explain(params, (x, x), 0)
    with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.{name}: x is a dict with keys \['image'\]"):
        explain(params, {"image": x}, 0)
    assert explain(params, (x,), 0)[0].shape == x.shape  # model(*x) with one input is fine
