"""Concept relevance propagation (Achtibat et al. 2023): conditional LRP heatmaps for the channel
concepts of a layer, and the reference-sample statistics (RelMax / ActMax) that illustrate them.

A CRP heatmap of concept ``c`` of layer ``L`` is the LRP reverse pass with the relevance at ``L``
masked to ``c``'s channels. The reverse walk of the LRP engine (:class:`fxattr.propagation._engine.Plan`)
is split at ``L``: the forward pass and the walk from the output down to ``L`` run once; the walk
from ``L`` to the input, a function of the masked relevance alone (every rule's denominators come
from the forward pass), runs under ``torch.vmap`` over the concepts' masks, so all concepts of a
request are ONE vmapped call. Relevance that bypasses ``L`` (a skip connection around it) is left
out, as zennit-crp's ``CondAttribution`` does by default (``exclude_parallel=True``); with
``exclude_parallel=False`` it is propagated once, with the relevance at ``L`` left out, and added to
every concept's heatmap (the reverse walk is linear in its seeds, so that is zennit-crp's one masked
backward pass per concept). ``canonizers=`` rewrite the model first, as for :func:`fxattr.lrp`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from fxattr._explainer import (
    check_bool,
    check_choice,
    check_int,
    check_model,
    explainer,
)
from fxattr.errors import FxattrError, fail
from fxattr.graph import Program, find_layer
from fxattr.propagation._canonize import canonize
from fxattr.propagation._engine import Plan
from fxattr.propagation._lrp import lrp
from fxattr.targets import select

__all__ = ["ConceptAttribution", "ReferenceSamples", "crp", "crp_reference_samples"]


class ConceptAttribution(NamedTuple):
    """What :func:`crp` returns for one example.

    Attributes:
        heatmap: ``(n_concepts, *x.shape)``, the input relevance of each concept.
        relevance: ``(n_concepts,)``, each concept's relevance at the layer (the layer's relevance
            summed over the concept's channels and all positions).
    """

    heatmap: Tensor
    relevance: Tensor


class ReferenceSamples(NamedTuple):
    """What :func:`crp_reference_samples` returns.

    Attributes:
        values: ``(channels, k)``, each channel's top-k statistics, largest first.
        indices: ``(channels, k)``, the positions of those examples in the dataset (int64).
    """

    values: Tensor
    indices: Tensor


def _composite(where: str, f, rule, composite, options, canonizers=None):
    """The composite ``fxattr.lrp`` would use for these options (its checks, this explainer's name)."""
    try:
        return lrp(f, rule=rule, composite=composite, canonizers=canonizers, **options).composite
    except FxattrError as error:
        raise fail(where, str(error).removeprefix("fxattr.").removeprefix("lrp: ")) from error


def _plan(where: str, f, chosen) -> Plan:
    try:
        return Plan(f, where, chosen)
    except FxattrError as error:
        message = str(error)
        if message.startswith(f"fxattr.{where}:"):
            raise
        raise fail(where, message.removeprefix("fxattr.")) from error


def _concept_list(where: str, concepts) -> list[tuple[int, ...]] | None:
    """``concepts`` as a list of channel tuples (``None``: one concept per channel)."""
    if concepts is None:
        return None
    if isinstance(concepts, Tensor):
        if concepts.dtype.is_floating_point or concepts.dtype == torch.bool or concepts.ndim > 2:
            raise fail(where, f"concepts as a tensor must hold integer channel indices (1-d: one channel "
                              f"per concept; 2-d: channel sets), got dtype {concepts.dtype}, "
                              f"{concepts.ndim} dims")
        concepts = concepts.tolist()
    if isinstance(concepts, bool) or not isinstance(concepts, (int, Sequence)) or isinstance(concepts, str):
        raise fail(where, f"concepts must be channel indices: an int, a sequence of ints (one concept "
                          f"each) or of int sequences (channel sets), or None; got {concepts!r}")
    if isinstance(concepts, int):
        concepts = [concepts]
    if len(concepts) == 0:
        raise fail(where, "concepts is empty; give at least one channel index (or None for every channel)")
    result = []
    for i, concept in enumerate(concepts):
        channels = (concept,) if isinstance(concept, int) and not isinstance(concept, bool) else concept
        if isinstance(channels, Tensor):
            channels = channels.tolist()
        if (not isinstance(channels, Sequence) or isinstance(channels, str) or len(channels) == 0
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in channels)):
            raise fail(where, f"concepts[{i}] must be a channel index >= 0 or a non-empty sequence of "
                              f"them, got {concept!r}")
        result.append(tuple(channels))
    return result


