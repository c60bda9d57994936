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
