"""Evaluation metrics for attributions: the Quantus catalogue as pure, vmappable transforms.

Every metric is ``metric = fxattr.metrics.NAME(f, **config)`` called per example
``metric(params, x, target, attribution)`` and batched with
``torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")``.
"""

from fxattr.metrics.faithfulness import *  # noqa: F401,F403
from fxattr.metrics.faithfulness import __all__ as _faithfulness
from fxattr.metrics.others import *  # noqa: F401,F403
from fxattr.metrics.others import __all__ as _others

__all__ = [*_faithfulness, *_others]
