"""Canonization: folding eval-mode batch norm into the kernel layer before it, purely.

LRP rules are defined for linear layers ``z = W x + b``. An eval batch norm right after a
convolution or dense layer is an affine map per output channel, ``bn(z) = z * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``, so the pair is ONE linear layer with
``W' = s W`` (scaled per output channel) and ``b' = s b + t`` (zennit's MergeBatchNorm canonizer).
fxattr computes ``W'`` and ``b'`` as new tensors from ``params`` at explain time: the module is
never touched, and derivatives w.r.t. the batch-norm parameters flow through the fold.

A batch norm that does not directly follow a kernel layer whose output it alone reads (DenseNet's
``norm1`` after a concatenation) is left alone and treated as a linear layer of its own.
"""

from __future__ import annotations

from fxattr.functional import batch_norm_affine  # noqa: F401 - re-exported
from fxattr.graph._program import fold  # noqa: F401 - the one implementation, in the engine