class _Split:
    """The LRP plan of ``f`` with its reverse walk split at ``layer``."""

    def __init__(self, where: str, f, layer, chosen):
        self.where = where
        self.f = f
        # activations alone need no rules: the bare program (any op the capture knows runs forward)
        self.plan = _plan(where, f, chosen) if chosen is not None else Program(f, where)
        node = find_layer(where, self.plan.gm, layer)
        if node not in self.plan.path:
            raise fail(where, f"layer {layer!r} (graph node {node.name!r}) carries no data the output "
                              "depends on; no relevance reaches it")
        self.layer = layer
        self.slot = self.plan.slot_of[node]

    def activation(self, params, x) -> Tensor:
        """The layer's value at ``x`` (batch axis of 1 included)."""
        values, _, _ = self.f.guarded(x, lambda: self.plan.forward(params, x), self.where)
        return self._checked(values[self.slot])

    def _checked(self, value):
        if not isinstance(value, Tensor) or value.ndim < 2:
            what = f"shape {tuple(value.shape[1:])}" if isinstance(value, Tensor) else type(value).__name__
            raise fail(self.where, f"layer {self.layer!r} has no channels: its value for one example has "
                                   f"{what} (channels are its first axis)")
        return value

    def upper(self, params, x, target, parallel: bool = False):
        """The forward pass and the relevance at the layer: ``(values, cache, relevance)``; with
        ``parallel=True`` also the input relevance of the paths around the layer (the walk on with
        the layer's relevance left out): ``(values, cache, relevance, around)``."""
        plan = self.plan
        values, cache, raw = self.f.guarded(x, lambda: plan.forward(params, x), self.where)
        self._checked(values[self.slot])
        y = plan.output_of(raw)[0]
        grad = torch.func.grad(lambda t: select(self.where, t, target))(y)
        seeds = plan.seed(values, y * grad)  # LRP's seed: the selected output's value
        rules = plan.rule_override(values, cache, params)
        held: dict = {}

        def stop_at_layer(step, rel):
            if step.slot == self.slot:
                held["relevance"] = rel
                return []
            if step.slot < self.slot:  # relevance on paths around the layer: not the layer's
                return []
            return rules(step, rel)

        plan.reverse(params, values, cache, seeds, stop_at_layer)
        relevance = held.get("relevance")
        if relevance is None:  # the target does not depend on the layer
            relevance = torch.zeros_like(values[self.slot])
        if not parallel:
            return values, cache, relevance

        def around_layer(step, rel):
            return [] if step.slot == self.slot else rules(step, rel)

        around = plan.to_input(x, values, plan.reverse(params, values, cache, seeds, around_layer))
        return values, cache, relevance, around

    def lower(self, params, x, values, cache, relevance) -> Tensor:
        """The input relevance for ``relevance`` at the layer (a linear map of it)."""
        plan = self.plan
        rules = plan.rule_override(values, cache, params)
        return plan.to_input(x, values, plan.reverse(params, values, cache, {self.slot: relevance}, rules))


