"""examples/text_attribution.py --quick runs end to end: the tiny classifier learns the generated
sentiment task, every method explains the padded batch in one vmapped call (zero on padding), the
pictures are written, and integrated gradients puts most relevance on the sentiment words."""

import importlib.util
import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "text_attribution.py"


def test_text_attribution_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fxattr_example_text_attribution", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    result = module.main(["--quick", "--out", str(tmp_path / "text.png")])
    assert torch.get_num_threads() == threads
    assert "test accuracy" in capsys.readouterr().out
    assert result["accuracy"] > 0.85          # quick mode: about 0.95
    mask = result["mask"]
    assert len(result["relevance"]) >= 6
    for name, r in result["relevance"].items():
        assert r.shape == mask.shape and torch.isfinite(r).all(), name
        assert (r[mask == 0] == 0).all(), name
    # half the words are sentiment words; IG and Chefer's relevance concentrate on them
    assert result["shares"]["integrated gradients"] > 0.65
    assert result["shares"]["attention relevance (Chefer)"] > 0.65
    data = (tmp_path / "text.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert (tmp_path / "text.html").read_text().count("<span") > 20
