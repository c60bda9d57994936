"""The text front door: a Hugging Face (or any ``inputs_embeds``-taking) model as a pure function of
its parameters, the token embeddings and the attention mask of ONE sequence.

Why ``fxattr.text.functionalize(model)`` and not an ``embeddings=`` argument on every explainer:
attributing to tokens needs three things no image explainer knows about -- looking the embeddings
up from token ids inside the function (so that a loss of the explanation reaches the embedding
matrix too), an attention mask per example that is an argument of the explainer but never
differentiated or interpolated (an integer mask inside ``x`` breaks ``torch.func.grad``, a float
one would be moved along an IG path or get SmoothGrad noise), and targets that read the sequence
(next token after the last real token, a continuation's log-probability). One front door that
builds the mask and positions itself, plus :func:`attribute` that runs any of fxattr's unchanged
explainers on the embeddings with the mask closed over, gives all of them these properties at once,
instead of threading a mask through each explainer's signature. Graph-based explainers (DeepLIFT,
LRP / AttnLRP, guided backprop) capture a module rather than call a function: for them the front
door builds the model as a module of its embeddings with the mask a buffer (:mod:`fxattr.text._graph`).

The mask: transformers' own mask creation has data-dependent control flow (it skips the mask when
it is all ones), which ``torch.vmap`` cannot trace. :class:`TextModel` builds the 4-d additive float
mask ``(1, 1, L, L)`` itself (0 where a query may attend to a key, ``finfo.min`` elsewhere; causal
for decoders) and passes it as ``attention_mask``, which transformers hands to the attention
unchanged; positions are ``cumsum(mask) - 1``, so a left- or right-padded sequence gives the same
numbers as the sequence alone (up to floating-point rounding; BERT-style classifiers read the first
token, so pad them on the right).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fxattr.errors import FxattrError, fail
from fxattr.functional import call_privately
from fxattr.targets import readable
from fxattr.text._graph import embeddings_model, graph_params, outside_transforms
from fxattr.text._targets import predicted_next_token, resolve_target

__all__ = ["TextModel", "attribute", "baseline_value", "check_mask", "check_text_model", "functionalize",
           "math_attention", "to_tokens", "token_baselines"]

ATTENTION = ("math", "auto")
REDUCE = ("sum", "norm", None)


def math_attention(f):
    """``f`` with ``scaled_dot_product_attention`` restricted to its math kernel.

    The fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no derivative of its
    backward, so ``torch.func.grad`` of a loss of an explanation (a second derivative of the model)
    fails inside it; it also has no ``torch.vmap`` batching rule (vmap falls back to a slow loop).
    The math kernel is made of matmuls and a softmax: every derivative exists and vmap batches it.
    Use it on any ``f(params, x)``, e.g. a ViT from :func:`fxattr.functionalize`.

    Example:
        >>> f, params = fxattr.functionalize(vit.eval(), output=lambda out: out.logits)
        >>> f = fxattr.text.math_attention(f)
        >>> loss = lambda p: torch.vmap(fxattr.gradient(f), in_dims=(None, 0, 0))(p, x, y).square().sum()
        >>> torch.func.grad(loss)(params)
    """
    if not callable(f):
        raise fail("text.math_attention", f"f must be a callable f(params, x), got {type(f).__name__}")

    def f_math(params, *args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return f(params, *args, **kwargs)

    f_math.model = f
    return f_math


class TextModel:
    """A token model as a pure function of ONE sequence; built by :func:`functionalize`.

    ``f(params, embeddings, attention_mask=None)`` -> the model's output for the sequence
    (``(L, vocab)`` logits of a language model, ``(classes,)`` of a classifier);
    ``f.embed(params, input_ids)`` -> ``(L, D)`` token embeddings. Attributes: ``module``,
    ``embedding_name`` (the key of the embedding matrix in ``params``), ``pad_token_id``,
    ``causal``, ``attention``.
    """

    def __init__(self, module: nn.Module, embedding_name: str, *, output, causal: bool,
                 attention: str, pad_token_id: int | None, positions: bool):
        self.module = module
        self.embedding_name = embedding_name
        self.output = output
        self.causal = causal
        self.attention = attention
        self.pad_token_id = pad_token_id
        self.positions = positions

    def __repr__(self) -> str:
        return (f"TextModel({type(self.module).__name__}, causal={self.causal}, "
                f"attention={self.attention!r})")

    def embed(self, params, input_ids: Tensor) -> Tensor:
        """The embeddings of ``input_ids`` (one sequence, ``(L,)``) from ``params``."""
        if not isinstance(input_ids, Tensor) or input_ids.dtype.is_floating_point or input_ids.ndim != 1:
            what = (f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}" if isinstance(input_ids, Tensor)
                    else type(input_ids).__name__)
            raise fail("text", f"input_ids must be one sequence of token ids, an integer tensor of shape "
                               f"(length,), got {what}; map a batch with torch.vmap")
        if input_ids.shape[0] == 0:
            raise fail("text", "input_ids is an empty sequence (length 0): there is no token to explain")
        vocab = params[self.embedding_name].shape[0]
        # F.embedding raises a raw IndexError (or reads out of bounds on some devices) for an id
        # outside the table; the ids are read under vmap too (all examples at once, one host read)
        plain = readable(input_ids)
        if plain is not None and plain.numel():
            low, high = int(plain.min()), int(plain.max())
            if low < 0 or high >= vocab:
                raise fail("text", f"input_ids holds token id {low if low < 0 else high}, outside the "
                                   f"vocabulary of {vocab} (ids are 0..{vocab - 1})")
        return F.embedding(input_ids, params[self.embedding_name])

    def additive_mask(self, mask: Tensor, dtype: torch.dtype) -> Tensor:
        """The ``(1, 1, L, L)`` additive mask: 0 where query i may attend to key j, else finfo.min
        (a query that may attend to no key, a left pad of a causal model, attends to itself)."""
        length = mask.shape[0]
        keep = mask.bool()[None, :].expand(length, length)
        if self.causal:
            keep = keep & torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        # A query that may attend to no key (a left pad of a causal model) attends to itself: a
        # row of finfo.min only is NaN after a softmax in float32 (Llama's, on a float64 model:
        # finfo(float64).min is -inf in float32), and the NaN reached the real tokens through the
        # values. No real token attends to a pad, so nothing real changes.
        alone = torch.eye(length, dtype=torch.bool, device=mask.device) & ~keep.any(-1, keepdim=True)
        keep = keep | alone
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
        return torch.where(keep, torch.zeros((), dtype=dtype, device=mask.device), blocked)[None, None]

    def __call__(self, params, embeddings: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        if not isinstance(embeddings, Tensor) or embeddings.ndim != 2:
            what = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
            raise fail("text", f"embeddings must be one sequence of shape (length, hidden), got {what}; "
                               "map a batch with torch.vmap")
        length = embeddings.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(length, dtype=torch.long, device=embeddings.device)
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (length,):
            what = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise fail("text", f"attention_mask must have shape ({length},) like the sequence, got {what}")
        kwargs = {"inputs_embeds": embeddings[None],
                  "attention_mask": self.additive_mask(attention_mask, embeddings.dtype)}
        if self.positions:
            kwargs["position_ids"] = (attention_mask.long().cumsum(0) - 1).clamp(min=0)[None]
        context = sdpa_kernel(SDPBackend.MATH) if self.attention == "math" else contextlib.nullcontext()
        with context:
            out = call_privately(self.module, params, (), kwargs, cache=self.__dict__.setdefault("_view_cache", {}))
        out = self.output(out)
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != 1:
            raise fail("text", "output must choose one tensor with the batch axis of 1 from the model's "
                               f"output, got {type(out).__name__}")
        return out[0]


def _default_output(out):
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None:
        raise fail("text.functionalize", f"the model returned a {type(out).__name__} without .logits; pass "
                                         "output=callable choosing one tensor")
    return logits


def functionalize(model: nn.Module, *, output: Callable[[Any], Tensor] | None = None,
                  causal: bool | None = None, attention: str = "math") -> tuple[TextModel, dict[str, Tensor]]:
    """A token model as ``f(params, embeddings, attention_mask)`` of ONE sequence, and its params.

    The model must take ``inputs_embeds`` and ``attention_mask`` (every Hugging Face text model
    does) and have ``get_input_embeddings()`` (an ``nn.Embedding``); ``position_ids`` is passed when
    the model takes it. See the module docstring for why this is a front door of its own.

    Args:
        model: the module, in eval mode (fxattr never switches it or touches its state).
        output: chooses one tensor (with batch axis) from the model's output; default ``out.logits``.
        causal: whether tokens attend only to earlier tokens; default: detected from the attention
            modules' ``is_causal`` flags (GPT-2, Llama: True; BERT: False).
        attention: ``"math"`` (default) evaluates ``scaled_dot_product_attention`` with its math
            kernel, so that explanations can be differentiated again (explanation losses) and vmap
            batches the attention; ``"auto"`` lets torch pick a fused kernel (first-order only on
            CPU: the fused kernel's backward has no derivative). Eager attention is unaffected.

    Returns:
        ``(f, params)``: a :class:`TextModel` and the module's parameters (detached, sharing storage)
        and floating-point buffers (copied), so ``torch.func.grad`` over all of ``params`` works.

    Example:
        >>> f, params = fxattr.text.functionalize(model.eval())
        >>> explain = fxattr.text.attribute(fxattr.integrated_gradients, f, baseline="pad")
        >>> relevance = torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, labels)  # (B, L)
    """
    where = "text.functionalize"
    if not isinstance(model, nn.Module):
        raise fail(where, f"model must be a torch.nn.Module, got {type(model).__name__}")
    if attention not in ATTENTION:
        raise fail(where, f"attention must be one of {ATTENTION}, got {attention!r}")
    if causal is not None and not isinstance(causal, bool):
        raise fail(where, f"causal must be None or a bool, got {causal!r}")
    if output is not None and not callable(output):
        raise fail(where, f"output must be a callable choosing one tensor, got {output!r}")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise fail(where, "the model needs get_input_embeddings() returning an nn.Embedding (Hugging Face "
                          f"text models have it); {type(model).__name__} gives {type(embedding).__name__}")
    names = [n for n, p in model.named_parameters() if p is embedding.weight]
    if not names:
        raise fail(where, "the input embedding's weight is not among the model's parameters")
    signature = inspect.signature(model.forward).parameters
    for needed in ("inputs_embeds", "attention_mask"):
        if needed not in signature:
            raise fail(where, f"{type(model).__name__}.forward takes no {needed!r} argument")
    if causal is None:
        flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
        causal = any(flags)
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    f = TextModel(model, names[0], output=output or _default_output, causal=causal, attention=attention,
                  pad_token_id=pad if isinstance(pad, int) else None,
                  positions="position_ids" in signature)
    params = {name: t.detach() for name, t in model.named_parameters()}
    # Integer buffers (BERT's position_ids and token_type_ids tables) stay with the module, which
    # functional_call falls back to: they are index tables, and torch.func.grad over params needs
    # floating-point tensors only.
    params.update({name: t.detach().clone() for name, t in model.named_buffers() if t.is_floating_point()})
    return f, params


def reading_params(fn):
    """Marks a baseline function ``(params, e) -> baseline`` that reads ``params`` (a token's
    embedding): its explainer cannot be built once and reused."""
    fn.reads_params = True
    return fn


def baseline_value(where: str, f: TextModel, baseline):
    """``baseline`` for IG-type methods on embeddings, as a function of (params, embeddings)."""
    if isinstance(baseline, bool):
        raise fail(where, f"baseline must be 'zeros', 'pad', a token id (int) or a tensor of embeddings, got {baseline!r}")
    if (isinstance(baseline, str) and baseline == "zeros") or (isinstance(baseline, float) and baseline == 0.0):
        return lambda params, e: torch.zeros_like(e)
    if (isinstance(baseline, str) and baseline == "pad") or isinstance(baseline, int):
        token = f.pad_token_id if baseline == "pad" else baseline
        if token is None:
            raise fail(where, "baseline='pad' needs model.config.pad_token_id; pass the token id as an int "
                              "(e.g. tokenizer.pad_token_id or tokenizer.mask_token_id)")
        vocab = f.module.get_input_embeddings().num_embeddings
        if not 0 <= token < vocab:
            raise fail(where, f"baseline token id {token} is out of range for a vocabulary of {vocab}")
        return reading_params(lambda params, e: params[f.embedding_name][token].to(e.dtype).expand_as(e))
    if isinstance(baseline, Tensor):
        return lambda params, e: baseline.to(e.dtype).expand_as(e)
    raise fail(where, f"baseline must be 'zeros', 'pad', a token id (int) or a tensor of embeddings, "
                      f"got {baseline!r}")


def attribute(method, f: TextModel, *, reduce: str | None = "sum", **config):
    """Runs the fxattr explainer ``method(f, **config)`` on token embeddings, from token ids.

    ``explain(params, input_ids, attention_mask=None, target=None, **kwargs)`` looks the
    embeddings up, explains ``target`` (an int / 0-d tensor / callable as everywhere in fxattr, or a
    text target: :func:`fxattr.text.next_token`, :func:`~fxattr.text.continuation`,
    :func:`~fxattr.text.contrast`, :func:`~fxattr.text.class_logit`; ``None``: the predicted class,
    or for a language model the predicted next token's log-probability) with the mask closed over,
    and returns token relevance ``(L,)`` (zero at padding). Map a padded batch of mixed-length
    sequences with ``torch.vmap(explain, in_dims=(None, 0, 0, 0))``; ``kwargs`` go to the inner
    explainer (e.g. ``noise=`` of a noise tunnel).

    Args:
        method: an fxattr explainer factory ``method(f, **config)``: gradient-based ones
            (``fxattr.gradient``, ``fxattr.input_x_gradient``, ``fxattr.integrated_gradients``,
            ``fxattr.smoothgrad``, ``fxattr.text.attention_rollout``, ...) run on the front door's
            function; graph-based ones (``fxattr.deeplift``, ``fxattr.deeplift_shap``,
            ``fxattr.lrp`` with ``composite="attnlrp"`` / ``"cp_lrp"`` or a rule,
            ``fxattr.guided_backprop``, ...) on the model captured as a module of its embeddings,
            once per sequence length (see :mod:`fxattr.text._graph`; the first call at a new
            length takes seconds, and must not be inside ``torch.compile``).
        f: the :class:`TextModel` of :func:`functionalize`.
        reduce: how an ``(L, D)`` attribution becomes token relevance: ``"sum"`` over the embedding
            dimension (default; completeness is kept), ``"norm"`` (L2 norm, for saliency) or
            ``None`` (keep ``(L, D)``). Methods that already give ``(L,)`` are returned as they are.
            CAMs and layer methods are refused (on a padded sequence they would not give the
            sequence's own explanation).
        **config: the method's configuration. ``baseline`` (IG, DeepLIFT) may be ``"zeros"`` (or
            ``0.0``), ``"pad"`` (the pad token's embedding at every position), an int token id
            (e.g. the mask token's: ``tokenizer.mask_token_id``) or a tensor of embeddings;
            ``baselines`` (DeepLiftShap) token ids (a list of ints or a 1-d integer tensor), a
            tensor ``(K, L, D)`` of embeddings or a callable ``embeddings -> (K, L, D)``.
            With ``return_convergence_delta=True`` the result is ``(relevance, delta)``.

    Example:
        >>> f, params = fxattr.text.functionalize(model.eval())
        >>> explain = fxattr.text.attribute(fxattr.integrated_gradients, f, steps=16, baseline="pad")
        >>> torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, fxattr.text.class_logit(y))
        >>> attnlrp = fxattr.text.attribute(fxattr.lrp, f, composite="attnlrp")
        >>> torch.vmap(attnlrp, in_dims=(None, 0, 0, 0))(params, ids, mask, fxattr.text.class_logit(y))
    """
    where = "text.attribute"
    if not isinstance(f, TextModel):
        raise fail(where, f"f must be the TextModel of fxattr.text.functionalize, got {type(f).__name__}")
    if not callable(method):
        raise fail(where, f"method must be an fxattr explainer factory such as fxattr.gradient, got {method!r}")
    family = getattr(method, "__module__", "") or ""
    if family.startswith(("fxattr.cams", "fxattr.layers")):
        # Measured on tiny BERT: a padded sequence does not get its explanation alone (Grad-CAM
        # pools the gradient over all positions, padding included: 4/6 of its weights for 4 real
        # tokens in 6; layer DeepLIFT differs by up to 1/3 too). Refused rather than silently off.
        raise fail(where, f"{getattr(method, '__name__', method)} (a CAM or layer method) cannot run through "
                          "the text front door: on a padded sequence it would not give the sequence's own "
                          "explanation. Run it on one unpadded sequence's embeddings with "
                          "fxattr.functionalize(model, input_shape=...)")
    if reduce not in REDUCE:
        raise fail(where, f"reduce must be one of {REDUCE}, got {reduce!r}")
    baseline = baseline_value(where, f, config["baseline"]) if "baseline" in config else None
    baselines = token_baselines(where, f, config["baselines"]) if "baselines" in config else None
    # Build once at construction with stand-in baselines, so a bad configuration fails here.
    probe = dict(config)
    if baseline is not None:
        probe["baseline"] = 0.0
    if baselines is not None:
        probe["baselines"] = torch.zeros(1, 1, 1)
    graph = False
    try:
        method(lambda params, e: f(params, e), **probe)
    except TypeError as error:
        raise fail(where, f"{getattr(method, '__name__', method)} does not take this configuration: {error}") from error
    except FxattrError as error:
        # graph-based methods refuse a plain function: they need the module of fxattr.functionalize
        if "FunctionalModel" not in str(error) and "function of fxattr.functionalize" not in str(error):
            raise
        # Graph-based methods (LRP, DeepLIFT, ...) capture a module: they run on the model as a
        # module of its embeddings, one per sequence length (fxattr.text._graph).
        graph = True

    # a pad / token baseline is read from the params of each call: such a graph explainer is built
    # per call (eager only: building classifies the captured graph, which dynamo cannot trace);
    # any other is built once per sequence length and reused (also under torch.compile)
    reads_params = any(getattr(b, "reads_params", False) for b in (baseline, baselines))
    built: dict = {}

    def graph_explainer(params, embeddings):
        model = embeddings_model(where, f, embeddings)
        key = (embeddings.shape[0], embeddings.shape[1], str(embeddings.dtype), str(embeddings.device))
        inner_config = dict(config)
        if baseline is not None:
            inner_config["baseline"] = lambda e: baseline(params, e)
        if baselines is not None:
            inner_config["baselines"] = lambda e: baselines(params, e)
        if not reads_params and key in built:
            return built[key]
        if torch.compiler.is_compiling():
            raise fail(where, "under torch.compile a graph-based explainer must be built before: call it "
                              "once without torch.compile at this sequence length"
                              + (", and give the baseline as a tensor of embeddings (a pad / token baseline "
                                 "is read from params at every call)" if reads_params else ""))
        with outside_transforms():  # building reads no value: it classifies the captured graph
            inner = method(model, **inner_config)
        if not reads_params:
            built[key] = inner
        return inner

    def inner_explainer(params, embeddings, mask):
        if graph:
            return graph_params(params, mask), graph_explainer(params, embeddings)
        inner_config = dict(config)
        if baseline is not None:
            inner_config["baseline"] = lambda e: baseline(params, e)
        if baselines is not None:
            inner_config["baselines"] = lambda e: baselines(params, e)
        return params, method(lambda p, e: f(p, e, mask), **inner_config)

    def explain(params, input_ids, attention_mask=None, target=None, **kwargs):
        embeddings = f.embed(params, input_ids)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        check_mask(where, mask, input_ids)
        inner_params, inner = inner_explainer(params, embeddings, mask)
        if target is None:
            # Resolved once at the input, so IG paths and noisy copies all explain the same token.
            with torch.no_grad():
                output = f(params, embeddings, mask)
            if output.ndim == 2:
                target = predicted_next_token(output, mask)
        resolved = resolve_target(where, target, input_ids, mask)
        context = sdpa_kernel(SDPBackend.MATH) if graph and f.attention == "math" else contextlib.nullcontext()
        with context:
            result = inner(inner_params, embeddings, resolved, **kwargs)
        if isinstance(result, tuple):  # (attributions, convergence delta)
            return (to_tokens(result[0], embeddings, mask, reduce), *result[1:])
        return to_tokens(result, embeddings, mask, reduce)

    explain.__name__ = explain.__qualname__ = f"text.{getattr(method, '__name__', 'attribute')}"
    explain.model = f
    explain.config = dict(config, reduce=reduce)
    return explain


def check_mask(where: str, mask, input_ids: Tensor) -> None:
    """Raises a clear error unless ``mask`` is a 0/1 attention mask (bool or integer) shaped like
    ``input_ids``; its values are read under vmap too. A float mask (0.5) would silently act as a
    soft mask in some places (positions, token relevance) and as a hard one in others."""
    if not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
        what = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise fail(where, f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {what}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise fail(where, f"attention_mask must be a 0/1 integer or bool tensor, got dtype {mask.dtype}")
    plain = readable(mask)
    if plain is not None and plain.numel() and mask.dtype != torch.bool:
        low, high = int(plain.min()), int(plain.max())
        if low < 0 or high > 1:
            raise fail(where, f"attention_mask must hold only 0 and 1, got {low if low < 0 else high}")


def to_tokens(relevance: Tensor, embeddings: Tensor, mask: Tensor, reduce: str | None) -> Tensor:
    """Relevance with the tokens first (``(L,)``, ``(L, D)``, or a layer's ``(L, H)``) as token
    relevance: everything after the token axis reduced by ``reduce`` (``None``: kept), zero at padding."""
    length = embeddings.shape[0]
    if relevance.ndim == 0 or relevance.shape[0] != length:
        raise fail("text.attribute", f"the explainer returned shape {tuple(relevance.shape)}; token relevance "
                                     f"needs the {length} tokens first")
    if relevance.ndim >= 2 and reduce is not None:
        flat = relevance.flatten(1)
        relevance = flat.sum(-1) if reduce == "sum" else flat.norm(dim=-1)
    return relevance * mask.to(relevance.dtype).reshape(length, *([1] * (relevance.ndim - 1)))


def token_baselines(where: str, f: TextModel, baselines):
    """``baselines`` of DeepLiftShap on embeddings, as a function of (params, embeddings) giving
    ``(K, L, D)``: token ids (a list of ints or a 1-d integer tensor: each token's embedding at
    every position), a float tensor ``(K, L, D)`` of embeddings, or a callable ``e -> (K, L, D)``."""
    if callable(baselines) and not isinstance(baselines, Tensor):
        return lambda params, e: baselines(e)
    if isinstance(baselines, (list, tuple)) and baselines and all(
            isinstance(t, int) and not isinstance(t, bool) for t in baselines):
        baselines = torch.tensor(baselines)
    if isinstance(baselines, Tensor) and baselines.ndim == 1 and not baselines.dtype.is_floating_point \
            and baselines.dtype != torch.bool and len(baselines) >= 1:
        vocab = f.module.get_input_embeddings().num_embeddings
        if not ((baselines >= 0) & (baselines < vocab)).all():
            raise fail(where, f"baseline token ids {baselines.tolist()} are not all in range for a vocabulary of {vocab}")
        tokens = baselines.long()
        return reading_params(lambda params, e: params[f.embedding_name][tokens.to(e.device)].to(e.dtype)[
            :, None, :].expand(len(tokens), *e.shape))
    if isinstance(baselines, Tensor) and baselines.ndim == 3 and baselines.dtype.is_floating_point:
        return lambda params, e: baselines.to(e.dtype)
    raise fail(where, "baselines must be token ids (a list of ints or a 1-d integer tensor), a float tensor "
                      "(K, length, hidden) of embeddings or a callable embeddings -> (K, length, hidden); got "
                      f"{type(baselines).__name__}")


def check_text_model(where: str, f) -> None:
    if not isinstance(f, TextModel):
        raise fail(where, f"f must be the TextModel of fxattr.text.functionalize, got {type(f).__name__}")

