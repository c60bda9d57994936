"""attribute_dataset / load_attributions: equal to the in-memory vmapped explainer, resumable
bitwise, every format and storage dtype, class means, lazy reading, clear errors."""

import json
import math

import numpy as np
import pytest
import torch

import fxattr
from fxattr.errors import FxattrError
from fxattr.runner import attribute_dataset, load_attributions, storage
from tests.runner.helpers import images, labelled, reference, tiny_cnn


@pytest.fixture
def setup():
    model = tiny_cnn()
    f, params = fxattr.functionalize(model)
    return model, f, params


def in_batches(explain, params, f, x, batch_size, target=None):
    """The in-memory reference in the runner's batches (vmap results may differ in the last bit
    between batch sizes, so the runner is compared with the same batches)."""
    pieces = [reference(explain, params, f, x[i:i + batch_size],
                        None if target is None else target[i:i + batch_size])
              for i in range(0, len(x), batch_size)]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.safetensors"))}


class FailingAt(torch.utils.data.Dataset):
    """A dataset whose example ``fail_at`` raises: a run that dies part-way."""

    def __init__(self, data, fail_at):
        self.data, self.fail_at = data, fail_at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.data[i]


# ---------------------------------------------------------------- equality with the in-memory explainer

@pytest.mark.parametrize("method", ["gradient", "lrp"])
def test_runner_equals_in_memory_vmapped_explainer(setup, tmp_path, method):
    model, f, params = setup
    explain = fxattr.gradient(f) if method == "gradient" else fxattr.lrp(f, composite="epsilon_plus")
    data = labelled(11)
    x, y = data.tensors
    state = {k: v.clone() for k, v in model.state_dict().items()}
    summary = attribute_dataset(explain, params, data, tmp_path / "run", batch_size=3, shard_size=6, progress=False)
    assert (summary.examples, summary.shards, summary.computed, summary.skipped) == (11, 2, 2, 0)
    run = load_attributions(tmp_path / "run")
    expected, prediction = in_batches(explain, params, f, x, 3)
    assert run["attribution"].shape == (11, 3, 8, 8)
    assert torch.equal(run["attribution"][:], expected)
    assert torch.equal(run["index"], torch.arange(11))
    assert torch.equal(run["prediction"], model(x).argmax(1))
    assert torch.equal(run["target"], prediction)
    assert torch.equal(run["label"], y)
    torch.testing.assert_close(run["output"][:], model(x).detach())
    # the in-memory result also equals a loop over examples (vmap == loop)
    looped = torch.stack([explain(params, x[i], int(prediction[i])) for i in (0, 7)])
    torch.testing.assert_close(run["attribution"][[0, 7]], looped)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_float64_model_and_images(tmp_path):
    model = tiny_cnn().double()
    f, params = fxattr.functionalize(model)
    x = images(5).double()
    explain = fxattr.input_x_gradient(f)
    attribute_dataset(explain, params, x, tmp_path / "run", batch_size=2, progress=False)
    run = load_attributions(tmp_path / "run")
    expected, _ = in_batches(explain, params, f, x, 2)
    assert run["attribution"].dtype == torch.float32
    assert torch.equal(run["attribution"][:], expected.float())
    assert "label" not in run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16"])
def test_storage_dtype_rounds_once_and_halves_the_disk(setup, tmp_path, dtype):
    _, f, params = setup
    x = images(16)
    explain = fxattr.gradient(f)
    attribute_dataset(explain, params, x, tmp_path / "half", batch_size=16, dtype=dtype, progress=False)
    attribute_dataset(explain, params, x, tmp_path / "full", batch_size=16, progress=False)
    half, full = load_attributions(tmp_path / "half"), load_attributions(tmp_path / "full")
    stored = storage.DTYPES[dtype] if isinstance(dtype, str) else dtype
    assert half["attribution"].dtype == stored
    assert torch.equal(half["attribution"][:], full["attribution"][:].to(stored))
    size = lambda out: (out / "shards" / "shard-000000.safetensors").stat().st_size
    # 16 x 192 attribution values dominate the shard; outputs and indices stay full size
    assert size(tmp_path / "half") < 0.6 * size(tmp_path / "full")


