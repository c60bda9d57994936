"""Real threads: explaining from several threads never changes the user's module, not even for an
instant, gives the single-threaded results, and explainers can be built concurrently."""

from __future__ import annotations

import threading

import torch
from torch import nn

import fxattr


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():  # test-side random eval statistics
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


# explainers that evaluate f itself (fxattr.functionalize's private module view)
FUNCTIONAL = {
    "gradient": lambda f: fxattr.gradient(f),
    "integrated_gradients": lambda f: fxattr.integrated_gradients(f, steps=3),
    "expected_gradients": lambda f: fxattr.expected_gradients(f, baselines=torch.zeros(2, 3, 6, 6), samples=2),
    "feature_ablation": lambda f: fxattr.feature_ablation(f),
    "occlusion": lambda f: fxattr.occlusion(f, window=(3, 3, 3), stride=(3, 3, 3), incremental=False),
    "rise": lambda f: fxattr.rise(f, masks=torch.rand(4, 6, 6)),
}
# explainers that evaluate a captured graph (fxattr.graph), which still calls
# torch.func.functional_call on graph modules sharing the user's submodules
GRAPH = {
    "lrp": lambda f: fxattr.lrp(f, rule="epsilon"),
    "gradcam": lambda f: fxattr.gradcam(f, layer="3"),
    "deeplift": lambda f: fxattr.deeplift(f),
}


def identities(net):
    return {k: id(v) for k, v in net.state_dict(keep_vars=True).items()}


def run_concurrently(net, builders, rounds=6, workers=2):
    """Each builder in ``workers`` threads, ``rounds`` vmapped calls each, while a watcher thread
    compares the module's tensors' identities continuously. Returns (changes seen, errors,
    results by name, single-threaded results)."""
    f, params = fxattr.functionalize(net)
    xs = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    ts = torch.tensor([0, 2, 4])
    explainers = {name: build(f) for name, build in builders.items()}
    expected = {}
    for name, explain in explainers.items():
        torch.manual_seed(0)
        expected[name] = torch.vmap(explain, in_dims=(None, 0, 0), randomness="same")(params, xs, ts)
    original = identities(net)
    changes, errors, results = [], [], {name: [] for name in explainers}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if identities(net) != original:
                changes.append(1)

    def work(name):
        try:
            for _ in range(rounds):
                out = torch.vmap(explainers[name], in_dims=(None, 0, 0), randomness="same")(params, xs, ts)
                results[name].append(out)
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append((name, repr(error)[:200]))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=work, args=(name,)) for name in explainers for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    return changes, errors, results, expected


def test_threads_never_change_the_model_and_get_the_same_results():
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    changes, errors, results, expected = run_concurrently(net, FUNCTIONAL)
    assert not errors, errors
    assert not changes, f"the module's tensors were swapped {len(changes)} times"
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for name, outs in results.items():
        if name in ("expected_gradients", "rise"):
            assert all(torch.isfinite(o).all() for o in outs)  # drawn per call
            continue
        for out in outs:
            torch.testing.assert_close(out, expected[name], rtol=0, atol=0)


def test_graph_explainers_in_threads_never_change_the_model():
    changes, errors, _, _ = run_concurrently(model(), GRAPH, rounds=3)
    assert not errors and not changes


def test_explainers_are_built_concurrently():
    """Capturing graphs in two threads at once raced inside torch.fx (KeyError, NameError,
    nn.Module.__call__ left patched); the capture is serialised."""
    net = model()
    call = nn.Module.__call__
    built, errors = [], []

    def build(i):
        try:
            f, params = fxattr.functionalize(net)
            analyzer = fxattr.create_analyzer(["gradcam", "occlusion"][i % 2], net, **(
                {"layer": "3"} if i % 2 == 0 else {"window": (3, 3, 3), "stride": (3, 3, 3)}))
            built.append(analyzer.analyze(torch.randn(2, 3, 6, 6)).shape)
            cam = fxattr.gradcam(f, layer="4")
            built.append(cam(params, torch.randn(3, 6, 6), 0).shape)
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(repr(error)[:200])

    threads = [threading.Thread(target=build, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(built) == 12
    assert nn.Module.__call__ is call
