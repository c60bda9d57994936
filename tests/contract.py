"""The composition guarantees every explainer is tested for, as reusable assertions.

- ``assert_vmap_equals_loop``: ``torch.vmap(explain)`` over a batch == a Python loop over examples;
- ``assert_second_order``: derivatives of a scalar loss of the explanation, w.r.t. the input and
  the parameters, match finite differences in float64 (``gradcheck``; ``gradgradcheck`` for one
  order more), and ``torch.func.grad`` agrees with ``torch.autograd.grad``;
- ``assert_compile_equals_eager``: ``torch.compile(torch.vmap(explain))`` == eager;
- ``model_unchanged``: a context manager asserting the module's state, flags and hooks are untouched.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def batched(explain, randomness: str = "error"):
    """``explain`` over a batch of examples and targets (params shared)."""
    return torch.vmap(explain, in_dims=(None, 0, 0), randomness=randomness)


def assert_vmap_equals_loop(explain, params, xs, targets, *, rtol=1e-5, atol=1e-6):
    """vmap over the batch equals a Python loop over its examples."""
    vmapped = batched(explain)(params, xs, targets)
    looped = torch.stack([explain(params, x, t) for x, t in zip(xs, targets)])
    assert vmapped.shape == xs.shape, (vmapped.shape, xs.shape)
    torch.testing.assert_close(vmapped, looped, rtol=rtol, atol=atol)
    return vmapped


def _projection(shape, dtype, seed=1234):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=dtype)


def assert_second_order(explain, params, x, target, *, wrt=("x", "params"), param_names=None,
                        gradgrad=False, atol=1e-5, rtol=1e-3):
    """Derivatives of ``<v, explain(params, x, target)>`` (v a fixed random projection) match finite
    differences in float64, w.r.t. x and/or the parameters; ``gradgrad`` checks one order more.

    For a gradient-type explainer the first check is a second derivative of the model.
    """
    assert x.dtype == torch.float64, "finite differences need float64"
    v = _projection(x.shape, x.dtype)
    names = list(param_names if param_names is not None else params)

    def loss(x_, *chosen):
        p = dict(params)
        p.update(zip(names, chosen))
        return (explain(p, x_, target) * v).sum()

    inputs = []
    if "x" in wrt:
        inputs.append(x.detach().clone().requires_grad_(True))
    else:
        inputs.append(x.detach())
    chosen = [params[n].detach().clone().requires_grad_("params" in wrt) for n in names]
    fn = lambda x_, *c: loss(x_, *c)  # noqa: E731
    all_inputs = (inputs[0], *chosen)
    assert torch.autograd.gradcheck(fn, all_inputs, atol=atol, rtol=rtol, fast_mode=True)
    if gradgrad:
        assert torch.autograd.gradgradcheck(fn, all_inputs, atol=atol, rtol=rtol, fast_mode=True)
    # torch.func.grad (the functional route) agrees with torch.autograd.grad.
    if "x" in wrt:
        functional = torch.func.grad(lambda x_: loss(x_, *[c.detach() for c in chosen]))(x.detach())
        (autograd,) = torch.autograd.grad(loss(inputs[0], *[c.detach() for c in chosen]), inputs[0])
        torch.testing.assert_close(functional, autograd)
    if "params" in wrt:
        functional = torch.func.grad(lambda p: loss(x.detach(), *p))([c.detach() for c in chosen])
        autograd = torch.autograd.grad(loss(x.detach(), *chosen), chosen, allow_unused=True,
                                       materialize_grads=True)
        torch.testing.assert_close(list(functional), list(autograd))


def assert_compile_equals_eager(explain, params, xs, targets, *, fullgraph=True, rtol=1e-4,
                                atol=1e-5, randomness="error"):
    """``torch.compile(torch.vmap(explain))`` gives what eager vmap gives."""
    torch._dynamo.reset()
    eager = batched(explain, randomness)(params, xs, targets)
    compiled = torch.compile(batched(explain, randomness), fullgraph=fullgraph)(params, xs, targets)
    torch.testing.assert_close(compiled, eager, rtol=rtol, atol=atol)
    return compiled


def _state(model: nn.Module):
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                     for m in model.modules()),
        "modules": {k: id(m) for k, m in model.named_modules()},
    }


@contextlib.contextmanager
def model_unchanged(model: nn.Module):
    """Asserts that the block leaves ``model``'s tensors, flags, hooks and submodules as they were."""
    before = _state(model)
    yield
    after = _state(model)
    assert before["ids"] == after["ids"], "parameters or buffers were replaced"
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), f"{k} was modified"
    for key in ("requires_grad", "training", "hooks", "modules"):
        assert before[key] == after[key], f"the model's {key} changed"
