"""AttnLRP / CP-LRP (``fxattr.lrp(f, composite="attnlrp" | "cp_lrp")``) against LXT 2.1's efficient
mode on tiny random BERT, GPT-2, Llama-style and ViT models, under ``torch.vmap``.

LXT patches transformers globally, so its relevances come from a separate process
(``lxt_reference.py``, one per variant, every model and dtype); nothing here imports lxt.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fxattr

pytest.importorskip("transformers")
pytest.importorskip("lxt")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lxt_reference as lxt_ref  # the seeded models; imports no lxt

KINDS = lxt_ref.KINDS
VARIANTS = ("attnlrp", "cp_lrp")
# float64 bar: 1e-8, except where the model's own eager code computes in float32 whatever the
# weights' dtype (Llama's RMSNorm and softmax, ViT's softmax: `dtype=torch.float32`), where LXT's
# float32 backward through them and fxattr's float64 rules differ by ~2e-7 (measured)
FLOAT64_BAR = {"bert": 1e-8, "gpt2": 1e-8, "llama": 1e-6, "vit": 1e-6}
FLOAT32_BAR = 1e-4


@pytest.fixture(scope="module")
def lxt_relevance(tmp_path_factory):
    """``{(variant, kind, dtype name): reference}`` from one LXT process per variant (run concurrently)."""
    folder = tmp_path_factory.mktemp("lxt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    jobs = {v: subprocess.Popen([sys.executable, os.path.join(HERE, "lxt_reference.py"), v, str(folder / f"{v}.pt")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for v in VARIANTS}
    out = {}
    for variant, job in jobs.items():
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err.decode()[-2000:]
        for (kind, dtype), ref in torch.load(folder / f"{variant}.pt").items():
            out[variant, kind, dtype] = ref
    return out


_captured: dict = {}


def _captured_model(kind: str, dtype: torch.dtype, attn: str = "eager"):
    key = (kind, dtype, attn)
    if key not in _captured:
        model, x, target, name = lxt_ref.build(kind, dtype, attn)
        f, params = fxattr.functionalize(lxt_ref.Logits(model, name).eval(), input_shape=tuple(x.shape[1:]))
        _captured[key] = (model, f, params, x, target)
    return _captured[key]


def _compare(relevance, reference):
    a, b = relevance.flatten(1), reference.flatten(1)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    relative = (a - b).abs().amax(1) / b.abs().amax(1)
    return cosine, relative


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_lxt(lxt_relevance, variant, kind, dtype):
    """Token (patch) relevance of the vmapped explainer equals LXT's per example: cosine >= 0.999,
    max relative error <= 1e-8 in float64 (see FLOAT64_BAR) and <= 1e-4 in float32."""
    ref = lxt_relevance[variant, kind, str(dtype).removeprefix("torch.")]
    _, f, params, x, target = _captured_model(kind, dtype)
    assert torch.equal(ref["x"], x) and torch.equal(ref["target"], target)
    relevance = torch.vmap(fxattr.lrp(f, composite=variant), in_dims=(None, 0, 0))(params, x, target)
    assert relevance.shape == x.shape and relevance.dtype == dtype
    cosine, relative = _compare(relevance, ref["relevance"])
    bar = FLOAT64_BAR[kind] if dtype == torch.float64 else FLOAT32_BAR
    assert (cosine >= 0.999).all(), cosine
    assert (relative <= bar).all(), relative
    # the rules differ: AttnLRP and CP-LRP are not the same explanation
    other = lxt_relevance[VARIANTS[1 - VARIANTS.index(variant)], kind, str(dtype).removeprefix("torch.")]
    assert (relevance - other["relevance"]).abs().max() > 1e3 * bar * other["relevance"].abs().max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_attention_matches_lxt_eager(lxt_relevance, variant, kind):
    """With ``scaled_dot_product_attention`` (its own rule, grouped-query heads for Llama) the
    relevance equals LXT's on the eager model with the same weights."""
    ref = lxt_relevance[variant, kind, "float64"]
    _, f, params, x, target = _captured_model(kind, torch.float64, "sdpa")
    relevance = torch.vmap(fxattr.lrp(f, composite=variant), in_dims=(None, 0, 0))(params, x, target)
    cosine, relative = _compare(relevance, ref["relevance"])
    assert (cosine >= 0.999).all() and (relative <= FLOAT64_BAR[kind]).all(), (cosine, relative)


