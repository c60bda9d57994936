"""The command line: ``fxattr explain`` (a dataset through an explainer) and ``fxattr view``.

    fxattr explain --model torchvision:resnet18 --weights resnet18.pt --method lrp.epsilon_plus \\
        --data val/ --resize 224 --normalize imagenet --out runs/val --batch-size 64 --dtype float16
    torchrun --nproc_per_node 4 -m fxattr explain ...      # the same command on 4 processes
    fxattr view runs/val                                    # runs/val/view/grid.png, index.html

Every bad argument ends the command with one line ``fxattr: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import html
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import torch

import fxattr
from fxattr.errors import FxattrError, api_boundary, fail
from fxattr.runner import storage
from fxattr.runner.dataset import attribute_dataset, load_attributions
from fxattr.runner.sources import check_resize, open_data, parse_floats

__all__ = ["build_explainer", "load_model", "main", "view"]

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ------------------------------------------------------------------ the model

@api_boundary("explain")
def load_model(spec: str, weights: str | None = None) -> torch.nn.Module:
    """``MODULE:FACTORY`` (an import path or a ``file.py``), or ``torchvision:NAME`` (random
    weights), called with no arguments; ``weights`` (a state_dict: ``torch.save`` file read with
    ``weights_only=True``, or ``.safetensors``) loaded into it; the module put in eval mode."""
    if not isinstance(spec, str) or ":" not in spec:
        raise fail(None, f"--model must be MODULE:FACTORY or torchvision:NAME, got {spec!r}")
    module_name, factory_name = spec.rsplit(":", 1)
    if module_name == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise fail(None, "--model torchvision:NAME needs torchvision installed") from None
        names = torchvision.models.list_models()
        if factory_name not in names:
            close = difflib.get_close_matches(factory_name, names, n=4, cutoff=0.5)
            raise fail(None, f"--model: torchvision has no model {factory_name!r}"
                              + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
        model = torchvision.models.get_model(factory_name, weights=None)
    else:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise fail(None, f"--model: no file {module_name!r}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            try:
                module_spec.loader.exec_module(module)
            except Exception as error:
                raise fail(None, f"--model: importing {module_name!r} failed: {type(error).__name__}: {error}") from error
        else:
            try:
                module = importlib.import_module(module_name)
            except ImportError as error:
                raise fail(None, f"--model: cannot import module {module_name!r}: {error}") from error
        factory = module
        for part in factory_name.split("."):
            if not hasattr(factory, part):
                raise fail(None, f"--model: module {module_name!r} has no {factory_name!r}")
            factory = getattr(factory, part)
        if not callable(factory):
            raise fail(None, f"--model: {spec!r} is not callable")
        try:
            model = factory()
        except Exception as error:
            raise fail(None, f"--model: {spec}() failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, torch.nn.Module):
        raise fail(None, f"--model: {spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_state(model, weights)
    return model.eval()


@api_boundary("explain")
def read_weights(weights: str) -> dict:
    path = Path(weights)
    if not path.is_file():
        raise fail(None, f"--weights: no file {weights!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise fail(None, f"--weights: cannot read {weights!r} as a state_dict (torch.save with "
                          f"weights_only=True, or safetensors): {type(error).__name__}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise fail(None, f"--weights: {weights!r} holds a {type(state).__name__}, not a state_dict")
    return state


@api_boundary("explain")
def load_state(model: torch.nn.Module, weights: str) -> None:
    try:
        model.load_state_dict(read_weights(weights))
    except RuntimeError as error:
        raise fail(None, f"--weights {weights!r} does not fit the model: {error}") from error


# ------------------------------------------------------------------ the method

def functional_names() -> list[str]:
    """fxattr's explainer constructors that take the model function first: ``method(f, **config)``."""
    names = []
    for name in fxattr.__all__:
        value = getattr(fxattr, name, None)
        if inspect.isfunction(value):
            parameters = list(inspect.signature(value).parameters)
            if parameters and parameters[0] == "f":
                names.append(name)
    return sorted(names)


@api_boundary("explain")
def parse_method_kw(items) -> dict:
    """``KEY=VALUE`` pairs; values are Python literals (``0.25``, ``(8, 8)``, ``None``) or strings."""
    kwargs = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise fail(None, f"--method-kw {item!r}: expected KEY=VALUE with KEY a keyword name "
                              "(e.g. --method-kw epsilon=0.25)")
        if key in kwargs:
            raise fail(None, f"--method-kw: {key!r} given twice")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string (composite=epsilon_plus)
        kwargs[key] = value
    return kwargs


