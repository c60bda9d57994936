"""Regression: DeepLIFT on a captured graph traced again (a layer cut's head) with a buffer-built mask.

A cut's head (``fxattr.layers``) is a ``torch.fx.GraphModule`` that the engine traces again. Its
attention mask is a buffer that ``params`` replaces per example (the text front door's padded
sequences), turned into the additive ``0 / -finfo.max`` mask inside the graph. torch.fx's default
tracing evaluated that buffer once and baked the module's all-ones mask as a constant, so DeepLIFT
ran the head unmasked and its attributions did not sum to the head's delta (3e-3 relative on a tiny
HF BERT with two right pads). The model here is such a captured graph: a tiny attention model
traced with its buffer read by ``get_attr`` (as a dynamo capture reads it).
"""

import math

import pytest
import torch
from torch import fx, nn

import fxattr
import fxattr.layers
from fxattr.graph import trace

LENGTH, WIDTH = 6, 4
PADDED = torch.tensor([1, 1, 1, 1, 0, 0])


class MaskedAttention(nn.Module):
    """A block, one self-attention with the additive mask built from the ``attention_mask``
    buffer inside ``forward`` (as HF's extended attention mask), a classifier of the mean."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.query, self.key, self.value = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        self.classifier = nn.Linear(WIDTH, 3)
        self.register_buffer("attention_mask", torch.ones(LENGTH, dtype=torch.long), persistent=False)

    def forward(self, x):  # (1, L, D)
        h = self.block(x)
        keep = self.attention_mask.bool()[None, None, :]
        blocked = torch.full((), -torch.finfo(torch.float64).max, dtype=torch.float64)
        additive = torch.where(keep, torch.zeros((), dtype=torch.float64), blocked)
        scores = self.query(h) @ self.key(h).transpose(-1, -2) / math.sqrt(WIDTH) + additive
        out = torch.softmax(scores, dim=-1) @ self.value(h)
        return self.classifier(torch.tanh(out).mean(1))


class _ReadBuffers(fx.Tracer):
    proxy_buffer_attributes = True  # buffers read by get_attr, as in a dynamo capture


def _captured():
    torch.manual_seed(0)
    model = MaskedAttention().double().eval()
    gm = fx.GraphModule(model, _ReadBuffers().trace(model))
    f, params = fxattr.functionalize(gm)
    params = {**params, "attention_mask": PADDED}  # the padded sequence's mask, as graph_params
    x = torch.randn(LENGTH, WIDTH, dtype=torch.float64)
    return f, params, x


def test_retraced_graph_reads_the_mask_buffer_from_params():
    f, _, _ = _captured()
    gm = trace(f)
    mask = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "attention_mask"]
    # read from params at every call, the additive mask computed from it in the graph
    assert len(mask) == 1 and mask[0].users


def test_deeplift_sums_to_delta_with_a_padded_mask_buffer():
    f, params, x = _captured()
    unmasked = {**params, "attention_mask": torch.ones(LENGTH, dtype=torch.long)}
    # the mask matters (else the test could not fail)
    assert not torch.allclose(f(params, x), f(unmasked, x))
    for p in (params, unmasked):
        a = fxattr.deeplift(f)(p, x, 1)
        delta = f(p, x)[1] - f(p, torch.zeros_like(x))[1]
        torch.testing.assert_close(a.sum(), delta, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("layer", ["block.0", "block.1"])
def test_layer_deeplift_on_the_cut_head_sums_to_delta(layer):
    f, params, x = _captured()
    base = torch.zeros_like(x)
    a = fxattr.layers.layer_deeplift(f, layer=layer)(params, x, 2)
    delta = f(params, x)[2] - f(params, base)[2]
    torch.testing.assert_close(a.sum(), delta, rtol=1e-10, atol=1e-13)
    # batched: each example brings its own mask through params (vmapped over the buffer)
    masks = torch.stack([PADDED, torch.ones(LENGTH, dtype=torch.long)])
    xs = torch.stack([x, -x])
    explain = fxattr.layers.layer_deeplift(f, layer=layer)
    batched = torch.vmap(lambda m, xi: explain({**params, "attention_mask": m}, xi, 2))(masks, xs)
    for i in range(2):
        p = {**params, "attention_mask": masks[i]}
        torch.testing.assert_close(batched[i].sum(), f(p, xs[i])[2] - f(p, base)[2], rtol=1e-10, atol=1e-13)


class _BufferGate(nn.Module):
    """A torch.fx-traceable model that builds a gate from a floating-point buffer in forward."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 2)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        gate = torch.where(self.scale > 0.5, self.scale * 2, torch.zeros_like(self.scale))
        return self.out(torch.relu(self.lin(x)) * gate)


def test_graph_methods_read_a_users_floating_buffer_from_params():
    # torch.fx's default baked `where(scale > 0.5, ...)` into a constant from the module's own
    # all-ones buffer, so DeepLIFT and LRP ignored the buffer in params (gradients did not)
    torch.manual_seed(0)
    f, params = fxattr.functionalize(_BufferGate().double().eval())
    params = dict(params, scale=torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    x = torch.randn(4, dtype=torch.float64)
    delta = f(params, x)[0] - f(params, torch.zeros_like(x))[0]
    assert torch.allclose(fxattr.deeplift(f)(params, x, 0).sum(), delta, rtol=1e-10, atol=1e-14)
    lrp0 = fxattr.lrp(f, rule="epsilon", epsilon=0.0)(params, x, 0)
    torch.testing.assert_close(lrp0, fxattr.input_x_gradient(f)(params, x, 0), rtol=1e-10, atol=1e-14)
