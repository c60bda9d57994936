"""examples/evaluate_methods.py --quick runs end to end (in this process, through its main(argv)):
the metric table, the plots, and the sanity result of Adebayo et al. 2018 -- guided backprop and
deconvnet barely change under model parameter randomisation, the gradient and LRP do."""

import importlib.util
import math
import sys
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "evaluate_methods.py"


def _load():
    spec = importlib.util.spec_from_file_location("fxattr_example_evaluate_methods", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_evaluate_methods_quick(tmp_path, capsys):
    threads = torch.get_num_threads()
    result = _load().main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert result["accuracy"] > 0.7
    table = result["table"]
    assert "| explainer | " in out and str(table) in out
    assert {"gradient", "guided backprop", "deconvnet", "LRP-epsilon"} <= set(table.explainers)
    # this module's metrics always run; on every method, on all 12 digits
    for column in ("pointing game", "attribution loc.", "rank accuracy", "ROC AUC (ink)", "sparseness",
                   "complexity"):
        j = table.metrics.index(column)
        assert (table.count[:, j] == 12).all() and torch.isfinite(table.mean[:, j]).all(), column
    # input-weighted methods concentrate on the ink more than the plain gradient; random is worst
    auc = {name: table[name, "ROC AUC (ink)"][0] for name in table.explainers}
    assert auc["integrated gradients"] > auc["gradient"] + 0.2 and auc["random"] < 0.6
    # only missing metrics are skipped, or re-explaining ones with the stochastic methods
    for name, reason in result["skipped"].items():
        assert ("is not in this version" in reason
                or name.endswith(("for SmoothGrad", "for random"))), f"{name}: {reason}"
    for name, path in result["files"].items():
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    # the sanity check: mean Spearman to the original explanation over the top-down cascade
    mprt = result["mprt"]
    assert {"guided backprop", "deconvnet", "gradient", "LRP-epsilon"} <= set(mprt), mprt
    assert min(mprt["guided backprop"], mprt["deconvnet"]) > 0.35, mprt
    assert max(abs(mprt["gradient"]), abs(mprt["LRP-epsilon"])) < 0.2, mprt
    assert all(not math.isnan(v) for v in mprt.values())
    assert "stay close to their original explanation" in out
