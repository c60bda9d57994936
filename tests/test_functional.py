import pytest
import torch
from torch import nn

import fxattr
from tests.contract import model_unchanged
from tests.models import DictOutput, TwoInputs, small_cnn, smooth_mlp


def test_f_evaluates_one_example_and_matches_the_module(dtype):
    model = small_cnn(dtype)
    x = torch.randn(3, 8, 8, dtype=dtype)
    with model_unchanged(model):
        f, params = fxattr.functionalize(model)
        out = f(params, x)
    assert out.shape == (5,)
    torch.testing.assert_close(out, model(x[None])[0].detach())


def test_params_are_detached_and_share_storage():
    model = small_cnn()
    _, params = fxattr.functionalize(model)
    floating = {k for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    assert set(params) == floating and "1.num_batches_tracked" not in params
    buffers = dict(model.named_buffers())
    for name, tensor in params.items():
        assert not tensor.requires_grad
        shares = tensor.data_ptr() == model.state_dict()[name].data_ptr()
        assert shares == (name not in buffers), name


def _aten_ops(fn):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


def test_eval_batch_norm_is_element_wise():
    """vmap has no batching rule for eval batch norm and loops over examples (1.14x the floor on
    resnet18 here); fxattr's f never calls it, and gives the module's values and gradients."""
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    x = torch.randn(3, 8, 8)
    assert any("batch_norm" in op for op in _aten_ops(lambda: model(x[None])))  # the check can fail
    assert not any("batch_norm" in op for op in _aten_ops(lambda: f(params, x)))
    xs = torch.randn(4, 3, 8, 8)
    out = torch.vmap(torch.func.grad(lambda x: f(params, x)[1]))(xs)
    xr = xs.clone().requires_grad_()
    (expected,) = torch.autograd.grad(model(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(out, expected)


def test_training_mode_is_refused_unless_batch_statistics_are_asked_for():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))  # training mode
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.functionalize: the model is in training "
                                                 r"mode \('1' \(BatchNorm2d\)\).*model\.eval\(\)"):
        fxattr.functionalize(model)
    f, params = fxattr.functionalize(model, batch_statistics=True)
    assert "1.num_batches_tracked" not in params
    x = torch.randn(3, 5, 5)
    with model_unchanged(model):  # the running statistics are not updated
        assert any("batch_norm" in op for op in _aten_ops(lambda: f(params, x)))
        out = f(params, x)
        # the gradient family used to fail on the in-place num_batches_tracked update
        torch.vmap(fxattr.gradient(f), in_dims=(None, 0, None))(params, torch.randn(2, 3, 5, 5), 0)
    torch.testing.assert_close(out, model(x[None])[0].detach())
    # a model switched to training mode after functionalize is caught at the call
    model.eval()
    f, params = fxattr.functionalize(model)
    explain = fxattr.gradient(f)
    model.train()
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.gradient: the model is in training mode"):
        explain(params, x, 0)
    model.eval()


def test_dropout_in_training_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    with pytest.raises(fxattr.FxattrError, match=r"training mode \('1' \(Dropout\)\)"):
        fxattr.functionalize(model)
    fxattr.functionalize(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0)))  # p = 0 drops nothing
    f, params = fxattr.functionalize(model, batch_statistics=True)
    out = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, None), randomness="different")(
        params, torch.randn(3, 4), 0)
    assert out.shape == (3, 4) and torch.isfinite(out).all()


def test_gradients_flow_to_params_passed_in():
    model = smooth_mlp()
    f, _ = fxattr.functionalize(model)
    params = dict(model.named_parameters())
    x = torch.randn(5, dtype=torch.float64)
    f(params, x)[0].backward()
    assert model[0].weight.grad is not None
    model.zero_grad()


def test_tuple_and_dict_inputs():
    model = TwoInputs().eval()
    f, params = fxattr.functionalize(model)
    x, y = torch.randn(3), torch.randn(2)
    torch.testing.assert_close(f(params, (x, y)), model(x[None], y[None])[0].detach())
    torch.testing.assert_close(f(params, {"x": x, "y": y}), model(x[None], y[None])[0].detach())


def test_output_selector_and_non_tensor_output():
    model = DictOutput().eval()
    f, params = fxattr.functionalize(model, output=lambda out: out["logits"])
    assert f(params, torch.randn(3)).shape == (4,)
    f_bad, params = fxattr.functionalize(model)
    with pytest.raises(fxattr.FxattrError, match="returned a dict.*output="):
        f_bad(params, torch.randn(3))


def test_batch_passed_instead_of_one_example():
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    with pytest.raises(fxattr.FxattrError, match="one example of shape.*If x is a batch.*torch.vmap"):
        f(params, torch.randn(2, 3, 8, 8))
    f, params = fxattr.functionalize(model, input_shape=(3, 8, 8))
    with pytest.raises(fxattr.FxattrError, match=r"looks like a batch"):
        f(params, torch.randn(2, 3, 8, 8))
    with pytest.raises(fxattr.FxattrError, match=r"shape \(8, 8\)"):
        f(params, torch.randn(8, 8))


def test_bad_model_arguments():
    with pytest.raises(fxattr.FxattrError, match="nn.Module"):
        fxattr.functionalize(lambda x: x)
    with pytest.raises(fxattr.FxattrError, match="output must be a callable"):
        fxattr.functionalize(nn.Linear(2, 2), output="logits")
    with pytest.raises(fxattr.FxattrError, match="batch_statistics must be True or False"):
        fxattr.functionalize(nn.Linear(2, 2), batch_statistics=1)
    with pytest.raises(fxattr.FxattrError, match="input_shape must be a tuple of ints"):
        fxattr.functionalize(nn.Linear(2, 2), input_shape=(2.0,))
