"""fxattr.metrics example: which explanation is faithful, localised, sparse -- and sane?

Trains the demo's small CNN on scikit-learn's bundled digits (no download), explains test digits
with the demo's methods and scores them with fxattr.metrics in one call,
``fxattr.metrics.evaluate(explainers, metrics, params, x, target, mask=...)``: a markdown table of
mean ± standard error over the digits, plus plots in examples/out/:

- ``metrics.png``: the metric x method chart (``fxattr.viz.plot_metrics``);
- ``deletion.png``: pixel-flipping (deletion) curves (``fxattr.viz.plot_curves``);
- ``mprt.png`` and ``mprt_grid.png`` (one digit's explanations): the model parameter randomisation
  test (Adebayo et al. 2018, "Sanity checks for saliency maps"): the Spearman correlation between
  each method's explanation of the trained model and of the model with its layers re-initialised
  one by one from the top (``fxattr.metrics.mprt``, signed explanations). Guided backprop and deconvnet stay close to their original explanation
  while the layers they should depend on are random (they mostly reconstruct the input); the
  gradient and LRP change completely, as an explanation of *the model* must.

The localisation metrics need a ground-truth mask; digits have none, so the mask here is the
digit's ink (pixels above 0.3): "does the explanation point at the strokes?" (the model may rightly
use the background too). ``focus`` needs 2 x 2 mosaics of images and is left out.

    python examples/evaluate_methods.py            # about a minute on 2 CPU cores
    python examples/evaluate_methods.py --quick    # a few seconds (used by the tests)

Metrics or methods that this version of fxattr does not have yet are skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

import fxattr
import fxattr.metrics
from fxattr import viz

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def load_demo():
    """examples/demo.py as a module: its data, model and training are reused here."""
    name = "fxattr_example_demo"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def methods(quick: bool):
    """(name, fxattr attribute, config): the demo's methods (those with a clear MPRT story first)."""
    steps = 8 if quick else 32
    return [
        ("gradient", "gradient", {}),
        ("guided backprop", "guided_backprop", {}),
        ("deconvnet", "deconvnet", {}),
        ("LRP-epsilon", "lrp", {"rule": "epsilon", "epsilon": 0.1}),
        ("integrated gradients", "integrated_gradients", {"steps": steps}),
        ("input x gradient", "input_x_gradient", {}),
        ("SmoothGrad", "smoothgrad", {"samples": 8 if quick else 32, "sigma": 0.15}),
        ("LRP preset A", "lrp", {"composite": "sequential_preset_a"}),
        ("random", "random", {}),
    ]


# the methods the randomisation sanity check compares (Adebayo et al. 2018)
MPRT_METHODS = ("gradient", "guided backprop", "deconvnet", "LRP-epsilon", "integrated gradients",
                "input x gradient")