def _masks(where: str, layer, concepts, channels: int, like: Tensor) -> Tensor:
    """``(n_concepts, channels)`` 0/1 masks."""
    if concepts is None:
        return torch.eye(channels, dtype=like.dtype, device=like.device)
    for i, chosen in enumerate(concepts):
        if max(chosen) >= channels:
            raise fail(where, f"concepts[{i}] = {list(chosen) if len(chosen) > 1 else chosen[0]} is out "
                              f"of range for layer {layer!r} with {channels} channels")
    masks = torch.zeros(len(concepts), channels, dtype=like.dtype, device=like.device)
    for i, chosen in enumerate(concepts):
        masks[i, list(chosen)] = 1
    return masks


def crp(f, *, layer, concepts=None, rule=None, composite=None, chunk_size: int | None = None,
        exclude_parallel: bool = True, canonizers=None, **options):
    """Concept relevance propagation (Achtibat et al. 2023): one conditional LRP heatmap per
    channel concept of ``layer``, with each concept's relevance.

    ``explain(params, x, target)`` runs the model once, propagates the LRP relevance of the
    selected output (seeded with its value) down to ``layer``, and from there, for every concept
    at once (``torch.vmap`` over the concepts' channel masks), propagates the relevance of the
    concept's channels alone to the input. Relevance reaching the input around ``layer`` (a skip
    connection bypassing it) is not part of any concept's heatmap (zennit-crp's
    ``exclude_parallel=True``); with ``exclude_parallel=False`` it is, the same for every concept
    (propagated once). The result equals zennit-crp's ``CondAttribution`` with the matching zennit
    composite (e.g. ``composite="epsilon_plus_flat"`` and ``EpsilonPlusFlat``) and the same
    ``exclude_parallel``.

    Args:
        f: the function of ``fxattr.functionalize``.
        layer: a module's qualified name (``"features.8"``, ``"layer3"``) or a graph node name;
            channels are the first axis of its value for one example.
        concepts: the concepts: ``None`` (one per channel), a channel index, a sequence of channel
            indices (one concept each) or of sequences of them (a concept of several channels).
        rule, composite, **options: the LRP rules, as for :func:`fxattr.lrp`.
        chunk_size: concepts per vmapped chunk (``None``: all at once).
        exclude_parallel: leave out the relevance of paths around ``layer`` (zennit-crp's
            default); ``False``: add it to every concept's heatmap. The concepts' relevance at the
            layer is the same either way.
        canonizers: a list of :class:`fxattr.lrp.Canonizer`, applied before the rules as in
            :func:`fxattr.lrp` (zennit-crp: the composite's canonizers). ``layer`` names a node of
            the canonized graph (a rewrite keeps the names of the nodes it does not replace).

    Returns:
        ``explain(params, x, target) -> ConceptAttribution(heatmap, relevance)``: ``heatmap`` of
        shape ``(n_concepts, *x.shape)``, ``relevance`` of shape ``(n_concepts,)``.

    Example:
        >>> f, params = fxattr.functionalize(torchvision.models.vgg11().eval())
        >>> explain = fxattr.crp(f, composite="epsilon_plus_flat", layer="features.8",
        ...                      concepts=range(64))
        >>> heatmaps, relevance = torch.vmap(explain, in_dims=(None, 0, 0))(params, images, labels)
        >>> heatmaps.shape, relevance.shape  # (B, 64, 3, H, W), (B, 64)
    """
    where = "crp"
    check_model(where, f)
    check_int(where, "chunk_size", chunk_size, allow_none=True)
    check_bool(where, "exclude_parallel", exclude_parallel)
    chosen_concepts = _concept_list(where, concepts)
    chosen = _composite(where, f, rule, composite, options, canonizers)
    canonical, to_canonical = canonize(where, f, canonizers)
    split = _Split(where, canonical, layer, chosen)

    def explain(params, x, target=None):
        params = to_canonical(params)
        if exclude_parallel:
            values, cache, relevance = split.upper(params, x, target)
        else:
            values, cache, relevance, around = split.upper(params, x, target, parallel=True)
        masks = _masks(where, layer, chosen_concepts, relevance.shape[1], relevance)
        shape = (1, masks.shape[1]) + (1,) * (relevance.ndim - 2)

        def one(mask):
            return split.lower(params, x, values, cache, relevance * mask.reshape(shape))

        heatmap = torch.vmap(one, chunk_size=chunk_size)(masks)
        if not exclude_parallel:
            heatmap = heatmap + around
        per_channel = relevance[0].reshape(relevance.shape[1], -1).sum(1)
        return ConceptAttribution(heatmap, masks @ per_channel)

    config = {"layer": layer, "concepts": concepts, "rule": rule, "composite": composite,
              "chunk_size": chunk_size, **options}
    if not exclude_parallel:
        config["exclude_parallel"] = False
    if canonizers:
        config["canonizers"] = tuple(c.name for c in canonizers)
    return explainer(where, f, config, explain, empty="run")


