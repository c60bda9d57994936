"""What the perturbation explainers share: feature groups over one tensor or several (tuple / dict
inputs), per-example feature masks, baselines for floating, integer and boolean inputs, the
ablation itself, and chunked evaluation with an optional progress report.

Feature groups. ``feature_mask`` given at construction holds any integer ids (mapped to
``0..G-1`` once with ``torch.unique``, which cannot run under ``torch.vmap``); for several inputs
it is a pytree of masks matching x; with ``cross_tensor=True`` (the explainers' default, as captum
0.9's ``FeatureAblation``) one id is one group across all inputs, with ``False`` each input's ids
are its own groups (captum <= 0.7). A mask passed at call time
(``explain(..., feature_mask=m)``) may differ per example under ``torch.vmap``; its ids must be
``0..G-1`` with ``G`` given as ``num_features`` (or read from the mask's values, eagerly and
under ``torch.vmap``; ``torch.compile`` needs ``num_features``).
"""

from __future__ import annotations

import sys
from numbers import Real

import optree
import torch
from torch import Tensor

from fxattr._explainer import tree_map
from fxattr.errors import check_finite, fail
from fxattr.targets import readable

__all__ = ["FeatureGroups", "ablate", "check_perturbation_baseline", "check_perturbation_x",
           "check_progress", "leaf_baselines", "map_chunks"]


def _leaves(x):
    return optree.tree_flatten(x, namespace="torch")


def _is_id_mask(mask) -> bool:
    return (isinstance(mask, Tensor) and not mask.dtype.is_floating_point and not mask.dtype.is_complex
            and mask.dtype != torch.bool)


def broadcastable(shape, to) -> bool:
    if len(shape) > len(to):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(to)))


def check_perturbation_x(where: str, x) -> None:
    """x: a tensor or a pytree of tensors, floating-point, integer or boolean (perturbation methods
    only replace values; an integer input such as token ids takes an integer baseline)."""
    leaves, _ = _leaves(x)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise fail(where, f"x must be a tensor or a tuple / dict of tensors (one example), got {type(x).__name__}")
    for t in leaves:
        if t.dtype.is_complex:
            raise fail(where, f"x must be a floating-point, integer or boolean tensor, got dtype {t.dtype}")


def check_perturbation_baseline(where: str, baseline) -> None:
    """A number (``bool`` for boolean inputs), a tensor broadcastable to x, or a pytree of those
    matching a pytree x; finite."""
    leaves = optree.tree_leaves(baseline, namespace="torch")
    if not leaves or not all(isinstance(b, (Real, Tensor)) for b in leaves):
        raise fail(where, "baseline must be a number, a tensor broadcastable to x's shape, or a pytree of "
                          f"those matching x; got {type(baseline).__name__}")
    for b in leaves:
        if isinstance(b, bool):
            continue
        if isinstance(b, Real):
            check_finite(where, "baseline", b)
        elif b.dtype.is_complex:
            raise fail(where, f"baseline must be a real or boolean tensor, got dtype {b.dtype}")
        elif b.dtype.is_floating_point and b.numel():
            plain = readable(b)
            if plain is not None and not bool(torch.isfinite(plain).all()):
                raise fail(where, "baseline holds NaN or Inf values")


