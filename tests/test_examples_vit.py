"""examples/vit_attribution.py --quick runs end to end: the small HF ViT learns the digits, AttnLRP,
Grad-CAM and attention rollout explain a batch in one vmapped call each (the dynamo-captured model
cut at a layer for Grad-CAM), the figure is written, and the maps carry evidence: deleting the
pixels AttnLRP and Grad-CAM rank highest lowers the target logit more than deleting random ones."""

import importlib.util
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "vit_attribution.py"


@pytest.mark.slow
def test_vit_attribution_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fxattr_example_vit_attribution", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    result = module.main(["--quick", "--out", str(tmp_path / "vit.png")])
    assert torch.get_num_threads() == threads
    assert "test accuracy" in capsys.readouterr().out
    assert result["accuracy"] > 0.7                      # quick mode: about 0.85
    maps = result["maps"]
    assert set(maps) == {"AttnLRP", "Grad-CAM", "attention rollout"}
    for name, m in maps.items():
        assert m.shape == (16, 8, 8) and torch.isfinite(m).all(), name
        # Grad-CAM's ReLU may leave a digit blank; most maps carry something
        assert (m.abs().amax(dim=(1, 2)) > 0).float().mean() > 0.75, name
    assert (maps["Grad-CAM"] >= 0).all()
    # rollout: the class token's row of row-stochastic matrices, each token shown on 2 x 2 pixels
    rollout_mass = maps["attention rollout"].sum(dim=(1, 2)) / 4
    assert (maps["attention rollout"] >= 0).all() and (rollout_mass < 1).all()
    drops = result["drops"]
    assert drops["AttnLRP"] > drops["random"] and drops["Grad-CAM"] > drops["random"]
    # Grad-CAM of the example equals the same explainer called on one digit (vmap == loop)
    f, params = result["f"], result["params"]
    one = module.explainers(f)["Grad-CAM"](params, result["images"][0], result["targets"][0])
    torch.testing.assert_close(one, maps["Grad-CAM"][0])
    data = (tmp_path / "vit.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
