"""The iNNvestigate-style front door: ``create_analyzer(name, model).analyze(x)``.

An analyzer is a thin object over a pure explainer: it functionalizes the model, builds the
explainer that ``name`` stands for (iNNvestigate's keywords and defaults keep their meaning), and
``analyze`` maps it over a batch with ``torch.vmap`` in chunks of ``batch_size``.
``analyzer.explainer`` is that explainer, for ``torch.vmap`` / ``torch.func.grad`` /
``torch.compile`` of your own.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

import fxattr
from fxattr.errors import api_boundary, fail
from fxattr.functional import CAPTURE_LOCK

__all__ = ["Analyzer", "create_analyzer", "list_analyzers"]

NEURON_SELECTION_MODES = ("max_activation", "index", "all")


class Entry(NamedTuple):
    """How an analyzer name becomes an explainer."""
    requires: str                       # the fxattr function it needs (absent: not listed yet)
    build: Callable[..., Any]           # build(f, **kwargs) -> explain
    random: bool = False                # draws noise: vmapped with randomness="different"
    fits: bool = False                  # has a fit(data) step (pattern analyzers)


def _rename(kwargs: dict, names: dict) -> dict:
    return {names.get(k, k): v for k, v in kwargs.items()}


def _integrated_gradients(f, *, steps=64, reference_inputs=0.0, method="riemann_left", **kwargs):
    # iNNvestigate: alpha = k/steps, k = 0..steps-1, reference 0, 64 steps.
    return fxattr.integrated_gradients(f, steps=steps, baseline=reference_inputs, method=method, **kwargs)


def _noise(kind):
    def build(f, *, augment_by_n=64, noise_scale=1.0, relative=False, postprocess=None, **kwargs):
        # iNNvestigate's noise_scale is an absolute standard deviation (2.x ignores it; fxattr does not).
        return fxattr.noise_tunnel(fxattr.gradient(f, postprocess=postprocess), kind=kind,
                                   samples=augment_by_n, sigma=noise_scale, relative=relative, **kwargs)
    return build


def _lrp_rule(rule):
    return lambda f, **kwargs: fxattr.lrp(f, rule=rule, **kwargs)


def _lrp_composite(composite):
    return lambda f, **kwargs: fxattr.lrp(f, composite=composite, **kwargs)


_ENTRIES: dict[str, Entry] = {
    "input": Entry("input", lambda f: fxattr.input(f)),
    "random": Entry("random", lambda f, stddev=1.0: fxattr.random(f, stddev=stddev), random=True),
    "gradient": Entry("gradient", lambda f, postprocess=None: fxattr.gradient(f, postprocess=postprocess)),
    # iNNvestigate's BaselineGradient is the same gradient through Keras' own backward.
    "gradient.baseline": Entry("gradient", lambda f, postprocess=None: fxattr.gradient(f, postprocess=postprocess)),
    "input_t_gradient": Entry("input_x_gradient", lambda f: fxattr.input_x_gradient(f)),
    "integrated_gradients": Entry("integrated_gradients", _integrated_gradients),
    "smoothgrad": Entry("noise_tunnel", _noise("smoothgrad"), random=True),
    "smoothgrad_sq": Entry("noise_tunnel", _noise("smoothgrad_sq"), random=True),
    "vargrad": Entry("noise_tunnel", _noise("vargrad"), random=True),
    "deconvnet": Entry("deconvnet", lambda f: fxattr.deconvnet(f)),
    "guided_backprop": Entry("guided_backprop", lambda f: fxattr.guided_backprop(f)),
    "lrp": Entry("lrp", lambda f, **kwargs: fxattr.lrp(f, **kwargs)),
    "deep_taylor": Entry("deep_taylor", lambda f: fxattr.deep_taylor(f)),
    "deep_taylor.bounded": Entry("deep_taylor_bounded",
                                 lambda f, low=-1.0, high=1.0: fxattr.deep_taylor_bounded(f, low=low, high=high)),
    "deep_lift.wrapper": Entry("deeplift", lambda f, **kwargs: fxattr.deeplift(f, **_rename(kwargs, {"reference_inputs": "baseline"}))),
    "deeplift": Entry("deeplift", lambda f, **kwargs: fxattr.deeplift(f, **kwargs)),
    "pattern.net": Entry("patternnet", lambda f, **kwargs: fxattr.patternnet(f, **kwargs), fits=True),
    "pattern.attribution": Entry("pattern_attribution",
                                 lambda f, **kwargs: fxattr.pattern_attribution(f, **kwargs), fits=True),
    "expected_gradients": Entry("expected_gradients", lambda f, **kwargs: fxattr.expected_gradients(f, **kwargs), random=True),
    "gradcam": Entry("gradcam", lambda f, **kwargs: fxattr.gradcam(f, **kwargs)),
    "gradcam_plus_plus": Entry("gradcam_plus_plus", lambda f, **kwargs: fxattr.gradcam_plus_plus(f, **kwargs)),
    "layercam": Entry("layercam", lambda f, **kwargs: fxattr.layercam(f, **kwargs)),
    "xgradcam": Entry("xgradcam", lambda f, **kwargs: fxattr.xgradcam(f, **kwargs)),
    "scorecam": Entry("scorecam", lambda f, **kwargs: fxattr.scorecam(f, **kwargs)),
    "occlusion": Entry("occlusion", lambda f, **kwargs: fxattr.occlusion(f, **kwargs)),
    "rise": Entry("rise", lambda f, **kwargs: fxattr.rise(f, **kwargs), random=True),
    "feature_ablation": Entry("feature_ablation", lambda f, **kwargs: fxattr.feature_ablation(f, **kwargs)),
}
for _rule in ("z", "z_IB", "epsilon", "epsilon_IB", "w_square", "flat", "alpha_beta", "alpha_2_beta_1",
              "alpha_2_beta_1_IB", "alpha_1_beta_0", "alpha_1_beta_0_IB", "z_plus", "z_plus_fast"):
    _ENTRIES[f"lrp.{_rule}"] = Entry("lrp", _lrp_rule(_rule))
for _composite in ("sequential_preset_a", "sequential_preset_b", "sequential_preset_a_flat",
                   "sequential_preset_b_flat", "sequential_preset_b_flat_until_idx",
                   "epsilon_plus", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1",
                   "epsilon_alpha2_beta1_flat"):
    _ENTRIES[f"lrp.{_composite}"] = Entry("lrp", _lrp_composite(_composite))


def list_analyzers() -> list[str]:
    """The analyzer names available in this installation, sorted."""
    return sorted(name for name, entry in _ENTRIES.items() if hasattr(fxattr, entry.requires))


def _close_matches(name: str) -> str:
    matches = difflib.get_close_matches(name, list(_ENTRIES), n=4, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, matches))}?" if matches else ""


class Analyzer:
    """``analyze(x, neuron_selection)`` over a batch; built by :func:`create_analyzer`.

    Attributes:
        name: the analyzer's name.
        f, params: the functionalized model (see :func:`fxattr.functionalize`).
        explainer: the pure explainer ``explain(params, x, target)`` behind the analyzer.
        neuron_selection_mode: ``"max_activation"``, ``"index"`` or ``"all"``.
    """

    def __init__(self, name: str, model: nn.Module, entry: Entry, neuron_selection_mode: str,
                 batch_size: int, progress: bool | None, kwargs: dict):
        self.name = name
        self.model = model
        self.neuron_selection_mode = neuron_selection_mode
        self.batch_size = batch_size
        self.progress = progress
        self._entry = entry
        self.f, self.params = fxattr.functionalize(model)
        try:
            with CAPTURE_LOCK:  # graph capture (torch.fx) is not thread-safe: one at a time
                self.explainer = entry.build(self.f, **kwargs)
        except TypeError as error:
            raise fail("create_analyzer", f"{name!r} does not take these keyword arguments: {error}") from error

    def __repr__(self) -> str:
        return f"Analyzer({self.name!r}, neuron_selection_mode={self.neuron_selection_mode!r})"

    @api_boundary("Analyzer.fit")
    def fit(self, data, batch_size: int = 32, **kwargs) -> Analyzer:
        """Fits the analyzer's statistics (pattern analyzers) from an iterable of batches, or from
        a tensor / array of examples (iNNvestigate's ``fit(X, batch_size=32)``), split into batches
        of ``batch_size`` (a tensor was iterated example by example: a raw shape error)."""
        if not self._entry.fits:
            raise fail("Analyzer.fit", f"{self.name!r} has nothing to fit")
        if isinstance(data, (Tensor, np.ndarray)):
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise fail("Analyzer.fit", f"batch_size must be an int >= 1, got {batch_size!r}")
            data = torch.as_tensor(data).split(batch_size)
        self.explainer = self.explainer.fit(self.params, data, **kwargs)
        return self

    def _targets(self, neuron_selection, batch: int) -> Any:
        mode = self.neuron_selection_mode
        if mode != "index":
            if neuron_selection is not None:
                raise fail("Analyzer.analyze", f"neuron_selection is only taken in neuron_selection_mode "
                                               f"'index'; this analyzer's mode is {mode!r}")
            return None
        if neuron_selection is None:
            raise fail("Analyzer.analyze", "neuron_selection_mode 'index' needs neuron_selection: an int "
                                           "or one int per example")
        if isinstance(neuron_selection, (int, np.integer)) and not isinstance(neuron_selection, bool):
            if neuron_selection < 0:
                raise fail("Analyzer.analyze", f"neuron_selection must be an index >= 0, got {neuron_selection}")
            return torch.full((batch,), int(neuron_selection), dtype=torch.long)
        selection = torch.as_tensor(np.asarray(neuron_selection))
        if selection.dtype.is_floating_point or selection.dtype == torch.bool or selection.ndim != 1 \
                or len(selection) != batch:
            raise fail("Analyzer.analyze", f"neuron_selection must be an int or {batch} ints (one per "
                                           f"example), got {neuron_selection!r}")
        if len(selection) and int(selection.min()) < 0:
            raise fail("Analyzer.analyze", f"neuron_selection must hold indices >= 0, got "
                                           f"{int(selection.min())}")
        return selection.long()

    @api_boundary("Analyzer.analyze")
    def analyze(self, x, neuron_selection: int | Sequence[int] | None = None) -> Tensor:
        """The analysis of a batch ``x`` (tensor or numpy array): a tensor of x's shape on x's device."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, Tensor):
            raise fail("Analyzer.analyze", f"x must be a batch as a tensor or numpy array, got {type(x).__name__}")
        if x.ndim < 2:
            raise fail("Analyzer.analyze", f"x must be a batch (examples on the first axis), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            x = x.to(torch.get_default_dtype())
        targets = self._targets(neuron_selection, len(x))
        if targets is not None:
            targets = targets.to(x.device)
        explain = self.explainer
        randomness = "different" if self._entry.random else "error"
        if targets is None:
            target = None if self.neuron_selection_mode == "max_activation" else _sum_of_outputs
            batched = torch.vmap(lambda p, xi: explain(p, xi, target), in_dims=(None, 0), randomness=randomness)
        else:
            batched = torch.vmap(explain, in_dims=(None, 0, 0), randomness=randomness)
        starts = range(0, len(x), self.batch_size)
        show = self.progress if self.progress is not None else len(starts) > 4
        if show:
            starts = _progress(starts, self.name)
        if len(x) == 0:  # an empty batch gives an empty result of the explainer's shape
            starts = [0]
        pieces = []
        for start in starts:  # chunks bound memory; each chunk is one vmapped call
            chunk = x[start:start + self.batch_size]
            if targets is None:
                pieces.append(batched(self.params, chunk))
            else:
                pieces.append(batched(self.params, chunk, targets[start:start + self.batch_size]))
        return torch.cat(pieces).detach()


def _sum_of_outputs(output: Tensor) -> Tensor:
    """iNNvestigate's neuron_selection_mode 'all': explain the sum of all outputs."""
    return output.sum()


def _progress(iterable, name):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=f"fxattr {name}", unit="batch")


@api_boundary("create_analyzer")
def create_analyzer(name: str, model: nn.Module, neuron_selection_mode: str = "max_activation", *,
                    batch_size: int = 32, progress: bool | None = None, **kwargs) -> Analyzer:
    """An iNNvestigate-compatible analyzer: ``create_analyzer(name, model).analyze(x)``.

    Args:
        name: an iNNvestigate 2.x name (``"lrp.epsilon"``, ``"integrated_gradients"``, ...), a 1.x
            name (``"pattern.net"``, ``"lrp.z_IB"``, ``"deep_lift.wrapper"``) or one of fxattr's
            (``"smoothgrad_sq"``, ``"gradcam"``, ``"lrp.epsilon_plus"``, ...): see :func:`list_analyzers`.
        model: the module, in eval mode.
        neuron_selection_mode: ``"max_activation"`` (each example's argmax), ``"index"`` (given to
            ``analyze``) or ``"all"`` (the sum of all outputs, as iNNvestigate).
        batch_size: examples per vmapped call in ``analyze``.
        progress: show a progress bar (default: when there are more than 4 batches).
        **kwargs: the method's keywords, with iNNvestigate's names and defaults (``steps=64`` and
            ``reference_inputs`` for IG, ``augment_by_n`` and ``noise_scale`` for smoothgrad,
            ``epsilon``, ``alpha``/``beta``, ``input_layer_rule``, ``until_layer_idx``, ``low``/``high``).

    Example:
        >>> analyzer = fxattr.create_analyzer("lrp.epsilon", model, epsilon=0.1)
        >>> heatmaps = analyzer.analyze(images)
        >>> torch.vmap(analyzer.explainer, in_dims=(None, 0, 0))(analyzer.params, images, labels)
    """
    if not isinstance(name, str) or name not in _ENTRIES:
        raise fail("create_analyzer", f"no analyzer named {name!r}{_close_matches(str(name))} "
                                      "(fxattr.list_analyzers() lists them all)")
    entry = _ENTRIES[name]
    if not hasattr(fxattr, entry.requires):
        raise fail("create_analyzer", f"{name!r} needs fxattr.{entry.requires}, which this version does not have")
    if neuron_selection_mode not in NEURON_SELECTION_MODES:
        raise fail("create_analyzer", f"neuron_selection_mode must be one of {NEURON_SELECTION_MODES}, "
                                      f"got {neuron_selection_mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise fail("create_analyzer", f"batch_size must be an int >= 1, got {batch_size!r}")
    return Analyzer(name, model, entry, neuron_selection_mode, batch_size, progress, kwargs)
