"""Perturbation methods: occlusion (with exact incremental evaluation), feature ablation, RISE, and
the Shapley family (Shapley value sampling, exact Shapley values, KernelSHAP, LIME)."""

from fxattr.perturbation._perturbation import feature_ablation, occlusion, rise, rise_masks
from fxattr.perturbation._shapley import kernel_shap, lime, shapley_value_sampling, shapley_values

__all__ = ["feature_ablation", "kernel_shap", "lime", "occlusion", "rise", "rise_masks",
           "shapley_value_sampling", "shapley_values"]