def metrics(quick: bool):
    """(column, fxattr.metrics attribute, config, needs the explainer): the table's metrics."""
    samples = 8 if quick else 32
    return [
        ("deletion AUC", "pixel_flipping", {"features_in_step": 4, "perturb_baseline": "black"}, False),
        ("faithfulness corr.", "faithfulness_correlation",
         {"nr_runs": samples, "subset_size": 8, "perturb_baseline": "black"}, False),
        ("max sensitivity", "max_sensitivity", {"nr_samples": samples // 2, "lower_bound": 0.05}, True),
        ("pointing game", "pointing_game", {}, False),
        ("attribution loc.", "attribution_localisation", {}, False),
        ("rank accuracy", "relevance_rank_accuracy", {"abs": True}, False),
        ("ROC AUC (ink)", "auc", {"abs": True}, False),
        ("sparseness", "sparseness", {}, False),
        ("complexity", "complexity", {}, False),
        ("random logit", "random_logit", {"num_classes": 10}, True),
    ]


def build_explainers(f, params, x_train, quick):
    explainers, skipped = {}, {}
    for name, attribute, config in methods(quick):
        method = getattr(fxattr, attribute, None)
        if method is None:
            skipped[name] = f"fxattr.{attribute} is not in this version of fxattr"
            continue
        explain = method(f, **config)
        if hasattr(explain, "fit"):
            explain = explain.fit(params, x_train.split(200))
        explainers[name] = explain
    return explainers, skipped


def runs(metric, explain, params, probe) -> str | None:
    """None if ``metric`` scores ``explain`` on the probe batch, else why not."""
    x, y, mask = probe
    try:
        fxattr.metrics.evaluate({"probe": explain}, {"probe": metric}, params, x, y, mask=mask)
    except Exception as error:  # noqa: BLE001 - the example reports and goes on
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return None


def for_explainers(build, explainers, params, probe, column, skipped):
    """A metric builder (explain -> metric) for the metrics that re-explain, declining (None) the
    explainers it fails on in a probe on 2 digits (each failure is reported)."""
    working = []
    for name, explain in explainers.items():
        reason = runs(build, explain, params, probe)
        if reason is None:
            working.append(explain)
        else:
            skipped[f"{column} for {name}"] = reason
    if not working:
        return None
    return lambda explain: build(explain) if any(explain is w for w in working) else None


def build_metrics(f, params, explainers, probe, quick):
    """The metrics that exist and run on a probe batch, or why not."""
    chosen, skipped = {}, {}
    for column, attribute, config, reexplains in metrics(quick):
        factory = getattr(fxattr.metrics, attribute, None)
        if factory is None:
            skipped[column] = f"fxattr.metrics.{attribute} is not in this version of fxattr"
            continue
        if reexplains:
            def build(explain, factory=factory, config=config):
                return factory(f, explain=explain, **config)
            metric = for_explainers(build, explainers, params, probe, column, skipped)
            if metric is not None:
                chosen[column] = metric
            continue
        metric = factory(f, **config)
        reason = runs(metric, fxattr.gradient(f), params, probe)
        if reason is None:
            chosen[column] = metric
        else:
            skipped[column] = reason
    return chosen, skipped


def randomisation_check(f, params, explainers, probe, batch, skipped):
    """MPRT curves (signed Spearman, top-down cascade) for the methods of the sanity check."""
    if not hasattr(fxattr.metrics, "mprt"):
        return None, "fxattr.metrics.mprt is not in this version of fxattr"
    chosen = {name: explainers[name] for name in MPRT_METHODS if name in explainers}
    layers = fxattr.metrics.mprt(f, explain=fxattr.gradient(f)).layer_names

    def mprt(explain):
        # abs=False: a signed comparison; with |a| the many exact zeros of input-weighted methods on
        # the digits' black background keep the rank correlation high whatever the weights are
        return fxattr.metrics.mprt(f, explain=explain, abs=False, similarity_func="spearman",
                                   layer_order="top_down", seed=42)
    metric = for_explainers(mprt, chosen, params, probe, "MPRT", skipped)
    if metric is None:
        return None, "fxattr.metrics.mprt failed for every method"
    x, y = batch
    table = fxattr.metrics.evaluate(chosen, {"MPRT": metric}, params, x, y)
    return (table, ["original", *layers]), None


def randomisation_grid(f, params, explainers, image, label, file) -> bool:
    """The classic MPRT figure for one digit: one row per method, the explanation of the trained
    model and after each further layer is re-initialised (top down)."""
    from fxattr.metrics import randomisation
    parameter_sets = getattr(randomisation, "randomised_parameter_sets", None)
    if parameter_sets is None:
        return False
    names, sets = parameter_sets(f, params, layer_order="top_down", seed=42)
    rows, labels = [], []
    for name in ("gradient", "guided backprop", "deconvnet", "LRP-epsilon"):
        if name not in explainers:
            continue
        explain = explainers[name]
        original = explain(params, image, label)
        randomised = torch.vmap(explain, in_dims=(0, None, None))(sets, image, label)
        rows.append([viz.graymap(image, input_is_positive_only=True), viz.heatmap(original),
                     *[viz.heatmap(r) for r in randomised]])
        labels.append(name)
    viz.plot_grid(rows, row_labels=labels, col_labels=["input", "trained", f"{names[0]} random",
                                                       *[f"+ {n} random" for n in names[1:]]],
                  file=file, cell_size=1.0, dpi=100)
    return True


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few epochs, digits and samples (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 10; 2 quick)")
    parser.add_argument("--examples", type=int, default=None, help="test digits (default 64; 12 quick)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the PNGs")
    parser.add_argument("--no-progress", action="store_true", help="no training progress bar")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    demo = load_demo()
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 10)
    n = args.examples if args.examples is not None else (12 if args.quick else 64)

    torch.manual_seed(0)
    (x_train, y_train), (x_test, y_test) = demo.load_data()
    start = time.perf_counter()
    model = demo.train(demo.make_model(), x_train, y_train, epochs, progress=not args.no_progress)
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"trained the demo CNN for {epochs} epochs in {time.perf_counter() - start:.1f} s; "
          f"test accuracy {accuracy:.3f}")

    f, params = fxattr.functionalize(model, input_shape=(1, 8, 8))
    x, y = x_test[:n], y_test[:n]
    ink = x > 0.3                                               # (n, 1, 8, 8) bool: the strokes
    explainers, skipped_methods = build_explainers(f, params, x_train, args.quick)
    probe = (x[:2], y[:2], ink[:2])
    chosen, skipped_metrics = build_metrics(f, params, explainers, probe, args.quick)

    start = time.perf_counter()
    table = fxattr.metrics.evaluate(explainers, chosen, params, x, y, mask=ink)
    seconds = time.perf_counter() - start
    print(f"\n{len(explainers)} methods x {len(chosen)} metrics on {n} test digits in {seconds:.1f} s "
          "(mean ± standard error over the digits):\n")
    print(table)
    for name, reason in {**skipped_methods, **skipped_metrics}.items():
        print(f"  skipped {name}: {reason}")

    args.out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": args.out / "metrics.png"}
    viz.plot_metrics(table, file=files["metrics"], title=f"fxattr.metrics on {n} digits (mean ± s.e.)")
    if "deletion AUC" in chosen:
        files["deletion"] = args.out / "deletion.png"
        viz.plot_curves(table, "deletion AUC", file=files["deletion"], ylabel="softmax of the target",
                        xlabel="pixels removed, most relevant first (4 per step, 4 to 64)",
                        title="pixel flipping (most relevant first, 4 pixels per step)")

    skipped_mprt = {}
    randomisation, reason = randomisation_check(f, params, explainers, probe, (x, y), skipped_mprt)
    for name, why in skipped_mprt.items():
        print(f"  skipped {name}: {why}")
    summary = {}
    if randomisation is None:
        print(f"\nrandomisation check skipped: {reason}")
    else:
        mprt_table, steps = randomisation
        curves = {name: mprt_table.curves[name]["MPRT"] for name in mprt_table.explainers}
        files["mprt"] = args.out / "mprt.png"
        if randomisation_grid(f, params, explainers, x[0], y[0], args.out / "mprt_grid.png"):
            files["mprt grid"] = args.out / "mprt_grid.png"
        viz.plot_curves(curves, file=files["mprt"], step_labels=steps,
                        xlabel="layers re-initialised, top down (cumulative)",
                        ylabel="Spearman to the original explanation",
                        title="model parameter randomisation test (Adebayo et al. 2018)")
        print("\nsanity check (MPRT, top-down cascade, signed Spearman to the trained model's "
              "explanation):\n")
        print("| method | " + " | ".join(steps[1:]) + " | mean over randomised layers |")
        print("|---|" + "---|" * len(steps))
        for name, c in curves.items():
            randomised = c[:, 1:].double()
            summary[name] = randomised.mean().item()
            cells = " | ".join(f"{v:.2f}" for v in randomised.mean(0).tolist())
            print(f"| {name} | {cells} | {summary[name]:.2f} |")
        stable = [m for m in ("guided backprop", "deconvnet") if m in summary]
        changing = [m for m in ("gradient", "LRP-epsilon") if m in summary]
        if stable and changing:
            top = {name: c[:, 1].double().mean().item() for name, c in curves.items()}
            print(f"\n{' and '.join(stable)} stay close to their original explanation while the model "
                  f"is randomised (mean correlation {', '.join(f'{summary[m]:.2f}' for m in stable)}; "
                  f"{', '.join(f'{top[m]:.2f}' for m in stable)} with the output layer random): they "
                  f"hardly explain the model. {' and '.join(changing)} change completely "
                  f"({', '.join(f'{summary[m]:.2f}' for m in changing)}), as they should.")
    for name, path in files.items():
        print(f"wrote {path}")
    return {"accuracy": accuracy, "table": table, "mprt": summary, "files": files,
            "skipped": {**skipped_methods, **skipped_metrics, **skipped_mprt}}


if __name__ == "__main__":
    main()
