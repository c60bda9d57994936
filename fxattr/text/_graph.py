"""Graph-based explainers (DeepLIFT, DeepLiftShap, LRP with AttnLRP / CP-LRP / epsilon, guided
backprop, ...) through the text front door.

These explainers do not take any function ``f(params, x)``: they capture the graph of the
*module* of :func:`fxattr.functionalize` (torch dynamo for Hugging Face models, which torch.fx
cannot trace) and walk it in reverse. The front door's function of embeddings and mask is not a
module, so for them it builds one per sequence length, :class:`EmbeddingsModule`: the model as a
module of ONE input, the embeddings ``(1, L, D)``, with the attention mask a *buffer* of the module.
Why a buffer:

- a buffer is read from ``params`` by its name at every call (the engine's ``get_attr`` steps), so
  each example of a vmapped batch brings its own mask (``params["attention_mask"]``) into the one
  captured graph;
- everything computed from it (the additive ``(1, 1, L, L)`` mask, the position ids) is a constant
  of the graph, not data: no relevance or multiplier flows into the mask (in AttnLRP it absorbs
  relevance like a bias, as in LXT), DeepLIFT's baseline has the same mask as ``x``, and the
  numbers equal those of ``fxattr.functionalize(model, input_shape=)`` on the unpadded sequence;
- dynamo captures one input tensor, and the mask never enters ``x``, so it is never interpolated,
  noised or attributed.

Inside, the user's modules are named with a ``model.`` prefix (``model.bert.encoder.layer.1``): a
composite choosing rules by qualified name sees the prefixed names.

Dynamo specialises the graph to the sequence length, so each length is captured once (a few
seconds on tiny models) and cached on the :class:`~fxattr.text.TextModel`, shared by every graph
explainer of that model. The first call at a new length may come from inside ``torch.vmap`` /
``torch.func.grad``: the capture then runs outside those transforms (on zeros, with the module's
own weights; nothing batched enters it). Under ``torch.compile`` a new length cannot be captured:
call the explainer once eagerly at that length first (a clear error says so).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from fxattr.errors import fail
from fxattr.functional import FunctionalModel, functionalize
from fxattr.graph import trace

__all__ = ["MASK_BUFFER", "MODEL_PREFIX", "EmbeddingsModule", "embeddings_model", "graph_params",
           "outside_transforms"]

MASK_BUFFER = "attention_mask"
MODEL_PREFIX = "model."


class EmbeddingsModule(nn.Module):
    """The token model of a :class:`~fxattr.text.TextModel` as a module of its embeddings only
    (``(1, L, D) -> output``), the attention mask of the sequence a buffer (see the module doc).

    Built by :func:`embeddings_model`; holds the user's module as ``model`` (read, never changed:
    its training flag is copied, not set).
    """

    def __init__(self, text_model, length: int):
        super().__init__()
        self.model = text_model.module
        self.text_model = text_model
        # the wrapper's own flag only (nn.Module.eval() would switch the user's modules too)
        self.training = text_model.module.training
        self.register_buffer(MASK_BUFFER, torch.ones(length, dtype=torch.long), persistent=False)

    def forward(self, inputs_embeds):  # no annotations: dynamo reads this signature when compiling
        tm = self.text_model
        mask = getattr(self, MASK_BUFFER)
        kwargs = {"inputs_embeds": inputs_embeds,
                  "attention_mask": tm.additive_mask(mask, inputs_embeds.dtype)}
        if tm.positions:
            kwargs["position_ids"] = (mask.long().cumsum(0) - 1).clamp(min=0)[None]
        return tm.output(self.model(**kwargs))


@contextlib.contextmanager
def outside_transforms():
    """Runs the block outside every active ``torch.vmap`` / ``torch.func.grad`` level (restored
    after): dynamo cannot capture a graph from inside them, and the capture reads no value of the
    transformed call."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
    with temporarily_clear_interpreter_stack():
        yield


def embeddings_model(where: str, f, embeddings: Tensor) -> FunctionalModel:
    """The :class:`~fxattr.functional.FunctionalModel` of ``f``'s :class:`EmbeddingsModule` for
    ``embeddings``' length (one example, ``(L, D)``), captured once per length, dtype and device
    and cached on ``f``."""
    length, width = embeddings.shape
    # plain keys: dynamo resolves a guard's source through them (a torch.dtype in a key fails)
    key = (length, width, str(embeddings.dtype), str(embeddings.device))
    cache = f.__dict__.setdefault("_graph_models", {})
    fm = cache.get(key)
    if fm is not None:
        return fm
    if torch.compiler.is_compiling():
        raise fail(where, f"the graph of {type(f.module).__name__} at sequence length {length} is not "
                          "captured yet, and it cannot be captured under torch.compile: call the "
                          "explainer once without torch.compile at this length first")
    with outside_transforms():
        fm, _ = functionalize(EmbeddingsModule(f, length), input_shape=(length, width))
        trace(fm)  # the dynamo capture (seconds), once per length; cached on fm
    cache[key] = fm
    return fm


def graph_params(params, mask: Tensor) -> dict:
    """``params`` of the text model under the :class:`EmbeddingsModule`'s names, with ``mask`` (the
    sequence's 0/1 attention mask) as its buffer (the same tensors: gradients reach ``params``)."""
    out = {MODEL_PREFIX + name: t for name, t in params.items()}
    out[MASK_BUFFER] = mask.long()
    return out