def test_targets_label_and_callable(setup, tmp_path):
    model, f, params = setup
    data = labelled(7)
    x, y = data.tensors
    explain = fxattr.gradient(f)
    attribute_dataset(explain, params, data, tmp_path / "label", batch_size=4, target="label", progress=False)
    run = load_attributions(tmp_path / "label")
    assert torch.equal(run["target"], y)
    assert torch.equal(run["attribution"][:], in_batches(explain, params, f, x, 4, y)[0])
    assert torch.equal(run["prediction"], model(x).argmax(1))

    def second_best(outputs, labels):
        assert outputs.shape == (len(labels), 4)
        return outputs.topk(2, dim=1).indices[:, 1]

    attribute_dataset(explain, params, data, tmp_path / "second", batch_size=4, target=second_best, progress=False)
    second = model(x).topk(2, dim=1).indices[:, 1]
    run = load_attributions(tmp_path / "second")
    assert torch.equal(run["target"], second)
    assert torch.equal(run["attribution"][:], in_batches(explain, params, f, x, 4, second)[0])


def test_bad_targets_are_refused(setup, tmp_path):
    _, f, params = setup
    explain = fxattr.gradient(f)
    with pytest.raises(FxattrError, match="target='label' needs"):
        attribute_dataset(explain, params, images(4), tmp_path / "a", target="label", progress=False)
    with pytest.raises(FxattrError, match="must return 4 integer class indices"):
        attribute_dataset(explain, params, images(4), tmp_path / "b", batch_size=4, progress=False,
                          target=lambda outputs, labels: outputs.max(1).values)
    data = torch.utils.data.TensorDataset(images(4), torch.tensor([0, 1, 9, 2]))
    with pytest.raises(FxattrError, match="target 9 is out of range for the model's 4 outputs"):
        attribute_dataset(explain, params, data, tmp_path / "c", target="label", progress=False)


# ---------------------------------------------------------------- resume

