"""``fxattr explain`` / ``fxattr view``: the command equals the in-memory explainer on ImageFolder
trees and arrays, and every bad argument ends with one clear line and exit status 2."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxattr
from fxattr.runner import load_attributions
from fxattr.runner.cli import main
from tests.runner.helpers import image_tree, images, reference, tiny_cnn

MODEL = "tests.runner.helpers:tiny_cnn"
ROOT = Path(__file__).resolve().parents[2]


def explain_args(data, out, *extra, method="gradient"):
    return ["explain", "--model", MODEL, "--method", method, "--data", str(data), "--out", str(out),
            "--batch-size", "2", "--workers", "0", "--quiet", *extra]


def fails(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    return err


def in_memory(model, x, method="gradient", target=None):
    f, params = fxattr.functionalize(model)
    explain = fxattr.create_analyzer(method, model).explainer
    pieces = [reference(explain, params, f, x[i:i + 2], None if target is None else target[i:i + 2])[0]
              for i in range(0, len(x), 2)]
    return torch.cat(pieces)


def test_image_folder_in_sorted_order_equals_in_memory(tmp_path):
    x = image_tree(tmp_path / "tree", per_class=(3, 2))
    assert main(explain_args(tmp_path / "tree", tmp_path / "out", method="lrp.epsilon")) == 0
    run = load_attributions(tmp_path / "out")
    model = tiny_cnn()
    assert torch.equal(run["index"], torch.arange(5))
    assert run["label"].tolist() == [0, 0, 0, 1, 1]
    assert torch.equal(run["prediction"], model(x).argmax(1))
    assert torch.equal(run["target"], run["prediction"])
    assert run["attribution"].dtype == torch.float32
    assert torch.equal(run["attribution"][:], in_memory(model, x, "lrp.epsilon"))
    assert run["manifest"]["extra"]["classes"] == ["class_a", "class_b"]


def test_resize_normalize_weights_and_label_target(tmp_path):
    from PIL import Image

    image_tree(tmp_path / "tree", per_class=(2, 2), size=(10, 12))
    model = tiny_cnn()
    with torch.no_grad():
        model[0].weight.mul_(-2)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    assert main(explain_args(tmp_path / "tree", tmp_path / "out", "--resize", "8", "--normalize", "0.5,0.25",
                             "--weights", str(tmp_path / "weights.pt"), "--target", "label",
                             "--dtype", "float16")) == 0
    files = sorted((tmp_path / "tree").rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((8, 8), Image.BILINEAR)).copy())
                     .permute(2, 0, 1).float() / 255 for p in files])
    x = (x - 0.5) / 0.25
    run = load_attributions(tmp_path / "out")
    assert torch.equal(run["target"], torch.tensor([0, 0, 1, 1]))
    assert torch.equal(run["attribution"][:], in_memory(model, x, target=run["target"]).half())


def test_npz_and_npy_arrays_and_safetensors_weights(tmp_path):
    from safetensors.torch import save_file

    x = images(5)
    labels = np.array([3, 1, 0, 2, 1])
    np.savez(tmp_path / "data.npz", images=(x.numpy() * 255).round().astype(np.uint8), labels=labels)
    np.save(tmp_path / "data.npy", x.numpy())
    model = tiny_cnn()
    save_file(model.state_dict(), tmp_path / "weights.safetensors")
    assert main(explain_args(tmp_path / "data.npz", tmp_path / "npz", "--weights",
                             str(tmp_path / "weights.safetensors"), "--format", "hdf5")) == 0
    run = load_attributions(tmp_path / "npz")
    assert run["label"].tolist() == labels.tolist()
    quantised = torch.from_numpy((x.numpy() * 255).round().astype(np.uint8)).float() / 255
    assert torch.equal(run["attribution"][:], in_memory(model, quantised))
    assert main(explain_args(tmp_path / "data.npy", tmp_path / "npy", "--method-kw", "postprocess=abs")) == 0
    run = load_attributions(tmp_path / "npy")
    assert "label" not in run
    expected = in_memory(model, x).abs()
    assert torch.equal(run["attribution"][:], expected)


def test_view_writes_grid_and_html(tmp_path):
    from PIL import Image

    image_tree(tmp_path / "tree", per_class=(3, 3))
    main(explain_args(tmp_path / "tree", tmp_path / "out"))
    assert main(["view", str(tmp_path / "out"), "--count", "5", "--columns", "3"]) == 0
    with Image.open(tmp_path / "out" / "view" / "grid.png") as grid:
        assert grid.size[0] > 100 and grid.size[1] > 100
    page = (tmp_path / "out" / "view" / "index.html").read_text()
    assert page.count("<img src='heatmaps/0") == 5 and "Class means" in page
    assert len(list((tmp_path / "out" / "view" / "heatmaps").glob("*.png"))) == 5 + 2


def test_errors_name_the_bad_argument(tmp_path, capsys):
    image_tree(tmp_path / "tree", per_class=(1, 1))
    tree, out = tmp_path / "tree", tmp_path / "out"
    fails(capsys, explain_args(tree, out, method="lrp.epsilno"),
          "no method 'lrp.epsilno'; did you mean 'lrp.epsilon'")
    fails(capsys, explain_args(tree, out, "--method-kw", "epsilon"), "--method-kw 'epsilon': expected KEY=VALUE")
    fails(capsys, explain_args(tree, out, "--method-kw", "sigma=2"), "does not take these keyword")
    fails(capsys, explain_args(tree, out, "--method-kw", "epsilon=0.1", method="lrp.z"), "--method 'lrp.z'")
    fails(capsys, explain_args(tree, out, "--weights", str(tmp_path / "missing.pt")),
          f"--weights: no file '{tmp_path / 'missing.pt'}'")
    torch.save({"0.weight": torch.zeros(2)}, tmp_path / "wrong.pt")
    fails(capsys, explain_args(tree, out, "--weights", str(tmp_path / "wrong.pt")), "does not fit the model")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # not loadable with weights_only
    fails(capsys, explain_args(tree, out, "--weights", str(tmp_path / "pickled.pt")), "weights_only=True")
    fails(capsys, explain_args(tree, out, "--normalize", "0.5"), "--normalize '0.5'")
    fails(capsys, explain_args(tree, out, "--normalize", "0.5,0"), "positive finite stds")
    fails(capsys, explain_args(tree, out, "--resize", "big"), "--resize 'big'")
    fails(capsys, explain_args(tmp_path / "nothing.npy", out), "does not exist")
    fails(capsys, explain_args(tmp_path / "tree" / "class_a", out), "has no class sub-directories")
    fails(capsys, explain_args(tree, out, "--format", "csv"), "invalid choice: 'csv'")
    fails(capsys, explain_args(tree, out, "--batch-size", "0"), "batch_size must be an int >= 1")
    args = explain_args(tree, out)
    for model, message in (("tiny_cnn", "--model must be MODULE:FACTORY"),
                           ("no_such_module:f", "cannot import module 'no_such_module'"),
                           ("tests.runner.helpers:nothing", "has no 'nothing'"),
                           ("tests.runner.helpers:images", "images() failed"),
                           ("torchvision:resnet81", "did you mean 'resnet18'")):
        args[args.index("--model") + 1] = model
        fails(capsys, args, message)
    if not torch.cuda.is_available():
        fails(capsys, explain_args(tree, out, "--device", "cuda"), "no CUDA device")
    assert not out.exists()
    fails(capsys, ["view", str(tmp_path / "nowhere")], "holds no fxattr run")


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_image_is_named(tmp_path, capsys, workers):
    image_tree(tmp_path / "tree", per_class=(2, 1))
    broken = tmp_path / "tree" / "class_a" / "img01.png"
    broken.write_bytes(b"not a png")
    args = explain_args(tmp_path / "tree", tmp_path / "out")
    args[args.index("--workers") + 1] = str(workers)
    err = fails(capsys, args, f"cannot read image '{broken}'")
    assert len(err.strip().splitlines()) == 1


def test_torchvision_model_with_random_weights(tmp_path):
    np.save(tmp_path / "x.npy", images(2, shape=(3, 32, 32)).numpy())
    assert main(["explain", "--model", "torchvision:resnet18", "--method", "gradient", "--data",
                 str(tmp_path / "x.npy"), "--out", str(tmp_path / "out"), "--batch-size", "2", "--workers", "0",
                 "--quiet"]) == 0
    run = load_attributions(tmp_path / "out")
    assert run["attribution"].shape == (2, 3, 32, 32) and run["output"].shape == (2, 1000)
    assert torch.isfinite(run["attribution"][:]).all() and run["attribution"][:].abs().sum() > 0


@pytest.mark.slow
def test_python_dash_m_fxattr(tmp_path):
    np.save(tmp_path / "x.npy", images(3).numpy())
    command = [sys.executable, "-m", "fxattr", "explain", "--model", MODEL, "--method", "lrp.epsilon_plus",
               "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "out"), "--batch-size", "2",
               "--workers", "0"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 shards computed, 0 already done, 3 examples" in result.stderr
    run = load_attributions(tmp_path / "out")
    assert torch.equal(run["attribution"][:], in_memory(tiny_cnn(), images(3), "lrp.epsilon_plus"))