def leaf_baselines(where: str, baseline, x) -> list:
    """One baseline tensor per leaf of x, in the leaf's dtype (a fractional baseline for an integer
    input, or a non-boolean one for a boolean input, is an error: it would be silently rounded)."""
    leaves, tree = _leaves(x)
    if isinstance(baseline, (Real, Tensor)):
        values = [baseline] * len(leaves)
    else:
        try:
            values = tree.flatten_up_to(baseline)
        except (ValueError, TypeError) as error:
            raise fail(where, f"baseline's structure does not match x's: {error}") from error
    out = []
    for b, t in zip(values, leaves):
        if not isinstance(b, (Real, Tensor)):
            raise fail(where, f"baseline must give numbers or tensors, got {type(b).__name__}")
        if isinstance(b, Real):
            if t.dtype == torch.bool and not isinstance(b, bool) and b not in (0, 1):
                raise fail(where, f"baseline {b!r} for a boolean input must be True / False (or 0 / 1)")
            if not t.dtype.is_floating_point and t.dtype != torch.bool and float(b) != int(b):
                raise fail(where, f"baseline {b!r} for an integer input must be an integer")
            out.append(torch.tensor(b, device=t.device).to(t.dtype))
            continue
        if not broadcastable(tuple(b.shape), tuple(t.shape)):
            raise fail(where, f"baseline of shape {tuple(b.shape)} does not broadcast to x's shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point and b.dtype.is_floating_point:
            raise fail(where, f"baseline has dtype {b.dtype} but x has dtype {t.dtype}: give an "
                              f"{'boolean' if t.dtype == torch.bool else 'integer'} baseline")
        out.append(b.to(dtype=t.dtype, device=t.device))
    return out


def ablate(x: Tensor, mask: Tensor, base: Tensor) -> Tensor:
    """x with the elements where ``mask`` is set replaced by ``base``. Floating x takes captum's
    form ``x (1 - m) + b m`` (the same numbers to the last bit, and differentiable in x and b);
    integer and boolean x take ``where`` (captum's form gives the same values there)."""
    if x.dtype.is_floating_point:
        m = mask.to(x.dtype)
        return x * (1 - m) + base * m
    return torch.where(mask.to(torch.bool), base, x)


class FeatureGroups:
    """``feature_mask`` of a perturbation explainer: construction-time ids, or per-call masks.

    Args:
        where: the explainer's name, for errors.
        feature_mask: ``None`` (every element its own feature), an integer tensor broadcastable to
            x, or a pytree of those matching a pytree x.
        cross_tensor: one id is one group across the inputs of a pytree x.
        num_features: the number of ids of masks given at call time (``None``: read from them).
    """

    def __init__(self, where: str, feature_mask, *, cross_tensor: bool = False, num_features=None):
        self.where = where
        self.cross_tensor = cross_tensor
        self.num_features = num_features
        if not isinstance(cross_tensor, bool):
            raise fail(where, f"cross_tensor must be True or False, got {cross_tensor!r}")
        if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                         or num_features < 1):
            raise fail(where, f"num_features must be an int >= 1 or None, got {num_features!r}")
        self.mask_shape = None
        self.fixed = None  # per leaf: ids 0..G-1 (global over leaves), and the total count
        if feature_mask is None:
            return
        masks, self.mask_tree = _leaves(feature_mask)
        if not masks or not all(_is_id_mask(m) for m in masks):
            raise fail(where, "feature_mask must be an integer tensor of feature ids broadcastable to x's "
                              "shape (or a tuple / dict of those for several inputs), got "
                              f"{getattr(feature_mask, 'dtype', type(feature_mask).__name__)}")
        if any(m.numel() == 0 for m in masks):
            raise fail(where, "feature_mask is empty")
        self.mask_shape = tuple(tuple(m.shape) for m in masks) if len(masks) > 1 or not isinstance(
            feature_mask, Tensor) else tuple(masks[0].shape)
        if cross_tensor:  # one numbering over all inputs
            ids, inverse = torch.unique(torch.cat([m.reshape(-1) for m in masks]), return_inverse=True)
            parts = torch.split(inverse, [m.numel() for m in masks])
            self.fixed = ([p.reshape(m.shape) for p, m in zip(parts, masks)], ids.numel())
        else:  # each input's own numbering, offset past the previous inputs'
            groups, offset = [], 0
            for m in masks:
                ids, inverse = torch.unique(m, return_inverse=True)
                groups.append(inverse + offset)
                offset += ids.numel()
            self.fixed = (groups, offset)

    @property
    def count(self):
        """The number of groups of a construction-time mask (``None`` without one)."""
        return None if self.fixed is None else self.fixed[1]

    def resolve(self, x, feature_mask=None) -> tuple[list, int]:
        """Per leaf of x, a tensor of group ids broadcastable to the leaf, and the number of groups."""
        where = self.where
        leaves, tree = _leaves(x)
        if feature_mask is not None:
            return self._per_call(leaves, tree, feature_mask)
        if self.fixed is None:
            groups, offset = [], 0
            for t in leaves:
                groups.append(torch.arange(t.numel(), device=t.device).reshape(t.shape) + offset)
                offset += t.numel()
            return groups, offset
        groups, count = self.fixed
        if len(groups) != len(leaves):
            raise fail(where, f"feature_mask holds {len(groups)} mask{'s' if len(groups) > 1 else ''} but x has "
                              f"{len(leaves)} input{'s' if len(leaves) > 1 else ''}; give one mask per input")
        for g, t in zip(groups, leaves):
            if not broadcastable(tuple(g.shape), tuple(t.shape)):
                raise fail(where, f"feature_mask of shape {tuple(g.shape)} does not broadcast to x's shape "
                                  f"{tuple(t.shape)}")
        return [g.to(t.device) for g, t in zip(groups, leaves)], count

    def _per_call(self, leaves, tree, feature_mask):
        where = self.where
        masks = [feature_mask] if isinstance(feature_mask, Tensor) else optree.tree_leaves(feature_mask,
                                                                                        namespace="torch")
        if not masks or not all(_is_id_mask(m) for m in masks):
            raise fail(where, "feature_mask must be an integer tensor of feature ids 0..G-1 (or a tuple / dict "
                              "of those for several inputs)")
        if len(masks) != len(leaves):
            raise fail(where, f"feature_mask holds {len(masks)} masks but x has {len(leaves)} inputs")
        sizes = []
        for m, t in zip(masks, leaves):
            if not broadcastable(tuple(m.shape), tuple(t.shape)):
                raise fail(where, f"feature_mask of shape {tuple(m.shape)} does not broadcast to x's shape "
                                  f"{tuple(t.shape)}")
            plain = readable(m)  # the whole batch's masks under vmap
            if plain is not None and plain.numel() and int(plain.min()) < 0:
                raise fail(where, "feature_mask given at call time must hold ids 0..G-1 (got a negative id)")
            if self.num_features is not None:
                if plain is not None and plain.numel() and int(plain.max()) >= self.num_features:
                    raise fail(where, f"feature_mask holds id {int(plain.max())} but num_features is "
                                      f"{self.num_features}")
                sizes.append(self.num_features)
            elif plain is None:
                raise fail(where, "a feature_mask given at call time under torch.compile needs num_features= "
                                  "(the number of ids) at construction: its values cannot be read there")
            else:
                sizes.append(int(plain.max()) + 1 if plain.numel() else 1)
        if self.cross_tensor:
            return [m.to(t.device) for m, t in zip(masks, leaves)], max(sizes)
        groups, offset = [], 0
        for m, t, size in zip(masks, leaves, sizes):
            groups.append(m.to(t.device) + offset)
            offset += size
        return groups, offset


