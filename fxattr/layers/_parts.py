"""Layers that return a tuple of tensors, or read several (captum's ``Layer*`` methods on such a
layer attribute to each tensor and return a tuple).

A module traced through whose ``forward`` returns ``(a_1, ..., a_k)`` has no single graph node:
its value is the ``k`` nodes it returns (:func:`tuple_parts`); a module called with several
tensors, with ``attribute_to_layer_input=True``, reads ``k`` nodes (:func:`input_parts`).
:class:`PartsCut` cuts the traced graph at all ``k`` at once: ``body(params, x) -> (a_1, ...,
a_k)`` (one graph returning every part) and ``head(params, x, (a_1, ..., a_k)) -> output`` (one
graph with a placeholder per part, run as a functional model of ``(a_1, ..., a_k, x)``).

Which graph node is which element of the returned tuple is read from a trace of the module alone
(``torch.fx`` records calls in execution order, so the module's own graph and its nodes inside the
model's graph correspond one to one); when they do not, it is an error naming the nodes, never a
guess.
"""

from __future__ import annotations

from torch import Tensor, fx

from fxattr import graph
from fxattr.errors import fail
from fxattr.layers._cut import CutModel

__all__ = ["PartsCut", "TupleBody", "input_parts", "tuple_parts"]

_COMPUTE = ("call_module", "call_function", "call_method")


def _inside(node: fx.Node, layer: str) -> bool:
    name = graph.origin(node)
    return name is not None and (name == layer or name.startswith(layer + "."))


def tuple_parts(where: str, f, layer) -> list[str] | None:
    """The graph node names of the tensors a module traced through returns as a tuple, in the
    tuple's order; ``None`` when ``layer`` is not such a module (one node names its value)."""
    if not isinstance(layer, str):
        return None
    gm = graph.trace(f)
    if gm.meta.get("capture") not in (None, "fx"):
        return None
    calls = gm.meta.get("module_outputs", {}).get(layer)
    if not calls or len(calls) != 1 or calls[0] is not None:
        return None
    root = getattr(f, "module", None)
    try:
        module = root.get_submodule(layer)
    except AttributeError:
        return None
    inner = fx.symbolic_trace(module)
    output = next(n for n in inner.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, (tuple, list)) or not all(isinstance(o, fx.Node) for o in output):
        raise fail(where, f"layer {layer!r} returns a {type(output).__name__} that is not a flat tuple of "
                          "tensors; name the graph node of one of its parts instead")
    mine = [n for n in inner.graph.nodes if n.op in _COMPUTE]
    theirs = [n for n in gm.graph.nodes if n.op in _COMPUTE and _inside(n, layer)]

    def same(a: fx.Node, b: fx.Node) -> bool:
        if a.op != b.op:
            return False
        if a.op == "call_module":
            return b.target == f"{layer}.{a.target}"
        return a.target == b.target

    if len(mine) != len(theirs) or not all(same(a, b) for a, b in zip(mine, theirs)):
        raise fail(where, f"layer {layer!r} returns a tuple whose parts could not be matched to the "
                          f"model's graph; name its parts' graph nodes as a list instead "
                          f"({', '.join(n.name for n in theirs if any(u not in theirs for u in n.users))})")
    position = {a: b for a, b in zip(mine, theirs)}
    parts = []
    for o in output:
        if o not in position:  # an input returned as it is: no node of the module
            raise fail(where, f"layer {layer!r} returns one of its inputs unchanged; name the graph nodes "
                              "of its parts instead")
        parts.append(position[o].name)
    return parts


def _live_users(node: fx.Node) -> list[fx.Node]:
    """``node``'s users whose values reach the output (a call whose result is dropped is not)."""
    return [u for u in node.users if u.users or u.op == "output"]


