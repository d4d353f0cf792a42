"""Keras model <-> networkx.DiGraph: find convolution sites, rebuild with substitutions.

This module knows nothing about FFT or PAC. It walks Sequential and Functional models (recursively into
nested models), describes every Conv2D / DepthwiseConv2D call as a `Site`, and rebuilds a new Functional
model in which each layer is either re-created from its config with copied weights or replaced by what a
`substitute(site) -> (Implementation, options)` callback says.

Graph shape: one node per layer call (keras `Node`), one edge per tensor flowing between calls.
Node attributes: `op` (the layer/operation), `node` (the keras Node), `order` (Keras's execution order).
Edge attributes: `tensors` (indices of the consumer's input tensors this edge carries).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Dict, List, Optional, Tuple

import networkx as nx

from . import keras_internals as _keras
from .errors import UnsupportedModelError
from .spec import ConvSpec, is_conv_site, spec_from_layer


@dataclasses.dataclass(eq=False)
class Site:
    """One convolution layer of the model (a shared layer is one site, whatever its call count).

    path: the layer's name prefixed by the names of the models that enclose it ("backbone/conv3").
    spec: described from the layer's first call; specs: one per distinct input shape it is called with (a
    layer shared at several sizes is planned with all of them). aliases: the layer's other paths, when it is called both
    in a model and in a model nested in it (one site all the same: it is replaced once, still shared).
    """

    path: str
    layer: object
    spec: ConvSpec
    calls: int = 1
    aliases: List[str] = dataclasses.field(default_factory=list)  # other paths of the same layer (nesting)
    specs: List[ConvSpec] = dataclasses.field(default_factory=list)  # every distinct call's spec, first first

    def __post_init__(self):
        if not self.specs:
            self.specs = [self.spec]

    @property
    def name(self) -> str:
        return self.layer.name


class ModelGraph:
    """A walked Functional model: its DiGraph, its sites (own and nested), and nested model graphs."""

    def __init__(self, model, prefix: str = ""):
        self.model = _as_functional(model)
        self.source = model
        self.prefix = prefix
        self.graph = nx.DiGraph()
        self.sites: List[Site] = []  # own and nested, in execution order
        self.own_sites: List[Site] = []  # called directly in this graph
        self.children: Dict[int, "ModelGraph"] = {}  # id(nested model layer) -> its graph
        self.layers: Dict[str, object] = {}  # path -> layer, for every layer met (own and nested)
        self._walk()

    # ---- walking -------------------------------------------------------------------------------
    def _walk(self):
        self._add_nodes_and_edges()
        self._find_sites()

    def _add_nodes_and_edges(self):
        """One graph node per Keras node (a layer's call), keyed "layer:call index"; edges carry the
        positions of the tensors they feed."""
        keras_nodes = _keras.nodes_in_order(self.model)
        node_key = {}
        for order, node in enumerate(keras_nodes):
            op = node.operation
            key = f"{op.name}:{_keras.call_index(op, node)}"
            node_key[id(node)] = key
            self.graph.add_node(key, op=op, node=node, order=order, is_input=bool(node.is_input))
        for node in keras_nodes:
            for position, tensor in enumerate(node.input_tensors):
                producer, src = _keras.producer(tensor)
                if id(src) not in node_key:
                    raise UnsupportedModelError(
                        f"Layer '{node.operation.name}' consumes a tensor from '{producer.name}' that is not part of "
                        f"model '{self.source.name}'; expected a self-contained Functional graph."
                    )
                u, v = node_key[id(src)], node_key[id(node)]
                if self.graph.has_edge(u, v):
                    self.graph[u][v]["tensors"].append(position)
                else:
                    self.graph.add_edge(u, v, tensors=[position])

    def _find_sites(self):
        """Sites in graph order; a nested model's sites come from its own walk, a layer called twice is one
        site (with `calls`), a layer met again through nesting one site with aliases."""
        seen = {}
        for key in self.ordered_nodes():
            data = self.graph.nodes[key]
            op, node = data["op"], data["node"]
            if data["is_input"]:
                continue
            path = self.prefix + op.name
            self.layers[path] = op
            if id(op) in seen:
                if isinstance(seen[id(op)], Site):
                    site = seen[id(op)]
                    site.calls += 1
                    spec = spec_from_layer(op, tuple(node.input_tensors[0].shape))
                    if spec not in site.specs:
                        site.specs.append(spec)
                continue
            if _is_model(op):
                child = ModelGraph(op, prefix=path + "/")
                self.children[id(op)] = child
                for site in child.sites:
                    self._add_site(site)
                self.layers.update(child.layers)
                seen[id(op)] = child
                continue
            if is_conv_site(op):
                spec = spec_from_layer(op, tuple(node.input_tensors[0].shape))
                site = Site(path=path, layer=op, spec=spec)
                self.own_sites.append(site)
                seen[id(op)] = self._add_site(site)
            else:
                seen[id(op)] = op

    def _add_site(self, site: Site) -> Site:
        """Add `site` to `self.sites`, or merge it into the site already there for the same layer."""
        for existing in self.sites:
            if existing.layer is site.layer:
                for path in [site.path, *site.aliases]:
                    if path != existing.path and path not in existing.aliases:
                        existing.aliases.append(path)
                existing.calls += site.calls
                existing.specs.extend(s for s in site.specs if s not in existing.specs)
                return existing
        self.sites.append(site)
        return site

    def ordered_nodes(self, extra_edges=()):
        """Node keys in an execution order; `extra_edges` (u, v) force u before v (e.g. guidance)."""
        graph = self.graph
        if extra_edges:
            graph = graph.copy()
            graph.add_edges_from(extra_edges)
            if not nx.is_directed_acyclic_graph(graph):
                cycle = nx.find_cycle(graph)
                raise UnsupportedModelError(
                    f"Wiring {extra_edges} into model '{self.source.name}' makes a cycle through "
                    f"{[u for u, _ in cycle]}; expected extra inputs that are computed before the layer using them."
                )
        return list(nx.lexicographical_topological_sort(graph, key=lambda k: graph.nodes[k].get("order", 0)))

    def node_for_layer_name(self, name: str) -> Optional[str]:
        """Key of the first call of the layer (or model input) named `name` in this graph."""
        best = None
        for key, data in self.graph.nodes(data=True):
            if data["op"].name == name and (best is None or data["order"] < self.graph.nodes[best]["order"]):
                best = key
        return best

    def all_sites(self) -> List[Site]:
        return list(self.sites)

    def find_sites(self, selector) -> List[Site]:
        """Sites matching `selector`: a path, a bare layer name, a list of those, or a compiled regex."""
        if isinstance(selector, re.Pattern):
            return [s for s in self.sites
                    if any(selector.fullmatch(p) for p in [s.path, s.name, *s.aliases])]
        if isinstance(selector, str):
            selector = [selector]
        out = []
        for item in selector:
            if isinstance(item, re.Pattern):
                out.extend(self.find_sites(item))
                continue
            matches = ([s for s in self.sites if item == s.path or item in s.aliases]
                       or [s for s in self.sites if s.name == item])
            out.extend(m for m in matches if m not in out)
        return out

    # ---- rebuilding ----------------------------------------------------------------------------
    def rebuild(self, substitute: Callable[[Site], Optional[Tuple[object, dict]]], model_class=None,
                replace_nodes: Optional[Dict[str, Callable]] = None):
        """A new Functional model where each site is built by `substitute(site)`.

        substitute returns (Implementation, options) for a site, or None to keep it as it is
        (re-created from config). Every other layer is re-created from its config; every weight is copied
        by value, so the new model shares no variables with the original. Shared layers stay shared.
        model_class: a callable (inputs=, outputs=, name=) -> keras.Model for the outermost model (e.g. one
        that reads and writes the original's weight files); keras.Model by default.
        replace_nodes: {node key ("layer:call"): fn(tensor_of) -> outputs or None} for nodes of this graph (not
        nested ones) that a graph rewrite computes differently: `tensor_of(old KerasTensor)` gives the rebuilt
        tensor, and fn returns the node's new outputs (an earlier node's tensor to pass it through, or a new
        layer's call, whose weights fn sets), or None to drop the node (nothing may then read its outputs).
        """
        return _Rebuilder(self, substitute, model_class=model_class, replace_nodes=replace_nodes).run()


class _Rebuilder:
    """One rebuild of one ModelGraph (nested models get a rebuilder of their own, cached per model)."""

    def __init__(self, mg: ModelGraph, substitute, cache=None, model_class=None, replace_nodes=None):
        self.mg = mg
        self.replace_nodes = replace_nodes or {}
        self.model_class = model_class  # builds the outermost model; nested ones are plain keras.Model
        self.substitute = substitute
        self.cache = {} if cache is None else cache  # id(old layer) -> new layer, across nesting
        self.transfers = []  # (implementation or None, old, new, spec)
        self.tensors = {}  # id(old KerasTensor) -> new KerasTensor
        self.site_by_layer = {id(s.layer): s for s in mg.own_sites}

    def run(self):
        """The rebuilt keras.Model: inputs recreated, every node called again in graph order (substituted
        sites through their implementation), weights copied after the new model exists."""
        import keras

        choices, extra_edges = self._substitutes()
        for old in self.mg.model.inputs:
            self.tensors[id(old)] = keras.Input(batch_shape=tuple(old.shape), dtype=old.dtype,
                                                sparse=getattr(old, "sparse", False), name=_keras.input_name(old))
        for key in self.mg.ordered_nodes(extra_edges):
            if key in self.replace_nodes:
                self._replace_node(key)
            elif not self.mg.graph.nodes[key]["is_input"]:
                self._call_again(self.mg.graph.nodes[key], choices)
        inputs_struct, outputs_struct = _keras.io_structs(self.mg.model)
        inputs = keras.tree.map_structure(lambda t: self.tensors[id(t)], inputs_struct)
        outputs = keras.tree.map_structure(lambda t: self.tensors[id(t)], outputs_struct)
        model = (self.model_class or keras.Model)(inputs=inputs, outputs=outputs, name=self.mg.source.name)
        for impl, old, new, spec in self.transfers:
            if impl is None:
                _copy_weights(old, new)
            else:
                impl.transfer_weights(old, new, spec)
        if not self.mg.source.trainable:  # setting True would also unfreeze layers frozen one by one
            model.trainable = False
        return model

    def _substitutes(self):
        """({id(layer): (implementation, options) or None}, extra edges making each replacement's
        dependencies (e.g. PAC's guidance) come before it)."""
        choices, extra_edges = {}, []
        for site in self.mg.own_sites:
            choice = self.substitute(site)
            choices[id(site.layer)] = choice
            if choice is None:
                continue
            impl, options = choice
            site_key = self.mg.node_for_layer_name(site.layer.name)
            for dep in impl.dependencies(site.spec, options):
                dep_key = self.mg.node_for_layer_name(dep)
                if dep_key is None:
                    names = sorted(self.mg.graph.nodes[k]["op"].name for k in self.mg.graph)
                    raise UnsupportedModelError(
                        f"Layer '{site.path}' asks for '{dep}' but model '{self.mg.source.name}' has no input "
                        f"or layer of that name; expected one of {names}.")
                extra_edges.append((dep_key, site_key))
        return choices, extra_edges

    def _replace_node(self, key):
        """Record the outputs a graph rewrite gives node `key` (see ModelGraph.rebuild's replace_nodes)."""
        import keras

        outputs = self.replace_nodes[key](lambda t: self.tensors[id(t)])
        if outputs is None:
            return
        for old_t, new_t in zip(self.mg.graph.nodes[key]["node"].outputs, keras.tree.flatten(outputs)):
            self.tensors[id(old_t)] = new_t

    def _call_again(self, data, choices):
        """Call the node's layer (or its replacement) on the rebuilt tensors and record its outputs."""
        import keras

        node, op = data["node"], data["op"]
        if any(id(t) not in self.tensors for t in node.input_tensors):
            raise UnsupportedModelError(
                f"Layer '{self.mg.prefix}{op.name}' needs tensors not produced by model '{self.mg.source.name}' "
                f"before it; expected a Functional graph whose inputs are all model inputs.")
        args, kwargs = _keras.fill_in(node, self.tensors)
        if choices.get(id(op)) is not None:
            impl, options = choices[id(op)]
            new_layer = self._new_site_layer(op, impl, options)
            outputs = impl.call(new_layer, args, kwargs, _CallContext(self, self.site_by_layer[id(op)], options, args))
        else:
            outputs = self._new_layer(op)(*args, **kwargs)
        flat = keras.tree.flatten(outputs)
        if len(flat) != len(node.outputs):
            raise UnsupportedModelError(
                f"Layer '{self.mg.prefix}{op.name}' returned {len(flat)} tensors when rebuilt; expected {len(node.outputs)}.")
        for old_t, new_t in zip(node.outputs, flat):
            self.tensors[id(old_t)] = new_t

    def _new_site_layer(self, op, impl, options):
        if id(op) not in self.cache:
            site = self.site_by_layer[id(op)]
            new = impl.make_layer(op, site.spec, **options)
            self.cache[id(op)] = new
            self.transfers.append((impl, op, new, site.spec))
        return self.cache[id(op)]

    def _new_layer(self, op):
        if id(op) in self.cache:
            return self.cache[id(op)]
        if id(op) in self.mg.children:
            new = _Rebuilder(self.mg.children[id(op)], self.substitute, self.cache).run()
        else:
            new = recreate(op, self.mg.prefix + op.name)
            self.transfers.append((None, op, new, None))
        self.cache[id(op)] = new
        return new


class _CallContext:
    """What an implementation's `call` may ask of the rebuild: other tensors by name, its options."""

    def __init__(self, rebuilder, site, options, args):
        self._rebuilder = rebuilder
        self.site = site
        self.options = options
        self.args = args

    def resolve(self, name: str):
        mg = self._rebuilder.mg
        key = mg.node_for_layer_name(name)
        if key is None:
            raise UnsupportedModelError(f"Layer '{self.site.path}' asks for '{name}', which model '{mg.source.name}' does not have.")
        outputs = mg.graph.nodes[key]["node"].outputs
        if id(outputs[0]) not in self._rebuilder.tensors:
            raise UnsupportedModelError(f"Layer '{self.site.path}' asks for '{name}', which is not computed before it.")
        return self._rebuilder.tensors[id(outputs[0])]


def live_config(op) -> dict:
    """`op.get_config()` with its activation as the live callable rather than its serialized form, so that
    a layer whose activation is a Python function or lambda re-creates without a round trip through
    bytecode (Keras layers accept a callable wherever they accept an activation name)."""
    config = op.get_config()
    if "activation" in config and callable(getattr(op, "activation", None)) and not isinstance(config["activation"], str):
        config["activation"] = op.activation
    return config


def recreate(op, path: str = ""):
    """A fresh copy of a layer/operation from its config (no weights yet).

    A layer that cannot be re-created but holds no weights (a custom stateless layer without
    get_config) is kept as it is: the new model calls the same object, which shares no state with it.
    One that holds weights cannot be shared without sharing variables, so it raises."""
    try:
        # The layer already lives in this process, so re-creating it is not a deserialization risk
        # (Lambda layers refuse safe mode otherwise).
        with _keras.unsafe_deserialization():
            config = live_config(op)
            new = type(op).from_config(config)
        if "name" not in config and getattr(new, "name", None) != getattr(op, "name", None):
            # A custom layer whose get_config() leaves out `name` would come back auto-named ("x_1"): keep the
            # original's name, which the plan, the verification report and weight files address it by.
            new.name = op.name
        return new
    except Exception as exc:  # noqa: BLE001 - any failure means the layer cannot be copied faithfully
        if not getattr(op, "weights", None) and not _is_model(op):
            return op
        detail = str(exc).splitlines()[0] if str(exc).strip() else "no message"
        raise UnsupportedModelError(
            f"Layer '{path or op.name}' ({type(op).__name__}) holds weights but cannot be re-created from its "
            f"config ({type(exc).__name__}: {detail}); expected a layer with get_config()/from_config(), "
            f"registered with keras.saving.register_keras_serializable."
        ) from exc


def _copy_weights(old, new):
    import numpy as np

    if not hasattr(old, "get_weights"):
        return
    weights = old.get_weights()
    if not weights:
        return
    try:
        new.set_weights([np.array(w) for w in weights])
    except ValueError as exc:
        raise UnsupportedModelError(
            f"Layer '{old.name}' ({type(old).__name__}) re-created from config has weights that do not match "
            f"the original's ({exc}); expected get_config() to describe the layer fully."
        ) from exc


def _is_model(op) -> bool:
    import keras

    return isinstance(op, keras.Model)


def _as_functional(model):
    import keras

    if isinstance(model, keras.Sequential):
        functional = _keras.sequential_functional(model)
        if functional is None:
            raise UnsupportedModelError(
                f"Sequential model '{model.name}' has no known input shape; expected it to start with "
                f"keras.Input(...) or to be built (model.build(input_shape)) before optimizing."
            )
        return functional
    if isinstance(model, _keras.functional_class()):
        return model
    if isinstance(model, keras.Model):
        raise UnsupportedModelError(
            f"Model '{model.name}' is a subclassed {type(model).__name__}, whose call() cannot be walked; expected a "
            f"Sequential or Functional model (wrap its layers in keras.Model(inputs, outputs))."
        )
    raise UnsupportedModelError(f"Received {type(model).__name__}; expected a keras.Model (Sequential or Functional).")


def walk(model) -> ModelGraph:
    """Walk a Sequential or Functional Keras model (recursively into nested models)."""
    return ModelGraph(model)


def input_struct(model):
    """The model's symbolic inputs in its own input structure (a tensor, list or dict of keras.KerasTensor)."""
    return _keras.io_structs(_as_functional(model))[0]