def _bias_free_gpt2():
    model, x, target, name = lxt_ref.build("gpt2", torch.float64)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias") or "wpe" in key:
                p.zero_()
    f, params = fxattr.functionalize(lxt_ref.Logits(model, name).eval(), input_shape=tuple(x.shape[1:]))
    return model, f, params, x, target


def test_cp_lrp_conserves_on_a_bias_free_model():
    """CP-LRP on GPT-2 without biases and position embeddings: the relevance sums to the target
    logit (the identity rule's 1e-10 aside); AttnLRP does not (the softmax's bias term)."""
    _, f, params, x, target = _bias_free_gpt2()
    logits = torch.vmap(f, in_dims=(None, 0))(params, x).gather(1, target[:, None])[:, 0]
    cp = torch.vmap(fxattr.lrp(f, composite="cp_lrp"), in_dims=(None, 0, 0))(params, x, target)
    torch.testing.assert_close(cp.flatten(1).sum(1), logits, rtol=1e-8, atol=0)
    attn = torch.vmap(fxattr.lrp(f, composite="attnlrp"), in_dims=(None, 0, 0))(params, x, target)
    assert ((attn.flatten(1).sum(1) - logits).abs() > 1e-6).any()


def test_vmap_equals_loop_and_model_unchanged():
    model, f, params, x, target = _captured_model("bert", torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explain = fxattr.lrp(f, composite="attnlrp")
    batched = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, target)
    looped = torch.stack([explain(params, x[i], target[i]) for i in range(len(x))])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-14)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("variant", VARIANTS)
