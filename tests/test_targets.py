import pytest
import torch

import fxattr
from tests.models import relu_mlp


@pytest.fixture
def setup():
    model = relu_mlp()
    f, params = fxattr.functionalize(model)
    return model, f, params, torch.randn(6)


def test_int_tensor_none_and_callable_targets(setup):
    model, f, params, x = setup
    explain = fxattr.gradient(f)
    out = model(x[None])[0]
    by_int = explain(params, x, 2)
    torch.testing.assert_close(explain(params, x, torch.tensor(2)), by_int)
    torch.testing.assert_close(explain(params, x, None), explain(params, x, int(out.argmax())))
    difference = explain(params, x, lambda o: o[2] - o[0])
    torch.testing.assert_close(difference, by_int - explain(params, x, 0))


def test_vmapped_tensor_targets(setup):
    _, f, params, _ = setup
    xs, ts = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1])
    out = torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(params, xs, ts)
    for x, t, o in zip(xs, ts, out):
        torch.testing.assert_close(o, fxattr.gradient(f)(params, x, int(t)))


@pytest.mark.parametrize("target, message", [
    (4, r"target 4 is out of range for an output of 4"),
    (-1, r"target -1 is out of range"),
    (torch.tensor(7), r"target 7 is out of range"),
    (torch.tensor(1.0), r"integer tensor .*got dtype torch.float32"),
    (torch.tensor([1, 2]), r"0-d tensor"),
    (True, r"got a bool"),
    ("cat", r"got str"),
    (lambda o: o, r"callable target must return a 0-d tensor, got \(4,\)"),
])
def test_bad_targets_name_the_explainer_and_argument(setup, target, message):
    _, f, params, x = setup
    for explain, name in [(fxattr.gradient(f), "gradient"),
                          (fxattr.integrated_gradients(f, steps=4), "integrated_gradients")]:
        with pytest.raises(fxattr.FxattrError, match=rf"fxattr\.{name}: .*{message}"):
            explain(params, x, target)


@pytest.mark.parametrize("name", ["gradient", "integrated_gradients", "lrp", "occlusion"])
def test_out_of_range_and_negative_targets_under_vmap(setup, name):
    """The README's usage with a bad target gave ``RuntimeError: index 5 is out of bounds`` from
    deep inside (eager calls had a clear error)."""
    _, f, params, _ = setup
    build = {"integrated_gradients": lambda: fxattr.integrated_gradients(f, steps=2),
             "lrp": lambda: fxattr.lrp(f, rule="epsilon"),
             "occlusion": lambda: fxattr.occlusion(f, window=2)}.get(name, lambda: fxattr.gradient(f))
    batched = torch.vmap(build(), in_dims=(None, 0, 0))
    xs = torch.randn(3, 6)
    with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.{name}: target 5 is out of range for an output of 4"):
        batched(params, xs, torch.tensor([0, 5, 1]))
    with pytest.raises(fxattr.FxattrError, match=rf"^fxattr\.{name}: target -1 is out of range"):
        batched(params, xs, torch.tensor([0, -1, 1]))


def test_target_dtypes(setup):
    _, f, params, x = setup
    explain = fxattr.gradient(f)
    expected = explain(params, x, 2)
    for dtype in (torch.int8, torch.int16, torch.int32):
        torch.testing.assert_close(explain(params, x, torch.tensor(2, dtype=dtype)), expected)
    xs, ts = torch.stack([x, x]), torch.tensor([2, 2], dtype=torch.int32)
    torch.testing.assert_close(torch.vmap(explain, in_dims=(None, 0, 0))(params, xs, ts), torch.stack([expected] * 2))
    for bad in (torch.tensor(2, dtype=torch.uint8), torch.tensor(True)):
        with pytest.raises(fxattr.FxattrError, match=rf"fxattr\.gradient: target must be a signed integer "
                                                     rf"tensor .*got dtype {bad.dtype}"):
            explain(params, x, bad)


@pytest.mark.slow
def test_out_of_range_target_under_compile_is_nan_not_another_class(setup):
    """Inside torch.compile the values cannot be read: the explained scalar is NaN."""
    _, f, params, _ = setup
    torch._dynamo.reset()
    batched = torch.compile(torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0)))
    out = batched(params, torch.randn(2, 6), torch.tensor([1, -1]))
    assert out[0].isfinite().all() and out[1].isnan().all()
    torch._dynamo.reset()