_MODES = ("relevance", "activation")
_STATISTICS = ("sum", "max", "mean")


def crp_reference_samples(f, *, layer, mode: str = "relevance", statistic: str = "sum", k: int = 8,
                          abs_norm: bool = False, rule=None, composite=None, chunk_size: int | None = None,
                          canonizers=None, **options):
    """Reference samples of CRP (RelMax / ActMax): per channel of ``layer``, the ``k`` examples of
    a dataset where the channel is most relevant (``mode="relevance"``) or most active
    (``mode="activation"``).

    An example's score for a channel is its relevance (the LRP relevance of the selected output,
    propagated to ``layer``) or its activation, reduced over the channel's positions by
    ``statistic``: ``"sum"`` (zennit-crp's default), ``"max"`` or ``"mean"``; with
    ``abs_norm=True`` the scores of one example are divided by the sum of their absolute values
    (zennit-crp's ``abs_norm``). The scores of a batch are computed in one vmapped call; a running
    top-k is kept across batches. An activation is the layer's own output: for a convolution
    followed by a batch norm, the convolution's output before the batch norm (zennit-crp on a
    model whose canonizer merged the batch norm into the convolution records it after); its
    relevance is the same either way.

    Args:
        f: the function of ``fxattr.functionalize``.
        layer: a module's qualified name or a graph node name.
        mode: ``"relevance"`` (RelMax) or ``"activation"`` (ActMax).
        statistic: ``"sum"``, ``"max"`` or ``"mean"`` over the channel's positions.
        k: how many examples per channel (fewer if the dataset is smaller).
        abs_norm: normalise each example's scores by the sum of their absolute values.
        rule, composite, **options: the LRP rules (``mode="relevance"``), as for :func:`fxattr.lrp`.
        chunk_size: examples per vmapped chunk within a batch (``None``: the whole batch).
        canonizers: a list of :class:`fxattr.lrp.Canonizer`, as for :func:`crp`.

    Returns:
        ``collect(params, batches) -> ReferenceSamples(values, indices)``, ``batches`` an iterable
        of ``(x, targets)`` batches (``mode="activation"``: also plain ``x`` batches); indices
        count examples across batches from 0. ``collect.scores(params, x, target)`` is the
        per-example score vector (``(channels,)``), to map with ``torch.vmap`` yourself.

    Example:
        >>> collect = fxattr.crp_reference_samples(f, layer="features.8", composite="epsilon_plus_flat", k=16)
        >>> top = collect(params, ((x, y) for x, y in loader))
        >>> top.indices[5]  # the 16 examples where channel 5 of features.8 is most relevant
    """
    where = "crp_reference_samples"
    check_model(where, f)
    check_choice(where, "mode", mode, _MODES)
    check_choice(where, "statistic", statistic, _STATISTICS)
    check_int(where, "k", k)
    check_bool(where, "abs_norm", abs_norm)
    check_int(where, "chunk_size", chunk_size, allow_none=True)
    if mode == "activation" and (rule is not None or composite is not None or options):
        raise fail(where, "mode='activation' takes no LRP rules (rule=, composite= or their options)")
    chosen = None if mode == "activation" else _composite(where, f, rule, composite, options, canonizers)
    canonical, to_canonical = canonize(where, f, canonizers)
    split = _Split(where, canonical, layer, chosen)

    def reduce(value):
        flat = value[0].reshape(value.shape[1], -1)
        if statistic == "sum":
            score = flat.sum(1)
        elif statistic == "max":
            score = flat.amax(1)
        else:
            score = flat.mean(1)
        if abs_norm:
            score = score / (score.abs().sum() + 1e-10)
        return score

    def scores(params, x, target=None):
        params = to_canonical(params)
        if mode == "activation":
            return reduce(split.activation(params, x))
        return reduce(split.upper(params, x, target)[2])

    batched_scores = torch.vmap(scores, in_dims=(None, 0, 0), chunk_size=chunk_size)
    activation_scores = torch.vmap(lambda p, x: scores(p, x), in_dims=(None, 0), chunk_size=chunk_size)

    def check_batch(x, target) -> None:
        # before any vmap: a NaN would rank as the largest score, and a length mismatch or an
        # empty batch would fail inside vmap with torch's words
        if not isinstance(x, Tensor) or x.ndim < 1:
            raise fail(where, f"each batch's x must be a tensor with a batch axis, got {type(x).__name__}"
                              f"{'' if not isinstance(x, Tensor) else ' of shape ' + str(tuple(x.shape))}")
        if x.dtype.is_floating_point and x.numel() and not bool(torch.isfinite(x).all()):
            raise fail(where, f"a batch's x holds {int((~torch.isfinite(x)).sum())} NaN or Inf values; "
                              "reference samples of a non-finite input would be meaningless")
        if target is not None:
            target = torch.as_tensor(target)
            if target.ndim != 1 or len(target) != len(x):
                raise fail(where, f"each batch's targets must be one per example: x has {len(x)} examples, "
                                  f"the targets have shape {tuple(target.shape)}")

    def collect(params, batches: Iterable) -> ReferenceSamples:
        best_values = best_indices = None
        seen = 0
        for batch in batches:
            if isinstance(batch, (tuple, list)) and len(batch) == 2:
                x, target = batch
                check_batch(x, target if mode == "relevance" else None)
                if not len(x):
                    found = None
                elif mode == "activation":
                    found = activation_scores(params, x)
                else:
                    found = batched_scores(params, x, torch.as_tensor(target))
            elif mode == "activation" and isinstance(batch, Tensor):
                x = batch
                check_batch(x, None)
                found = activation_scores(params, x) if len(x) else None
            else:
                raise fail(where, "each batch must be a pair (x, targets)"
                                  f"{' or a tensor x' if mode == 'activation' else ''}; got "
                                  f"{type(batch).__name__}")
            if found is None:  # an empty batch adds no example
                continue
            found = found.detach().T  # (channels, batch)
            indices = torch.arange(seen, seen + found.shape[1], device=found.device).expand_as(found)
            seen += found.shape[1]
            if best_values is not None:
                found = torch.cat([best_values, found], 1)
                indices = torch.cat([best_indices, indices], 1)
            order = found.topk(min(k, found.shape[1]), dim=1).indices
            best_values, best_indices = found.gather(1, order), indices.gather(1, order)
        if best_values is None:
            raise fail(where, "batches was empty (no batch, or only batches of no example); give at least one "
                              "non-empty batch")
        return ReferenceSamples(best_values, best_indices)

    collect.scores = scores
    collect.__name__ = where
    collect.config = {"layer": layer, "mode": mode, "statistic": statistic, "k": k, "abs_norm": abs_norm,
                      "rule": rule, "composite": composite, "chunk_size": chunk_size, **options}
    return collect