def test_resume_after_a_crash_is_bitwise_an_uninterrupted_run(setup, tmp_path):
    _, f, params = setup
    data = labelled(13)
    explain = fxattr.lrp(f, composite="epsilon_gamma_box", low=0.0, high=1.0)
    attribute_dataset(explain, params, data, tmp_path / "whole", batch_size=2, shard_size=4, progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        attribute_dataset(explain, params, FailingAt(data, 9), tmp_path / "crashed", batch_size=2, shard_size=4,
                          progress=False)
    assert sorted(shard_bytes(tmp_path / "crashed")) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert not json.loads((tmp_path / "crashed" / "manifest.json").read_text())["complete"]
    with pytest.raises(FxattrError, match="not complete"):
        load_attributions(tmp_path / "crashed")
    summary = attribute_dataset(explain, params, data, tmp_path / "crashed", batch_size=2, shard_size=4,
                                resume=True, progress=False)
    assert (summary.computed, summary.skipped) == (2, 2)
    assert shard_bytes(tmp_path / "crashed") == shard_bytes(tmp_path / "whole")
    for name in ("class_mean.safetensors", "manifest.json"):
        assert (tmp_path / "crashed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    again = attribute_dataset(explain, params, data, tmp_path / "crashed", batch_size=2, shard_size=4,
                              resume=True, progress=False)
    assert again.computed == 0


def test_random_explainer_resumes_bitwise_and_keeps_the_global_generator(setup, tmp_path):
    _, f, params = setup
    x = images(6)
    explain = fxattr.smoothgrad(f, samples=4, sigma=0.2)
    attribute_dataset(explain, params, x, tmp_path / "whole", batch_size=2, progress=False)
    (tmp_path / "whole" / "shards" / "shard-000001.safetensors").rename(tmp_path / "kept")
    manifest = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    storage.write_manifest(tmp_path / "whole", dict(manifest, complete=False))
    state = torch.get_rng_state()
    summary = attribute_dataset(explain, params, x, tmp_path / "whole", batch_size=2, resume=True, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert summary.computed == 1
    assert (tmp_path / "whole" / "shards" / "shard-000001.safetensors").read_bytes() == (tmp_path / "kept").read_bytes()
    run = load_attributions(tmp_path / "whole")
    assert not torch.equal(run["attribution"][0], run["attribution"][1])  # different noise per example
    attribute_dataset(explain, params, x, tmp_path / "seed1", batch_size=2, seed=1, progress=False)
    assert not torch.equal(load_attributions(tmp_path / "seed1")["attribution"][:], run["attribution"][:])


def test_resume_with_another_configuration_is_refused(setup, tmp_path):
    _, f, params = setup
    x = images(5)
    explain = fxattr.lrp(f, rule="epsilon", epsilon=0.1)
    out = tmp_path / "run"
    attribute_dataset(explain, params, x, out, batch_size=2, progress=False)
    with pytest.raises(FxattrError, match="already holds an fxattr run.*resume=True"):
        attribute_dataset(explain, params, x, out, batch_size=2, progress=False)
    with pytest.raises(FxattrError, match="batch_size: 2 in the manifest, 1 now"):
        attribute_dataset(explain, params, x, out, batch_size=1, resume=True, progress=False)
    with pytest.raises(FxattrError, match="explainer.config"):
        attribute_dataset(fxattr.lrp(f, rule="epsilon", epsilon=0.2), params, x, out, batch_size=2, resume=True,
                          progress=False)
    with pytest.raises(FxattrError, match="dtype: 'float32' in the manifest, 'float16' now"):
        attribute_dataset(explain, params, x, out, batch_size=2, dtype=torch.float16, resume=True, progress=False)
    other = {k: v + 1 if k.endswith("bias") else v for k, v in params.items()}
    with pytest.raises(FxattrError, match="params:"):
        attribute_dataset(explain, other, x, out, batch_size=2, resume=True, progress=False)
    with pytest.raises(FxattrError, match="examples: 5 in the manifest, 4 now"):
        attribute_dataset(explain, params, x[:4], out, batch_size=2, resume=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FxattrError, match="not an empty directory"):
        attribute_dataset(explain, params, x, tmp_path / "other", progress=False)


def test_killed_write_leaves_no_partial_shard(setup, tmp_path, monkeypatch):
    """A write that dies before its rename leaves only a temporary file, removed on resume."""
    _, f, params = setup
    x = images(4)
    explain = fxattr.gradient(f)
    real_replace = storage.os.replace
    calls = []

    def dying_replace(source, target):
        calls.append(target)
        if str(target).endswith("shard-000001.safetensors"):
            raise KeyboardInterrupt  # the process dies between write and rename
        return real_replace(source, target)

    monkeypatch.setattr(storage.os, "replace", dying_replace)
    with pytest.raises(FxattrError, match="writing a shard failed"):
        attribute_dataset(explain, params, x, tmp_path / "run", batch_size=2, progress=False)
    monkeypatch.setattr(storage.os, "replace", real_replace)
    assert [p.name for p in (tmp_path / "run" / "shards").iterdir()] != []
    assert not (tmp_path / "run" / "shards" / "shard-000001.safetensors").exists()
    assert list((tmp_path / "run" / "shards").glob(".tmp-*"))
    attribute_dataset(explain, params, x, tmp_path / "run", batch_size=2, resume=True, progress=False)
    assert not list((tmp_path / "run" / "shards").glob(".tmp-*"))
    assert torch.equal(load_attributions(tmp_path / "run")["attribution"][:], in_batches(explain, params, f, x, 2)[0])


# ---------------------------------------------------------------- formats, aggregates, lazy reading

def test_hdf5_in_virelay_layout(setup, tmp_path):
    h5py = pytest.importorskip("h5py")
    model, f, params = setup
    data = labelled(9)
    x = data.tensors[0]
    explain = fxattr.gradient(f)
    attribute_dataset(explain, params, data, tmp_path / "h5", batch_size=2, shard_size=4, format="hdf5",
                      dtype=torch.float16, progress=False)
    attribute_dataset(explain, params, data, tmp_path / "st", batch_size=2, shard_size=4, dtype=torch.float16,
                      progress=False)
    assert not (tmp_path / "h5" / "shards").exists()
    with h5py.File(tmp_path / "h5" / "attribution.h5", "r") as file:
        assert {"attribution", "label", "prediction", "index"} <= set(file)
        assert file["attribution"].shape == (9, 3, 8, 8) and file["attribution"].dtype == np.float16
        assert file["prediction"].shape == (9, 4) and file["prediction"].dtype == np.float32
        expected = load_attributions(tmp_path / "st")
        np.testing.assert_array_equal(file["attribution"][:], expected["attribution"][:].numpy())
        np.testing.assert_array_equal(file["index"][:], np.arange(9))
        np.testing.assert_array_equal(file["label"][:], expected["target"].numpy())  # the explained class
        np.testing.assert_allclose(file["prediction"][:], model(x).detach().numpy(), rtol=1e-6)
        assert file.attrs["attribution_strategy"] == "model"
    run = load_attributions(tmp_path / "h5")
    for key in ("index", "target", "prediction", "label", "class_mean", "class_count"):
        assert torch.equal(run[key], expected[key]), key
    assert torch.equal(run["attribution"][3:7], expected["attribution"][3:7])
    with pytest.raises(FxattrError, match="HDF5 has no bfloat16"):
        attribute_dataset(explain, params, data, tmp_path / "bf", format="hdf5", dtype=torch.bfloat16, progress=False)


def test_zarr_with_bfloat16(setup, tmp_path):
    zarr = pytest.importorskip("zarr")
    _, f, params = setup
    data = labelled(7)
    explain = fxattr.gradient(f)
    for fmt in ("zarr", "safetensors"):
        attribute_dataset(explain, params, data, tmp_path / fmt, batch_size=3, format=fmt, dtype=torch.bfloat16,
                          progress=False)
    run, expected = load_attributions(tmp_path / "zarr"), load_attributions(tmp_path / "safetensors")
    assert run["attribution"].dtype == torch.bfloat16
    assert torch.equal(run["attribution"][:], expected["attribution"][:])
    for key in ("index", "target", "prediction", "label"):
        assert torch.equal(run[key], expected[key]), key
    assert torch.equal(run["output"][:], expected["output"][:])
    group = zarr.open_group(str(tmp_path / "zarr" / "attribution.zarr"), mode="r")
    assert group["attribution"].shape == (7, 3, 8, 8) and group.attrs["attribution_dtype"] == "bfloat16"


def test_class_means_and_counts(setup, tmp_path):
    _, f, params = setup
    data = labelled(10)
    attribute_dataset(fxattr.gradient(f), params, data, tmp_path / "run", batch_size=3, target="label",
                      dtype=torch.float16, progress=False)
    run = load_attributions(tmp_path / "run")
    values = run["attribution"][:].double()
    classes = torch.unique(run["label"])
    assert torch.equal(run["classes"], classes)
    for c, count, mean in zip(run["classes"], run["class_count"], run["class_mean"]):
        chosen = run["label"] == c
        assert int(count) == int(chosen.sum())
        assert torch.equal(mean, values[chosen].mean(0).float())
    assert int(run["class_count"].sum()) == 10


def test_lazy_attributions_index_like_a_tensor(setup, tmp_path):
    _, f, params = setup
    x = images(10)
    attribute_dataset(fxattr.gradient(f), params, x, tmp_path / "run", batch_size=3, progress=False)
    lazy = load_attributions(tmp_path / "run")["attribution"]
    full = lazy.tensor()
    assert len(lazy) == 10 and lazy.shape == (10, 3, 8, 8) and np.asarray(lazy).shape == (10, 3, 8, 8)
    for key in (4, -1, slice(2, 8), slice(None, None, 3), slice(8, 2), [9, 0, 4, 5, 3], np.array([1, 1, 2]),
                torch.arange(10) % 3 == 0, (slice(1, 4), 0), (2, slice(None), 1), ...):
        expected = full[key] if not isinstance(key, np.ndarray) else full[torch.from_numpy(key)]
        assert torch.equal(lazy[key], expected), key
    with pytest.raises(IndexError):
        lazy[10]
    with pytest.raises(IndexError):
        lazy[[0, 11]]


def test_dataloader_workers_give_the_same_result(setup, tmp_path):
    _, f, params = setup
    data = labelled(8)
    explain = fxattr.gradient(f)
    loader = torch.utils.data.DataLoader(data, batch_size=5, shuffle=True, num_workers=2)
    attribute_dataset(explain, params, loader, tmp_path / "workers", batch_size=2, progress=False)
    attribute_dataset(explain, params, data, tmp_path / "plain", batch_size=2, progress=False)
    assert shard_bytes(tmp_path / "workers") == shard_bytes(tmp_path / "plain")


def test_compile_pads_the_last_batch_so_every_graph_sees_one_batch_size(tmp_path):
    seen = []

    def recording_backend(graph, example_inputs):  # a torch.compile backend that runs the graph as is
        seen.append(sorted({t.shape[0] for t in example_inputs
                            if isinstance(t, torch.Tensor) and tuple(t.shape[1:]) == (3, 8, 8)}))
        return graph.forward

    f, params = fxattr.functionalize(tiny_cnn())
    torch._dynamo.reset()
    attribute_dataset(fxattr.gradient(f), params, images(7), tmp_path / "run", batch_size=3,
                      compile={"backend": recording_backend}, progress=False)
    assert seen and all(sizes == [3] for sizes in seen), seen  # 7 = 3 + 3 + 1 padded to 3
    run = load_attributions(tmp_path / "run")
    # the padded batch computes the last example among copies: equal up to rounding
    torch.testing.assert_close(run["attribution"][:], in_batches(fxattr.gradient(f), params, f, images(7), 3)[0])


@pytest.mark.slow
def test_compiled_run_equals_eager(setup, tmp_path):
    _, f, params = setup
    x = images(4)
    explain = fxattr.gradient(f)
    torch._dynamo.reset()
    attribute_dataset(explain, params, x, tmp_path / "compiled", batch_size=4, compile=True, progress=False)
    run = load_attributions(tmp_path / "compiled")
    torch.testing.assert_close(run["attribution"][:], in_batches(explain, params, f, x, 4)[0])
    assert torch.equal(run["index"], torch.arange(4))
    assert run["manifest"]["config"]["compile"] == "True"


# ---------------------------------------------------------------- argument errors

@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"batch_size": 2.0}, "batch_size must be an int >= 1"),
    ({"batch_size": 2, "shard_size": 3}, "shard_size \\(3\\) must be a multiple of batch_size \\(2\\)"),
    ({"target": "argmax"}, "target must be 'predicted', 'label' or a callable"),
    ({"format": "npy"}, "format must be one of 'safetensors', 'hdf5', 'zarr'"),
    ({"dtype": torch.float64}, "dtype must be one of"),
    ({"dtype": "half"}, "dtype must be one of"),
    ({"resume": 1}, "resume must be True or False"),
    ({"num_workers": -1}, "num_workers must be an int >= 0"),
    ({"randomness": "error"}, "randomness must be one of"),
    ({"compile": "yes"}, "compile must be True, False or a dict"),
    ({"seed": 1.5}, "seed must be an int"),
])
def test_bad_arguments(setup, tmp_path, kwargs, message):
    _, f, params = setup
    with pytest.raises(FxattrError, match=f"fxattr.attribute_dataset: {message}"):
        attribute_dataset(fxattr.gradient(f), params, images(3), tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_bad_inputs(setup, tmp_path):
    _, f, params = setup
    explain = fxattr.gradient(f)
    with pytest.raises(FxattrError, match="explain has no .model"):
        attribute_dataset(lambda p, x, t: x, params, images(2), tmp_path / "a", progress=False)
    with pytest.raises(FxattrError, match="params must be the dict"):
        attribute_dataset(explain, list(params.values()), images(2), tmp_path / "a", progress=False)
    with pytest.raises(FxattrError, match="data must be a Dataset"):
        attribute_dataset(explain, params, 42, tmp_path / "a", progress=False)
    with pytest.raises(FxattrError, match="the dataset is empty"):
        attribute_dataset(explain, params, images(0), tmp_path / "a", progress=False)
    with pytest.raises(FxattrError, match="failed on one example of shape \\(3, 5, 5\\)"):
        attribute_dataset(explain, params, images(2, shape=(3, 5, 5)), tmp_path / "a", progress=False)
    with pytest.raises(FxattrError, match="no manifest.json"):
        load_attributions(tmp_path / "nowhere")
    assert math.isfinite(0.0)
