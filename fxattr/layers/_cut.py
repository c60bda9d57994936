"""Cutting a functional model at a layer's output or input, for the layer and neuron attributions.

A :class:`Cut` holds ``body(params, x) -> activation`` and ``head(params, x, activation) ->
output`` (from :func:`fxattr.graph.split`), and, for the graph-based explainers (DeepLIFT, LRP,
guided backprop, deconvnet), the two halves as functional models of their own graphs
(:class:`CutModel`): ``head_model(params, (activation, x))`` and ``body_model(params, x)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from fxattr import graph
from fxattr.errors import fail
from fxattr.functional import FunctionalModel

__all__ = ["Cut", "CutModel", "cuts", "layer_names"]


class CutModel(FunctionalModel):
    """The functional model of one half of a cut graph. It reads only the parameters its graph
    uses, so it is called with the user's full ``params`` like the model it was cut from."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.names = frozenset(name for name, _ in module.named_parameters(remove_duplicate=False)) | \
            frozenset(name for name, _ in module.named_buffers(remove_duplicate=False))

    def own(self, params):
        if not isinstance(params, Mapping):
            return params
        return {k: v for k, v in params.items() if k in self.names}

    def check_dtype(self, params, x, where: str | None = "functionalize") -> None:
        super().check_dtype(self.own(params), x, where)

    def __call__(self, params, x):
        return super().__call__(self.own(params), x)


class Cut:
    """``f`` cut at one layer's output (or input, ``to_input=True``).

    Attributes:
        layer: the layer as the user named it.
        node: the graph node whose value is the activation (``None``: the model's input).
        body, head: the two halves (``head(params, x, body(params, x)) == f(params, x)``).
    """

    def __init__(self, where: str, f, layer: str, to_input: bool):
        self.f, self.layer, self.where = f, layer, where
        if to_input:
            node = input_node(where, f, layer)
        else:
            node = layer
        self.node = node
        self._head_model = self._body_model = None
        if node is None:  # the layer reads the model's input: the cut is the identity
            self.body = lambda params, x: x
            self.head = lambda params, x, a: f(params, a)
        else:
            body, self.head = graph.split(f, node, where=where)
            self.body = _tensor_body(where, layer, body)

    @property
    def head_model(self) -> FunctionalModel:
        """The head as a functional model of ``(activation, x)`` (of ``activation`` alone when the
        cut is at the model's input) for the graph-based explainers."""
        if self._head_model is None:
            self._head_model = self.f if self.node is None else CutModel(self.head.graph_module)
        return self._head_model

    @property
    def body_model(self) -> FunctionalModel:
        if self._body_model is None:
            if self.node is None:
                raise fail(self.where, f"the input of layer {self.layer!r} is the model's input: "
                                       "explain the model itself")
            self._body_model = CutModel(self.body.graph_module)
        return self._body_model

    def head_input(self, a, x):
        return a if self.node is None else (a, x)

    def activation_part(self, result):
        return result if self.node is None else result[0]


def _tensor_body(where: str, layer: str, body):
    """``body`` checked to return one tensor (a layer returning a tuple: name one of its parts)."""
    def checked(params, x):
        a = body(params, x)
        if not isinstance(a, Tensor):
            raise fail(where, f"layer {layer!r} returns a {type(a).__name__}, not a tensor; name the "
                              "graph node of one of its parts instead (e.g. its getitem node)")
        return a
    checked.graph_module = body.graph_module
    return checked


def _inside(node, layer: str, modules: Mapping) -> bool:
    if node.op == "call_module":
        name = node.target
    else:
        name = graph.origin(node)
    return name is not None and (name == layer or name.startswith(layer + "."))


def input_node(where: str, f, layer: str):
    """The graph node name of the value ``layer`` reads (``None``: the model's input).

    Replacing that value must change what the layer reads and nothing else (captum replaces the
    input of the module's forward alone): a value also read outside the layer (the identity branch
    around a residual block's first convolution) is an error, not a silently different cut.
    """
    gm = graph.trace(f)
    node = graph.find_layer(where, gm, layer)
    if layer in gm.meta.get("module_outputs", {}):
        inside = {n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")
                  and _inside(n, layer, gm.meta["module_outputs"])}
        inside.add(node)
    else:
        inside = {node}
    # values computed from x's data (not shape reads, nor masks built from x's length alone)
    data: set = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder" or (n.op != "get_attr" and not graph.ops.is_meta(n)
                                     and any(a in data for a in n.all_input_nodes)):
            data.add(n)
    reads = []
    for n in gm.graph.nodes:
        if n not in inside:
            continue
        for a in n.all_input_nodes:
            if a not in inside and a in data and a not in reads:
                reads.append(a)
    if len(reads) != 1:
        raise fail(where, f"attribute_to_layer_input=True needs a layer that reads one tensor; layer "
                          f"{layer!r} reads {len(reads)} ({', '.join(n.name for n in reads) or 'none'})")
    source = reads[0]
    outside = [u.name for u in source.users if u not in inside]
    if outside:
        raise fail(where, f"attribute_to_layer_input=True: the input of layer {layer!r} (graph node "
                          f"{source.name!r}) is also read outside the layer (by {', '.join(outside)}), "
                          "so it cannot be replaced for the layer alone; attribute to the output of "
                          "the layer that produces it instead")
    if source.op == "placeholder":
        return None
    return source.name


def layer_names(where: str, f, layer) -> list[str]:
    """``layer`` (a module name, a graph node name, a submodule, or a non-empty list of them) as a
    list of names."""
    if isinstance(layer, (str, nn.Module)):
        layer = [layer]
    if not (isinstance(layer, Sequence) and not isinstance(layer, str) and layer
            and all(isinstance(n, (str, nn.Module)) for n in layer)):
        raise fail(where, "layer must be a module name (e.g. 'layer4'), a graph node name, a submodule "
                          f"of the model, or a non-empty list of them; got {layer!r:.100}")
    names = []
    for item in layer:
        if isinstance(item, nn.Module):
            root = getattr(f, "module", None)
            found = [n for n, m in root.named_modules() if m is item and n] if isinstance(root, nn.Module) else []
            if not found:
                raise fail(where, f"layer {type(item).__name__} is not a submodule of the model; pass "
                                  "its qualified name (e.g. 'layer4')")
            item = found[0]
        names.append(item)
    return names


def cuts(where: str, f, layer, to_input: bool) -> tuple[list[Cut], bool]:
    """The cuts for ``layer`` and whether a list was given (results are then a tuple)."""
    if not isinstance(f, FunctionalModel):
        raise fail(where, "f must be the function of fxattr.functionalize (layer methods cut its "
                          f"traced graph), got {type(f).__name__}")
    many = not isinstance(layer, (str, nn.Module))
    return [Cut(where, f, name, to_input) for name in layer_names(where, f, layer)], many
