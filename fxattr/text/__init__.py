"""Token attributions for transformers: a front door from token ids, language-model targets,
generation attribution, attention rollout and token heatmaps.

    f, params = fxattr.text.functionalize(model.eval())            # f(params, embeddings, mask)
    explain = fxattr.text.attribute(fxattr.integrated_gradients, f, baseline="pad")
    relevance = torch.vmap(explain, in_dims=(None, 0, 0, 0))(params, ids, mask, targets)   # (B, L)

Padded batches of mixed-length sequences go through ONE vmapped call: the attention mask is an
argument per example that is never differentiated (see :mod:`fxattr.text._functional`). Graph-based
explainers go through the same door (``fxattr.text.attribute(fxattr.lrp, f, composite="attnlrp")``,
``fxattr.deeplift``, ``fxattr.guided_backprop``, ...; see :mod:`fxattr.text._graph`).
"""

from fxattr.text._attention import (
                                  attention_maps,
                                  attention_relevance,
                                  attention_rollout,
)
from fxattr.text._functional import TextModel, attribute, functionalize, math_attention
from fxattr.text._generation import generation_attribution
from fxattr.text._targets import (
                                  ClassLogit,
                                  Continuation,
                                  Contrast,
                                  NextToken,
                                  class_logit,
                                  continuation,
                                  contrast,
                                  next_token,
)
from fxattr.text._viz import token_colors, token_heatmap_html, token_heatmap_png

__all__ = [
    "ClassLogit", "Continuation", "Contrast", "NextToken", "TextModel", "attention_maps",
    "attention_relevance", "attention_rollout", "attribute", "class_logit",
    "continuation", "contrast", "functionalize", "generation_attribution", "math_attention",
    "next_token", "token_colors", "token_heatmap_html", "token_heatmap_png",
]