@api_boundary("explain")
def build_explainer(method: str, model: torch.nn.Module, kwargs: dict):
    """``(explain, params)`` for an analyzer name (``fxattr.list_analyzers()``, iNNvestigate's
    keywords and defaults) or a functional explainer's name (``integrated_gradients`` is the
    analyzer; the functional constructors are also reachable as ``fxattr.NAME``)."""
    analyzers = fxattr.list_analyzers()
    functional = functional_names()
    name = method.removeprefix("fxattr.")
    try:
        if method in analyzers:
            analyzer = fxattr.create_analyzer(method, model, **kwargs)
            return analyzer.explainer, analyzer.params
        if name in functional:
            f, params = fxattr.functionalize(model)
            try:
                return getattr(fxattr, name)(f, **kwargs), params
            except TypeError as error:
                raise fail(None, f"--method-kw: {name!r} does not take these keywords: {error}") from error
    except FxattrError as error:
        raise fail(None, f"--method {method!r} with --method-kw {kwargs!r}: {error}") from error
    known = sorted(set(analyzers) | set(functional))
    close = difflib.get_close_matches(method, known, n=4, cutoff=0.5)
    raise fail(None, f"--method: no method {method!r}"
                      + (f"; did you mean {', '.join(map(repr, close))}?" if close else "")
                      + " (fxattr.list_analyzers() lists the analyzer names)")


# ------------------------------------------------------------------ explain

