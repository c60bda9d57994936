"""Propagation methods: LRP (rules, composites, presets), DeepTaylor, guided backprop / deconvnet,
DeepLIFT / DeepLiftShap, PatternNet / PatternAttribution — reverse passes over the captured graph."""

from fxattr.propagation import composites, rules
from fxattr.propagation._canonize import Canonizer, merge_batch_norm, replace_modules
from fxattr.propagation._crp import ConceptAttribution, ReferenceSamples, crp, crp_reference_samples
from fxattr.propagation._deeplift import deeplift, deeplift_shap
from fxattr.propagation._lrp import (Composite, LayerInfo, beta_smooth, deconvnet, deep_taylor, deep_taylor_bounded,
                                     guided_backprop, lrp)
from fxattr.propagation._pattern import load_patterns, pattern_attribution, patternnet, save_patterns

__all__ = [
    "Canonizer", "Composite", "ConceptAttribution", "LayerInfo", "ReferenceSamples", "beta_smooth", "composites", "crp",
    "crp_reference_samples", "deconvnet", "deep_taylor", "deep_taylor_bounded",
    "deeplift", "deeplift_shap", "guided_backprop", "load_patterns", "lrp", "merge_batch_norm", "pattern_attribution",
    "patternnet", "replace_modules", "rules", "save_patterns",
]