def input_parts(where: str, f, layer) -> list[str] | None:
    """The graph node names of the tensors a layer reads when it reads several (a module called
    with two tensors), in the order of its ``forward``'s parameters; ``None`` when it reads one
    (or is no single module call). Each must be read by the layer alone, so that replacing it
    changes the layer's input and nothing else (captum replaces the module's inputs)."""
    if not isinstance(layer, str):
        return None
    gm = graph.trace(f)
    if gm.meta.get("capture") not in (None, "fx"):
        return None
    calls = gm.meta.get("module_outputs", {}).get(layer)
    if not calls or len(calls) != 1:
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    if calls[0] is not None:
        node = nodes[calls[0]]
        if node.op != "call_module" or node.target != layer:
            return None
        reads = [a for a in node.args if isinstance(a, fx.Node)]
        inside = {node}
    else:
        module = f.module.get_submodule(layer)
        inner = fx.symbolic_trace(module)
        mine = [n for n in inner.graph.nodes if n.op in _COMPUTE]
        theirs = [n for n in gm.graph.nodes if n.op in _COMPUTE and _inside(n, layer)]
        if len(mine) != len(theirs):
            return None
        position = dict(zip(mine, theirs))
        reads = []
        for p in (n for n in inner.graph.nodes if n.op == "placeholder"):
            user = next((u for u in p.users if u in position), None)
            if user is None:
                continue  # an argument the module does not use (or passes through)
            slot = user.args.index(p) if p in user.args else None
            if slot is None:
                return None
            reads.append(position[user].args[slot])
        inside = set(theirs)
    if len(reads) < 2:
        return None
    for read in reads:
        if read.op == "placeholder":
            raise fail(where, f"attribute_to_layer_input=True: layer {layer!r} reads the model's input "
                              f"{read.name!r} among its {len(reads)} inputs; attribute to the input itself")
        outside = [u.name for u in _live_users(read) if u not in inside]
        if outside:
            raise fail(where, f"attribute_to_layer_input=True: the input {read.name!r} of layer {layer!r} is "
                              f"also read outside the layer (by {', '.join(outside)}), so it cannot be "
                              "replaced for the layer alone")
    return [r.name for r in reads]


class TupleBody(CutModel):
    """A cut graph returning several tensors: ``(params, x) -> tuple`` of one example each."""

    def _unbatch(self, out):
        return tuple(part[0] for part in out)


class PartsCut:
    """``f`` cut at the ``k`` nodes ``parts`` (the tensors a layer returns as a tuple).

    Attributes:
        layer: the layer as the user named it.
        parts: the node names, in the tuple's order.
        body: ``body(params, x) -> tuple`` of the parts' values.
        head: ``head(params, x, parts) -> output`` with the parts' values replaced.
    """

    def __init__(self, where: str, f, layer: str, parts: list[str]):
        self.f, self.layer, self.where, self.parts = f, layer, where, tuple(parts)
        gm = graph.trace(f)
        nodes = {n.name: n for n in gm.graph.nodes}
        # the body: one graph returning every part (one forward pass up to the layer)
        body_graph = fx.Graph()
        env: dict = {}
        body_graph.graph_copy(gm.graph, env)
        body_graph.output(tuple(env[nodes[name]] for name in parts))
        fx.GraphModule(gm, body_graph, "PartsBody")  # dead-code elimination needs an owning module
        body_graph.eliminate_dead_code()
        self.body_model = TupleBody(fx.GraphModule(gm, body_graph, "PartsBody"))

        def body(params, x):
            return self.body_model(params, x)

        self.body = body
        copied = fx.Graph()
        env = {}
        copied.output(copied.graph_copy(gm.graph, env))
        first = next(iter(copied.nodes))
        for i, name in enumerate(parts):
            with copied.inserting_before(first):
                placeholder = copied.placeholder(f"part_{i}")
            cut = env[nodes[name]]
            cut.replace_all_uses_with(placeholder)
            copied.erase_node(cut)
        fx.GraphModule(gm, copied, "PartsHead")  # dead-code elimination needs an owning module
        copied.eliminate_dead_code()
        head_gm = fx.GraphModule(gm, copied, "PartsHead")
        # placeholders of x left without users by the cut still take x: the call passes them
        self.head_model = CutModel(head_gm)

        def head(params, x, a):
            if isinstance(x, tuple):
                return self.head_model(params, (*a, *x))
            return self.head_model(params, (*a, x))

        self.head = head

    def head_input(self, a, x):
        """The head model's input for the graph-based explainers: the parts, then x."""
        return (*a, *x) if isinstance(x, tuple) else (*a, x)

    def activation_part(self, result):
        return tuple(result[:len(self.parts)])

    def check(self, a) -> None:
        if not (isinstance(a, tuple) and all(isinstance(t, Tensor) for t in a)):
            raise fail(self.where, f"layer {self.layer!r}: its parts must be a tuple of tensors")
