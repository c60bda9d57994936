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
    with pytest.raises(fxattr.FxattrError, match=r"first layer '0' \(Conv2d, 3 input channels\).*looks like a "
                                                 r"batch.*torch.vmap"):
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


def test_a_batch_passed_to_an_mlp_is_an_error():
    """An MLP took (B, 6) as one example: every row but the first was zero, no error."""
    from tests.models import relu_mlp

    model = relu_mlp()
    f, params = fxattr.functionalize(model)
    xs = torch.randn(3, 6)
    for call in (lambda: f(params, xs), lambda: fxattr.gradient(f)(params, xs, 0)):
        with pytest.raises(fxattr.FxattrError, match=r"x has shape \(3, 6\), but one example has 1 "
                                                     r"dimension.*MLP.*looks like a batch"):
            call()
    # the explicit form says otherwise: per-row MLP on a (3, 6) example
    f, params = fxattr.functionalize(model, input_shape=(3, 6))
    assert f(params, xs).shape == (3, 4)


class _Bag(nn.Module):
    """Token ids -> embeddings -> mean over tokens -> classes: a batch (B, T) silently became
    (T, classes)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_a_batch_passed_to_a_sequence_model_is_an_error():
    torch.manual_seed(0)
    f, params = fxattr.functionalize(_Bag().eval())
    assert f(params, torch.tensor([1, 2, 3])).shape == (3,)
    with pytest.raises(fxattr.FxattrError, match=r"nn\.Embedding.*looks like a batch"):
        f(params, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    f, params = fxattr.functionalize(_Recurrent().eval())
    explain = fxattr.gradient(f)
    assert explain(params, torch.randn(7, 3), 1).shape == (7, 3)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.gradient: x has shape \(2, 7, 3\).*batch_first GRU"
                                                 r".*looks like a batch"):
        explain(params, torch.randn(2, 7, 3), 1)


def test_a_batch_after_one_example_is_an_error():
    model = small_cnn()
    f, params = fxattr.functionalize(model)
    f(params, torch.randn(3, 8, 8))
    with pytest.raises(fxattr.FxattrError, match=r"earlier calls took one example of shape \(3, 8, 8\)"
                                                 r".*looks like a batch"):
        f(params, torch.randn(2, 3, 8, 8))


def test_a_failed_first_call_teaches_no_example_shape():
    """The first example's shapes are recorded after a pass succeeded: a failing first call (scalars
    into Linear layers) would otherwise make every later good example look like a batch of them."""
    model = TwoInputs().eval()
    f, params = fxattr.functionalize(model)
    with pytest.raises(fxattr.FxattrError, match="the model failed on one example"):
        f(params, (torch.randn(()), torch.randn(())))
    x, y = torch.randn(3), torch.randn(2)
    torch.testing.assert_close(f(params, (x, y)), model(x[None], y[None])[0].detach())
    with pytest.raises(fxattr.FxattrError, match=r"earlier calls took one example of shape \[\(3,\), \(2,\)\]"):
        f(params, (torch.randn(2, 3), torch.randn(2, 2)))


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        x.mul_(2.0)  # in place, in forward
        return self.lin(self.relu(x))


@pytest.mark.parametrize("name", ["gradient", "integrated_gradients", "smoothgrad", "feature_ablation",
                                  "occlusion", "rise"])
def test_the_callers_x_is_never_modified(name):
    """An in-place first op (ReLU(inplace=True), x.mul_) clipped the caller's x."""
    torch.manual_seed(0)
    model = _InPlace().eval()
    f, params = fxattr.functionalize(model)
    build = {"occlusion": lambda: fxattr.occlusion(f, window=2, incremental=False),
             "rise": lambda: fxattr.rise(f, masks=torch.rand(4, 4)),
             "smoothgrad": lambda: fxattr.smoothgrad(f, samples=2)}.get(name, lambda: getattr(fxattr, name)(f))
    xs = torch.randn(3, 4)
    before = xs.clone()
    with model_unchanged(model):
        torch.vmap(build(), in_dims=(None, 0, None), randomness="same")(params, xs, None)
        build()(params, xs[0], 0)
    assert torch.equal(xs, before)


def test_x_of_another_dtype_is_named():
    f, params = fxattr.functionalize(small_cnn())
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.integrated_gradients: x has dtype torch\.float16 "
                                                 r"but the model's parameters are torch\.float32"):
        fxattr.integrated_gradients(f, steps=2)(params, torch.randn(3, 8, 8, dtype=torch.float16), 0)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.gradient: x must be a floating-point tensor, got "
                                                 r"dtype torch\.int64"):
        fxattr.gradient(f)(params, torch.ones(3, 8, 8, dtype=torch.long), 0)


def test_non_finite_x_is_an_error_eagerly_and_under_vmap():
    """Gradient methods gave a plausible finite map for a NaN input."""
    f, params = fxattr.functionalize(small_cnn())
    xs = torch.randn(2, 3, 8, 8)
    xs[1, 0, 0, 0] = float("nan")
    explain = fxattr.gradient(f)
    with pytest.raises(fxattr.FxattrError, match=r"fxattr\.gradient: x holds 1 NaN or Inf value"):
        explain(params, xs[1], 0)
    with pytest.raises(fxattr.FxattrError, match=r"x holds 1 NaN or Inf value \(of 384 in the batch\)"):
        torch.vmap(explain, in_dims=(None, 0, None))(params, xs, 0)


@pytest.mark.slow
def test_non_finite_x_under_compile_gives_nan():
    """Under torch.compile values cannot be read: the documented result is NaN, never a finite map."""
    f, params = fxattr.functionalize(small_cnn())
    xs = torch.randn(2, 3, 8, 8)
    xs[1, 0, 0, 0] = float("inf")
    torch._dynamo.reset()
    out = torch.compile(torch.vmap(fxattr.gradient(f), in_dims=(None, 0, None)))(params, xs, 0)
    assert out[1].isnan().all() and out[0].isfinite().all()  # per example
    torch._dynamo.reset()


_SEEN = []


class _Watched(nn.Module):
    """Records, from inside its own forward, whether the USER's module still holds its parameter."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        _SEEN.append(_WATCHED[0].lin.weight is _WATCHED[1])
        return self.lin(x)


_WATCHED = []


def test_parameters_are_never_swapped_into_the_users_module():
    """functional_call swapped params into the module for the duration of every call: another
    thread could see (or keep) the explainer's tensors."""
    torch.manual_seed(0)
    model = _Watched().eval()
    _WATCHED[:] = [model, model.lin.weight]
    _SEEN.clear()
    f, params = fxattr.functionalize(model)
    new = {k: v * 2 for k, v in params.items()}
    out = f(new, torch.randn(3))
    torch.vmap(fxattr.integrated_gradients(f, steps=2), in_dims=(None, 0, None))(new, torch.randn(2, 3), 0)
    assert _SEEN and all(_SEEN)
    assert out.shape == (2,)
    torch.testing.assert_close(f(new, torch.ones(3)), torch.ones(3) @ (2 * model.lin.weight.T) + 2 * model.lin.bias)
