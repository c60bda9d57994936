"""The captured graph of a functional model: capture (tracing) and cutting it at a layer."""

from fxattr.graph._capture import batched_args, find_layer, run, split, trace, unbatch_output

__all__ = ["batched_args", "find_layer", "run", "split", "trace", "unbatch_output"]