@api_boundary("explain")
def parse_normalize(text: str | None):
    if text is None:
        return None
    if text.lower() == "imagenet":
        return IMAGENET
    try:
        values = parse_floats(text)
    except ValueError:
        values = []
    if len(values) == 2:
        return values[0], values[1]
    if len(values) >= 2 and len(values) % 2 == 0:
        return values[: len(values) // 2], values[len(values) // 2:]
    raise fail(None, f"--normalize {text!r}: expected MEAN,STD (two numbers), per-channel means then "
                      "stds (0.5,0.5,0.5,0.2,0.2,0.2), or 'imagenet'")


@api_boundary("explain")
def parse_resize(text: str | None):
    if text is None:
        return None
    try:
        values = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise fail(None, f"--resize {text!r}: expected SIZE or HEIGHT,WIDTH (positive ints)")
    return check_resize(values[0] if len(values) == 1 else tuple(values))


@api_boundary("explain")
def explain_command(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise fail(None, "--device cuda: no CUDA device is available")
    model = load_model(args.model, args.weights)
    kwargs = parse_method_kw(args.method_kw)
    data = open_data(args.data, resize=parse_resize(args.resize), normalize=parse_normalize(args.normalize))
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # under torchrun: this rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model = model.to(device)
    explain, params = build_explainer(args.method, model, kwargs)
    config = {"model": args.model, "weights": str(Path(args.weights).resolve()) if args.weights else None,
              "method": args.method, "method_kw": storage.fingerprint(kwargs),
              "data": str(Path(args.data).resolve()), "resize": args.resize, "normalize": args.normalize}
    if hasattr(data, "classes"):
        config["classes"] = list(data.classes)
    summary = attribute_dataset(explain, params, data, args.out, batch_size=args.batch_size, target=args.target,
                                format=args.format, dtype=args.dtype, shard_size=args.shard_size,
                                resume=args.resume, progress=not args.quiet, compile=args.compile,
                                num_workers=args.workers, device=device, seed=args.seed, config=config)
    if not args.quiet:
        print(f"fxattr: {summary.computed} shards computed, {summary.skipped} already done, "
              f"{summary.examples} examples in {summary.out} ({summary.seconds:.1f} s)", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ view

@api_boundary("view")
def view(out, *, count: int = 32, columns: int = 8, reduce: str = "sum") -> Path:
    """Writes ``out/view/grid.png`` (the first ``count`` heatmaps, and the class means) and
    ``out/view/index.html`` (a table of every shown example with its heatmap)."""
    from PIL import Image

    run = load_attributions(out)
    view_dir = Path(out) / "view"
    (view_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    shown = min(count, len(run["attribution"]))
    attribution = run["attribution"][:shown].float()
    if attribution.ndim == 3:
        maps = fxattr.viz.heatmap(attribution, reduce=reduce, channel_axis=None)
    elif attribution.ndim == 4:
        maps = fxattr.viz.heatmap(attribution, reduce=reduce)
    else:
        raise fail(None, f"view draws image attributions (C, H, W) or maps (H, W); these are "
                          f"{tuple(attribution.shape[1:])}")
    rows = [list(maps[i:i + columns]) for i in range(0, shown, columns)]
    row_labels = [f"#{int(run['index'][i])}-{int(run['index'][min(i + columns, shown) - 1])}"
                  for i in range(0, shown, columns)]
    fxattr.viz.plot_grid(rows, row_labels=row_labels, file=view_dir / "grid.png",
                         title=f"{run['manifest']['config']['explainer']['name']}: first {shown} examples")
    means = run["class_mean"].float()
    mean_maps = fxattr.viz.heatmap(means, reduce=reduce, channel_axis=None if means.ndim == 3 else -3)
    for i in range(shown):
        Image.fromarray((maps[i].numpy() * 255).round().astype("uint8")).save(view_dir / "heatmaps" / f"{i:06d}.png")
    for j, c in enumerate(run["classes"].tolist()):
        Image.fromarray((mean_maps[j].numpy() * 255).round().astype("uint8")).save(
            view_dir / "heatmaps" / f"class-{c}.png")
    has_label = "label" in run
    head = "<tr><th>index</th><th>target</th><th>prediction</th>" + ("<th>label</th>" if has_label else "") \
        + "<th>attribution</th></tr>"
    body = "\n".join(
        f"<tr><td>{int(run['index'][i])}</td><td>{int(run['target'][i])}</td><td>{int(run['prediction'][i])}</td>"
        + (f"<td>{int(run['label'][i])}</td>" if has_label else "")
        + f"<td><img src='heatmaps/{i:06d}.png' width=96></td></tr>" for i in range(shown))
    classes = "\n".join(
        f"<tr><td>{c}</td><td>{n}</td><td><img src='heatmaps/class-{c}.png' width=96></td></tr>"
        for c, n in zip(run["classes"].tolist(), run["class_count"].tolist()))
    config = html.escape(repr(run["manifest"]["config"]))
    (view_dir / "index.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>fxattr run</title>\n"
        f"<h1>fxattr run: {html.escape(str(out))}</h1><p><img src='grid.png'></p>\n"
        f"<h2>Examples</h2><table>{head}\n{body}</table>\n"
        f"<h2>Class means</h2><table><tr><th>class</th><th>count</th><th>mean</th></tr>\n{classes}</table>\n"
        f"<h2>Configuration</h2><pre>{config}</pre>\n")
    return view_dir


def view_command(args) -> int:
    if args.count < 1 or args.columns < 1:
        raise fail("view", f"--count and --columns must be >= 1, got {args.count} and {args.columns}")
    directory = view(args.out, count=args.count, columns=args.columns, reduce=args.reduce)
    print(f"fxattr: wrote {directory / 'grid.png'} and {directory / 'index.html'}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ main

def die(message: str):
    print(f"fxattr: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: the same one-line form, exit status 2
        self.print_usage(sys.stderr)
        die(message)


def parser() -> argparse.ArgumentParser:
    top = Parser(prog="fxattr", description="Functional attribution for PyTorch, over whole datasets.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=Parser)
    explain = commands.add_parser("explain", help="explain every example of a dataset, resumably",
                                  description="Explain every example of a dataset; under torchrun, every "
                                              "rank takes its part.")
    explain.add_argument("--model", required=True, help="MODULE:FACTORY (or file.py:FACTORY), or torchvision:NAME")
    explain.add_argument("--weights", help="a state_dict (torch.save, read with weights_only=True; or .safetensors)")
    explain.add_argument("--method", required=True, help="an analyzer name (fxattr.list_analyzers()) or fxattr.NAME")
    explain.add_argument("--method-kw", action="append", metavar="KEY=VALUE", help="a keyword of the method (repeatable)")
    explain.add_argument("--data", required=True, help="an ImageFolder directory, or an .npy / .npz array")
    explain.add_argument("--out", required=True, help="the run directory")
    explain.add_argument("--batch-size", type=int, default=32)
    explain.add_argument("--shard-size", type=int, default=None, help="examples per shard file (default: one batch)")
    explain.add_argument("--resume", action="store_true", help="continue the run in --out")
    explain.add_argument("--format", choices=storage.FORMATS, default="safetensors")
    explain.add_argument("--dtype", choices=tuple(storage.DTYPES), default="float32")
    explain.add_argument("--target", choices=("predicted", "label"), default="predicted")
    explain.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cuda under torchrun: cuda:LOCAL_RANK)")
    explain.add_argument("--resize", help="SIZE or HEIGHT,WIDTH (ImageFolder images)")
    explain.add_argument("--normalize", help="MEAN,STD, per-channel means then stds, or 'imagenet'")
    explain.add_argument("--workers", type=int, default=2, help="DataLoader decode processes (default 2)")
    explain.add_argument("--compile", action="store_true", help="torch.compile the batched explainer once")
    explain.add_argument("--seed", type=int, default=0, help="noise seed of random explainers")
    explain.add_argument("--quiet", action="store_true", help="no progress bar")
    explain.set_defaults(run=explain_command)
    show = commands.add_parser("view", help="a grid PNG and an HTML index of a run's heatmaps")
    show.add_argument("out", help="the run directory")
    show.add_argument("--count", type=int, default=32, help="examples to show (default 32)")
    show.add_argument("--columns", type=int, default=8)
    show.add_argument("--reduce", choices=("sum", "absmax"), default="sum")
    show.set_defaults(run=view_command)
    return top


def main(argv=None) -> int:
    """``fxattr explain ...`` / ``fxattr view DIR``; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except FxattrError as error:
        # DataLoader workers re-raise with a traceback around the message: keep fxattr's line.
        lines = [line.removeprefix("fxattr.errors.FxattrError: ") for line in str(error).splitlines()
                 if line.startswith("fxattr.")]
        die(lines[-1] if lines else str(error))