# ------------------------------------------------------------------------------------ progress

def check_progress(where: str, show_progress):
    """``show_progress``: ``False``, ``True`` (a tqdm bar when tqdm is installed, else a line on
    stderr) or a callable ``(done, total)``; returns the reporter factory or ``None``."""
    if show_progress is False or show_progress is None:
        return None
    if show_progress is True:
        return lambda total: _default_reporter(where, total)
    if callable(show_progress):
        return lambda total: _CallbackReporter(show_progress)
    raise fail(where, f"show_progress must be True, False or a callable (done, total), got {show_progress!r:.60}")


class _CallbackReporter:
    def __init__(self, callback):
        self.callback = callback

    def __call__(self, done, total):
        self.callback(done, total)

    def close(self):
        pass


class _LineReporter:
    def __init__(self, where, total):
        self.where = where

    def __call__(self, done, total):
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{self.where}: {done}/{total} perturbations{end}")
        sys.stderr.flush()

    def close(self):
        pass


class _TqdmReporter:
    def __init__(self, bar):
        self.bar = bar
        self.done = 0

    def __call__(self, done, total):
        self.bar.update(done - self.done)
        self.done = done

    def close(self):
        self.bar.close()


def _default_reporter(where, total):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineReporter(where, total)
    return _TqdmReporter(tqdm(total=total, desc=where))


def map_chunks(fn, inputs: tuple, chunk_size, reporter=None):
    """``torch.vmap(fn, chunk_size=chunk_size)(*inputs)``; with a ``reporter`` (from
    :func:`check_progress`) the chunks are evaluated one ``torch.vmap`` call each and reported
    after each (the same numbers: each chunk is the same vmapped function). Under
    ``torch.compile`` nothing is reported (a callback would break the graph)."""
    if reporter is None or torch.compiler.is_compiling():
        return torch.vmap(fn, chunk_size=chunk_size)(*inputs)
    total = optree.tree_leaves(inputs, namespace="torch")[0].shape[0]
    size = total if chunk_size is None else chunk_size
    report = reporter(total)
    parts = []
    try:
        for start in range(0, total, size):
            chunk = tree_map(lambda t, start=start: t[start:start + size], inputs)
            parts.append(torch.vmap(fn)(*chunk))
            report(min(start + size, total), total)
    finally:
        report.close()
    if not parts:
        return torch.vmap(fn, chunk_size=chunk_size)(*inputs)
    return tree_map(lambda *ts: torch.cat(ts), *parts)

