"""Perturbation methods: occlusion (with exact incremental evaluation), feature ablation, RISE."""

from fxattr.perturbation._perturbation import feature_ablation, occlusion, rise, rise_masks

__all__ = ["feature_ablation", "occlusion", "rise", "rise_masks"]
