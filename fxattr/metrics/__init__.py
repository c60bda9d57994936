"""Evaluation metrics for attributions: the Quantus 0.6.0 catalogue as pure, vmappable transforms.

Every metric is ``metric = fxattr.metrics.NAME(f, **config)``, called per example
``metric(params, x, target, attribution)`` and batched with
``torch.vmap(metric, in_dims=(None, 0, 0, 0), randomness="different")``.
"""

from fxattr.metrics.axiomatic import *  # noqa: F401,F403
from fxattr.metrics.axiomatic import __all__ as _axiomatic
from fxattr.metrics.complexity import *  # noqa: F401,F403
from fxattr.metrics.complexity import __all__ as _complexity
from fxattr.metrics.evaluate import MetricTable, evaluate
from fxattr.metrics.faithfulness import *  # noqa: F401,F403
from fxattr.metrics.faithfulness import __all__ as _faithfulness
from fxattr.metrics.localisation import *  # noqa: F401,F403
from fxattr.metrics.localisation import __all__ as _localisation
from fxattr.metrics.randomisation import *  # noqa: F401,F403
from fxattr.metrics.randomisation import __all__ as _randomisation
from fxattr.metrics.robustness import *  # noqa: F401,F403
from fxattr.metrics.robustness import __all__ as _robustness

__all__ = [*_faithfulness, *_robustness, *_localisation, *_complexity, *_randomisation, *_axiomatic,
           "MetricTable", "evaluate"]