def test_second_order_against_finite_differences(variant):
    """The explanation is an ordinary function of (params, x): its derivative w.r.t. the input
    (gradcheck) and w.r.t. a parameter (torch.func.grad of a loss of it) match finite differences."""
    _, f, params, x, target = _captured_model("bert", torch.float64)
    explain = fxattr.lrp(f, composite=variant)
    x0 = x[0].clone()

    def of_x(t):
        return explain(params, t, target[0])
    # fast mode: the Jacobian along random directions, against finite differences
    assert torch.autograd.gradcheck(of_x, (x0.requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)

    name = "model.classifier.weight"

    def loss(weight):
        r = explain({**params, name: weight}, x0.detach(), target[0])
        return (r.sum(-1) * torch.arange(1.0, 1.0 + len(r), dtype=r.dtype)).square().sum()
    weight = params[name]
    grad = torch.func.grad(loss)(weight)
    direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(3))
    h = 1e-6
    numeric = (loss(weight + h * direction) - loss(weight - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_presets_take_no_options():
    _, f, *_ = _captured_model("bert", torch.float64)
    with pytest.raises(fxattr.FxattrError, match=r"attnlrp.*no options.*epsilon"):
        fxattr.lrp(f, composite="attnlrp", epsilon=0.1)
    assert {"attnlrp", "cp_lrp"} <= set(fxattr.lrp.COMPOSITES)


@pytest.mark.slow
def test_compile_equals_eager():
    _, f, params, x, target = _captured_model("gpt2", torch.float64)
    batched = torch.vmap(fxattr.lrp(f, composite="attnlrp"), in_dims=(None, 0, 0))
    compiled = torch.compile(batched, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(params, x, target), batched(params, x, target), rtol=1e-10, atol=1e-12)


def test_on_a_relu_network_both_presets_are_lrp_zero():
    """Without attention, products or norms, AttnLRP and CP-LRP are LRP-0 everywhere (the identity
    rule passes relevance, to its 1e-10): equal to rule="z", and to gradient x input with each
    activation's gradient replaced by ``act(u) / (u + 1e-10)`` (LXT's identity_rule_implicit), by hand."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3)).double().eval()
    f, params = fxattr.functionalize(net)
    x, target = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    z = torch.vmap(fxattr.lrp(f, rule="z"), in_dims=(None, 0, 0))(params, x, target)
    for variant in VARIANTS:
        ours = torch.vmap(fxattr.lrp(f, composite=variant), in_dims=(None, 0, 0))(params, x, target)
        torch.testing.assert_close(ours, z, rtol=1e-8, atol=1e-12)
        v = net[0](x)
        u2 = net[2](v.relu())
        ratio = torch.tanh(u2) / (u2 + 1e-10)
        w1, w2, w3 = net[0].weight, net[2].weight, net[4].weight
        g2 = w3[target] * ratio                              # d out / d u2, tanh replaced
        g1 = (g2 @ w2) * v.relu() / (v + 1e-10)             # the ReLU's identity rule
        torch.testing.assert_close(ours, x * (g1 @ w1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_second_order_with_sdpa(variant):
    """torch.func.grad of a loss of the explanation w.r.t. a query weight with
    scaled_dot_product_attention (CPU's fused kernel has no double backward: CP-LRP's vjp through
    it runs on the math kernel) matches central finite differences."""
    _, f, params, x, target = _captured_model("bert", torch.float64, "sdpa")
    explain = fxattr.lrp(f, composite=variant)
    name = "model.bert.encoder.layer.0.attention.self.query.weight"

    def loss(weight):
        return explain({**params, name: weight}, x[0], target[0]).square().sum()
    weight = params[name]
    grad = torch.func.grad(loss)(weight)
    direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(4))
    h = 1e-6
    numeric = (loss(weight + h * direction) - loss(weight - h * direction)) / (2 * h)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


# --- the gradient form: one vjp of a modified forward (fxattr/propagation/_gradient_form.py) ------------

def _walk(f, variant):
    """The node-by-node walk of the preset (what the gradient form replaces)."""
    from fxattr.propagation._engine import Plan
    from fxattr.propagation._transformers import transformer_composite
    plan = Plan(f, "lrp", transformer_composite(variant))
    return lambda params, x, target: plan.explain(params, x, target)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradient_form_equals_the_walk(kind, attn):
    """Both presets run as the gradient form on every family, and equal the node-by-node walk:
    to rounding in float64 where the model computes in float64; within FLOAT64_BAR where its eager
    code computes softmax / RMSNorm in float32 (the walk recomputes the softmax in float64 there,
    the gradient form differentiates the model's float32 softmax as LXT does)."""
    _, f, params, x, target = _captured_model(kind, torch.float64, attn)
    bar = 1e-12 if FLOAT64_BAR[kind] == 1e-8 else FLOAT64_BAR[kind]
    for variant in VARIANTS:
        explain = fxattr.lrp(f, composite=variant)
        assert explain.gradient_form is True
        fast = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, target)
        walk = torch.vmap(_walk(f, variant), in_dims=(None, 0, 0))(params, x, target)
        _, relative = _compare(fast, walk)
        assert (relative <= bar).all(), (variant, relative)


class _Exp(torch.nn.Module):
    """An element-wise exp that receives relevance (the gradient form has no rule for it)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.exp(self.a(x)))


class _Attention(torch.nn.Module):
    """nn.MultiheadAttention as torchvision's ViT calls it (batch first, self-attention), then one
    sequence-first with distinct query / key / value and the averaged weights returned."""

    def __init__(self):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.cross = torch.nn.MultiheadAttention(4, 2, bias=False)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.attention(x, x, x, need_weights=False)[0]
        h = self.cross(h.transpose(0, 1), x.transpose(0, 1), (h * 0.5).transpose(0, 1))[0].transpose(0, 1)
        return self.head(h.mean(1))


class _MaskedAttention(_Attention):
    def forward(self, x):
        mask = torch.zeros(3, 3, dtype=torch.bool)
        return self.head(self.attention(x, x, x, attn_mask=mask, need_weights=False)[0].mean(1))


def test_gradient_form_falls_back_to_the_walk_with_its_reason():
    """A node the gradient form cannot express keeps the preset on the walk (same numbers), and
    ``explain.gradient_form`` names the node; where the walk has no rule either, the call is its
    clear error."""
    torch.manual_seed(0)
    f, params = fxattr.functionalize(_Exp().double().eval())
    x, target = torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 2])
    masked, masked_params = fxattr.functionalize(_MaskedAttention().double().eval())
    for variant in VARIANTS:
        explain = fxattr.lrp(masked, composite=variant)
        assert "attn_mask" in explain.gradient_form
        with pytest.raises(fxattr.FxattrError, match="attn_mask"):
            explain(masked_params, torch.randn(3, 4, dtype=torch.float64), 0)
        explain = fxattr.lrp(f, composite=variant)
        node = "exp"
        assert isinstance(explain.gradient_form, str) and node in explain.gradient_form
        ours = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, target)
        torch.testing.assert_close(ours, torch.vmap(_walk(f, variant), in_dims=(None, 0, 0))(params, x, target),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_form_on_multihead_attention_equals_the_walk(variant):
    """Both presets on nn.MultiheadAttention (batch first and sequence first, self- and
    cross-attention, with and without biases) run as the gradient form and equal the walk to
    rounding."""
    torch.manual_seed(0)
    f, params = fxattr.functionalize(_Attention().double().eval())
    x, target = torch.randn(3, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    explain = fxattr.lrp(f, composite=variant)
    assert explain.gradient_form is True
    fast = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, target)
    _, relative = _compare(fast, torch.vmap(_walk(f, variant), in_dims=(None, 0, 0))(params, x, target))
    assert (relative <= 1e-12).all(), relative
    # second order: w.r.t. x (gradcheck) and w.r.t. the in-projection (central differences)
    assert torch.autograd.gradcheck(lambda t: explain(params, t, target[0]), (x[0].clone().requires_grad_(True),),
                                    eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    name = "attention.in_proj_weight"

    def loss(weight):
        return explain({**params, name: weight}, x[0], target[0]).square().sum()
    weight = params[name]
    direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(6))
    numeric = (loss(weight + 1e-6 * direction) - loss(weight - 1e-6 * direction)) / 2e-6
    torch.testing.assert_close((torch.func.grad(loss)(weight) * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_cp_lrp_on_multihead_attention_conserves_without_biases():
    """CP-LRP detaches query and key inside nn.MultiheadAttention: on a bias-free model the
    relevance sums to the logit exactly, in both forms; AttnLRP's does not (the softmax rule)."""
    torch.manual_seed(0)
    net = _Attention()
    net.attention = torch.nn.MultiheadAttention(4, 2, bias=False, batch_first=True)
    net.head = torch.nn.Linear(4, 3, bias=False)
    f, params = fxattr.functionalize(net.double().eval())
    x, target = torch.randn(3, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    logits = torch.vmap(f, in_dims=(None, 0))(params, x).gather(1, target[:, None])[:, 0]
    for explain in (fxattr.lrp(f, composite="cp_lrp"), _walk(f, "cp_lrp")):
        relevance = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, target)
        torch.testing.assert_close(relevance.flatten(1).sum(1), logits, rtol=1e-10, atol=0)
    attn = torch.vmap(fxattr.lrp(f, composite="attnlrp"), in_dims=(None, 0, 0))(params, x, target)
    assert ((attn.flatten(1).sum(1) - logits).abs() > 1e-6).any()


def test_other_composites_keep_the_walk():
    _, f, *_ = _captured_model("bert", torch.float64)
    assert fxattr.lrp(f, composite="epsilon_plus").gradient_form is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_form_second_order_on_gpt2(variant):
    """GPT-2 (eager matmuls with halved operands, the written-out gelu_new, LayerNorm's frozen std):
    the derivative of the explanation w.r.t. x (gradcheck) and of a loss of it w.r.t. a LayerNorm
    weight and an attention projection match finite differences: the frozen factors are constants
    of the inner vjp only."""
    _, f, params, x, target = _captured_model("gpt2", torch.float64)
    explain = fxattr.lrp(f, composite=variant)
    assert explain.gradient_form is True
    x0 = x[0].clone()
    assert torch.autograd.gradcheck(lambda t: explain(params, t, target[0]), (x0.requires_grad_(True),), eps=1e-6,
                                    atol=1e-7, rtol=1e-5, fast_mode=True)
    for name in ("model.transformer.h.0.ln_1.weight", "model.transformer.h.1.attn.c_attn.weight"):
        def loss(weight, name=name):
            return explain({**params, name: weight}, x0.detach(), target[0]).square().sum()
        weight = params[name]
        grad = torch.func.grad(loss)(weight)
        direction = torch.randn(weight.shape, dtype=weight.dtype, generator=torch.Generator().manual_seed(5))
        h = 1e-6
        numeric = (loss(weight + h * direction) - loss(weight - h * direction)) / (2 * h)
        torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-9)


class _Mixed(torch.nn.Module):
    """One of every operation the gradient form rewrites, as modules and functions torch.fx keeps:
    LayerNorm / RMSNorm / GroupNorm modules, grouped-query causal sdpa with a boolean mask, dropout,
    GELU, a sigmoid gate, SwiGLU, ``r @ r^T`` (one operand twice), softmax weights times data, a
    uniform product, ``x * x``, a quotient by a data tensor."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.ln, self.rms, self.gn = nn.LayerNorm(6), nn.RMSNorm(6), nn.GroupNorm(2, 6)
        self.qkv, self.up, self.gate, self.w1, self.w3 = (nn.Linear(6, n) for n in (12, 6, 6, 6, 6))
        self.gelu, self.drop, self.head = nn.GELU(), nn.Dropout(0.1), nn.Linear(6, 3)

    def forward(self, x):  # x: (1, 4, 6)
        F = torch.nn.functional
        h = self.ln(x)
        q, k, v = self.qkv(h).split((6, 3, 3), dim=-1)
        q = q.view(1, 4, 2, 3).transpose(1, 2)
        k, v = k.view(1, 4, 1, 3).transpose(1, 2), v.view(1, 4, 1, 3).transpose(1, 2)
        mask = torch.ones(4, 4, dtype=torch.bool).tril()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        h = h + self.drop(a.transpose(1, 2).reshape(1, 4, 6))
        r = self.rms(h)
        gated = self.gelu(self.up(r)) * torch.sigmoid(self.gate(r))
        swiglu = F.silu(self.w1(r)) * self.w3(r)
        weights = F.softmax((r @ r.transpose(-1, -2)) * 0.5, -1)
        u = gated * swiglu + weights @ r + r * r
        n = self.gn(u.transpose(1, 2)).transpose(1, 2)
        z = n / (1 + r.square().mean(-1, keepdim=True))
        return self.head(z.mean(1))


def test_gradient_form_covers_every_rule_on_fx_modules():
    """On a torch.fx-captured model with every rewritten operation, both presets run as the
    gradient form and equal the walk to rounding (float64)."""
    torch.manual_seed(0)
    net = _Mixed().double().eval()
    f, params = fxattr.functionalize(net)
    x, target = torch.randn(3, 4, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    for variant in VARIANTS:
        explain = fxattr.lrp(f, composite=variant)
        assert explain.gradient_form is True, explain.gradient_form
        fast = torch.vmap(explain, in_dims=(None, 0, 0))(params, x, target)
        walk = torch.vmap(_walk(f, variant), in_dims=(None, 0, 0))(params, x, target)
        _, relative = _compare(fast, walk)
        assert (relative <= 1e-12).all(), (variant, relative)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_written_out_attention_equals_torch(dtype):
    """math_attention equals F.scaled_dot_product_attention (boolean and additive masks, causal,
    grouped-query heads, a scale) and multihead_attention equals nn.MultiheadAttention, under vmap;
    both are differentiable twice where CPU's fused kernels are not."""
    from fxattr.propagation._gradient_form import math_attention, multihead_attention
    F = torch.nn.functional
    g = torch.Generator().manual_seed(7)
    q = torch.randn(3, 4, 5, 6, generator=g, dtype=dtype)
    k, v = torch.randn(2, 3, 2, 5, 6, generator=g, dtype=dtype).unbind(0)
    boolean = torch.rand(5, 5, generator=g) > 0.3
    boolean[:, 0] = True
    additive = torch.randn(5, 5, generator=g, dtype=dtype)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for options in ({}, {"attn_mask": boolean}, {"attn_mask": additive, "scale": 0.3}, {"is_causal": True}):
        ours = torch.vmap(lambda a, b, c, o=options: math_attention(a, b, c, enable_gqa=True, **o))(q, k, v)
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **options), **tol)
    mha = torch.nn.MultiheadAttention(6, 3, batch_first=True).to(dtype).eval()
    params = dict(mha.named_parameters())
    x = torch.randn(3, 1, 5, 6, generator=g, dtype=dtype)
    ours = torch.vmap(lambda t: multihead_attention(t, t, t, params, 3, batch_first=True))(x)
    torch.testing.assert_close(ours[:, 0], mha(x[:, 0], x[:, 0], x[:, 0], need_weights=False)[0], **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(lambda t: math_attention(t, k[0], v[0], enable_gqa=True),
                                            (q[0].clone().requires_grad_(True),), fast_mode=True)
