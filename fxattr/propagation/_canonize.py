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

from torch import Tensor

from fxattr.functional import batch_norm_affine  # noqa: F401 - re-exported for the engine


def fold(weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, bn_weight: Tensor | None,
         bn_bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """The kernel layer ``(weight, bias)`` followed by an eval batch norm on its output channels
    (axis 0 of ``weight``), as one layer ``(s * weight, (bias - mean) * s + beta)`` with
    ``s = gamma / sqrt(var + eps)`` (evaluated in the order zennit's MergeBatchNorm uses, so that
    float32 results agree to rounding)."""
    scale = 1 / (var + eps) ** 0.5 if bn_weight is None else bn_weight / (var + eps) ** 0.5
    folded_weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    centred = -mean if bias is None else bias - mean
    folded_bias = centred * scale if bn_bias is None else centred * scale + bn_bias
    return folded_weight, folded_bias
