"""Layer and neuron attributions (captum's ``Layer*`` and ``Neuron*`` families) on a model cut at
a layer by :func:`fxattr.graph.split`. See :mod:`fxattr.layers._layer` for the design."""

from fxattr.layers._layer import (
                                  internal_influence,
                                  layer_activation,
                                  layer_conductance,
                                  layer_deeplift,
                                  layer_deeplift_shap,
                                  layer_feature_ablation,
                                  layer_gradient_shap,
                                  layer_gradient_x_activation,
                                  layer_integrated_gradients,
                                  layer_lrp,
)
from fxattr.layers._neuron import flat_index, neuron, neuron_conductance

__all__ = ["flat_index", "internal_influence", "layer_activation", "layer_conductance", "layer_deeplift",
           "layer_deeplift_shap", "layer_feature_ablation", "layer_gradient_shap",
           "layer_gradient_x_activation", "layer_integrated_gradients", "layer_lrp", "neuron",
           "neuron_conductance"]
