"""The captured graph of a functional model and the one engine that runs it: capture (tracing),
the catalogue of operation kinds, the program (forward interpreter and reverse walk), and cutting
a model at a layer."""

from fxattr.graph import _ops as ops  # the catalogue of operation kinds, public as fxattr.graph.ops
from fxattr.graph._capture import (batched_args, find_layer, input_names, origin, run, split, trace,
                                   unbatch_output)
from fxattr.graph._ops import Layer, OpKind, register, registered_kinds, unregister
from fxattr.graph._program import NodeView, Program

__all__ = ["Layer", "NodeView", "OpKind", "Program", "batched_args", "find_layer", "input_names", "ops",
           "origin", "register", "registered_kinds", "run", "split", "trace", "unbatch_output", "unregister"]
