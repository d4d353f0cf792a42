"""Keras model <-> networkx.DiGraph: find convolution sites, rebuild with substitutions.

This module knows nothing about FFT or PAC. It walks Sequential and Functional models (recursively into
nested models), describes every call of a conv site layer (`spec.is_conv_site`: Conv2D, DepthwiseConv2D,
Conv1D, DepthwiseConv1D, Conv3D) as a `Site`, and rebuilds a new Functional model in which each layer is
either re-created from its config with copied weights or replaced by what a
`substitute(site) -> (Implementation, options)` callback says.

Convolutions held inside a layer of the graph (a custom layer's attributes, lists, dicts; a subclassed
model's) are sites too, "held" sites (see convrewrite.sublayers): described from the shapes they see in one
symbolic trace of their holder's calls, and replaced by copying the holding layer with the sublayer swapped
for its drop-in replacement. A subclassed model is walked as one such holder (no graph), and rebuilt as a
copy of its own class.

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
from . import model_class as _model_class
from . import sublayers
from .errors import UnsupportedModelError
from .spec import ConvSpec, input_rank, is_conv_site, spec_from_layer


@dataclasses.dataclass(eq=False)
class Site:
    """One convolution layer of the model (a shared layer is one site, whatever its call count).

    path: the layer's name prefixed by the names of the models that enclose it ("backbone/conv3").
    spec: described from the layer's first call; specs: one per distinct input shape it is called with (a
    layer shared at several sizes is planned with all of them). aliases: the layer's other paths, when it is called both
    in a model and in a model nested in it (one site all the same: it is replaced once, still shared).
    holder, steps: for a conv held inside a layer rather than called by the graph, that layer (a node of the
    graph, or the subclassed model itself) and where in it the conv is held (see sublayers.locate); its
    specs are from one trace of the holder's calls (see ModelGraph._held_shapes). kept: set where the
    holder cannot be copied, so the conv can only stay as it is.
    """

    path: str
    layer: object
    spec: ConvSpec
    calls: int = 1
    aliases: List[str] = dataclasses.field(default_factory=list)  # other paths of the same layer (nesting)
    specs: List[ConvSpec] = dataclasses.field(default_factory=list)  # every distinct call's spec, first first
    holder: object = None  # the layer holding this conv (None: the conv is a node of the graph)
    steps: tuple = ()  # where `holder` holds it (attributes, list indices, dict keys)
    kept: str = ""  # why only its own implementation can run it ("" where it may be replaced)

    def __post_init__(self):
        if not self.specs:
            self.specs = [self.spec]

    @property
    def name(self) -> str:
        return self.layer.name


class ModelGraph:
    """A walked model: its DiGraph, its sites (own, held and nested), and nested model graphs.

    A subclassed model has no graph (`model` is None, `subclassed` True): its sites are the convs it holds."""

    def __init__(self, model, prefix: str = ""):
        self.subclassed = _is_model(model) and not sublayers.is_graph_model(model)
        self.model = None if self.subclassed else _as_functional(model)
        self.source = model
        self.prefix = prefix
        self.graph = nx.DiGraph()
        self.sites: List[Site] = []  # own and nested, in execution order
        self.own_sites: List[Site] = []  # called directly in this graph
        self.held: Dict[int, List[Site]] = {}  # id(layer of this graph, or the subclassed model) -> convs it holds
        self.held_models: Dict[int, list] = {}  # id(such a layer) -> [(steps, ModelGraph)] of graph models it holds
        self.children: Dict[int, "ModelGraph"] = {}  # id(nested model layer) -> its graph
        self.layers: Dict[str, object] = {}  # path -> layer, for every layer met (own, held and nested)
        self._walk()

    # ---- walking -------------------------------------------------------------------------------
    def _walk(self):
        if self.subclassed:
            if not self.source.built:
                raise UnsupportedModelError(
                    f"Subclassed model '{self.source.name}' is not built, so the shapes its convolutions see are "
                    f"unknown; expected a built model (call it on data, or model.build(input_shape)) before optimizing.")
            self._find_held(self.source, self.prefix.rstrip("/"))
            return
        self._add_nodes_and_edges()
        self._find_sites()

    def _find_held(self, op, path: str):
        """Sites for the convs `op` holds (at any depth), each described from the shapes it sees when `op`'s
        calls are traced once (else from the shape it was built with); one never built (so never called) or
        called on a tensor of another rank than its kind takes is no site. Those of a layer that cannot be
        copied are kept as they are (`Site.kept`): they can only be replaced on a copy."""
        for steps, sub in sublayers.every_sublayer(op):  # addressable by path (weights copied by name)
            self.layers.setdefault("/".join(p for p in (path, sublayers.path_of(steps)) if p), sub)
        found = sublayers.held_sublayers(op, is_conv_site)
        kept = _copy_refusal(op, path) if found and op is not self.source else ""
        seen = self._held_shapes(op, [sub for _, sub in found if not sublayers.is_graph_model(sub)]) if found else {}
        for steps, sub in found:
            sub_path = "/".join(p for p in (path, sublayers.path_of(steps)) if p)
            if sublayers.is_graph_model(sub):  # a Sequential / Functional held in an attribute: walked as a graph
                child = ModelGraph(sub, prefix=sub_path + "/")
                self.held_models.setdefault(id(op), []).append((steps, child))
                self.layers.update(child.layers)
                for site in child.sites:
                    site.kept = site.kept or kept
                    self._add_site(site)
                continue
            config = sub.get_build_config() if sub.built else None
            shapes = [s for s in seen.get(id(sub)) or [(config or {}).get("input_shape")]
                      if s and len(s) == input_rank(sub)]
            if not shapes:
                continue
            # the batch it was built or probed with is incidental: planned at plan()'s batch, like a graph's
            specs = list(dict.fromkeys(spec_from_layer(sub, (None, *tuple(shape)[1:])) for shape in shapes))
            site = Site(path=sub_path, layer=sub, spec=specs[0], specs=specs, calls=len(shapes), holder=op,
                        steps=steps, kept=kept)
            self.held.setdefault(id(op), []).append(site)
            self.layers[sub_path] = sub
            self._add_site(site)

    def _held_shapes(self, op, convs) -> dict:
        """{id(conv): [input shape of each call]} for the `convs` `op` holds, from one trace of each call of
        `op` (the subclassed model: on its build shape); {} where a call cannot be traced."""
        seen = {}
        try:
            if op is self.source:
                calls = [((input_struct(op),), {})]
            else:
                nodes = sorted((d["order"], d["node"]) for _, d in self.graph.nodes(data=True) if d["op"] is op)
                calls = [_keras.node_call_arguments(node) for _, node in nodes]
            for args, kwargs in calls:
                for key, shapes in _keras.input_shapes_seen(op, args, kwargs, convs).items():
                    seen.setdefault(key, []).extend(shapes)
        except Exception:  # noqa: BLE001 - a call that cannot be traced leaves the shapes the convs were built with
            return {}
        return seen

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
            if sublayers.is_graph_model(op):
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
                self._find_held(op, path)
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

    def __init__(self, mg: ModelGraph, substitute, cache=None, model_class=None, shared=None, unsaved=None,
                 replace_nodes=None, dropped=None, keep_class=True):
        self.mg = mg
        self.replace_nodes = replace_nodes or {}
        self.model_class = model_class  # builds the outermost model; nested ones are plain keras.Model
        self.substitute = substitute
        self.cache = {} if cache is None else cache  # id(old layer) -> new layer, across nesting
        self.shared = [] if shared is None else shared  # paths of layers with weights kept as the same object
        self.unsaved = [] if unsaved is None else unsaved  # paths of copies whose swaps a .keras file cannot keep
        self.dropped = [] if dropped is None else dropped  # attributes of a kept class that could not be carried
        # a Functional subclass keeps its class where every model enclosing it does: then the outermost model's
        # .keras file can rebuild the whole tree on loading (see api's plan record)
        self.keep_class = keep_class and _model_class.keeps_class(mg.source)
        if _model_class.keeps_class(mg.source) and not self.keep_class:
            self.dropped.append(f"{mg.prefix.rstrip('/')}: class {type(mg.source).__name__} (rebuilt as a Functional: "
                                f"the model holding it is not of a class kept)")
        self.transfers = []  # (implementation or None, old, new, spec)
        self.tensors = {}  # id(old KerasTensor) -> new KerasTensor
        self.site_by_layer = {id(s.layer): s for s in mg.own_sites}
        self.choices = {}  # id(site layer) -> (implementation, options) or None, set by run()

    def run(self):
        """The rebuilt keras.Model: inputs recreated, every node called again in graph order (substituted
        sites through their implementation), weights copied after the new model exists."""
        import keras

        choices, extra_edges = self._substitutes()
        self.choices = choices
        if self.mg.subclassed:
            return self._run_subclassed()
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
        if self.keep_class:
            model = _model_class.kept_instance(
                self.mg.source, inputs, outputs, tensor_of=lambda t: self.tensors[id(t)],
                layer_of=lambda layer: self.cache.get(id(layer)), copy_layer=_copy_built, shared=self.shared,
                dropped=self.dropped, prefix=self.mg.prefix)
        else:
            model = (self.model_class or keras.Model)(inputs=inputs, outputs=outputs, name=self.mg.source.name)
        return self._finish(model)

    def _finish(self, model):
        """Move the weights into the built `model` and carry the original's trainable flag over."""
        for impl, old, new, spec in self.transfers:
            if impl is None:
                _copy_weights(old, new)
            else:
                impl.transfer_weights(old, new, spec)
        if not self.mg.source.trainable:  # setting True would also unfreeze layers frozen one by one
            model.trainable = False
        model.convrewrite_shared_layers = tuple(self.shared)
        model.convrewrite_unsaved_swaps = tuple(self.unsaved)
        model.convrewrite_dropped_attributes = tuple(self.dropped)
        return model

    def _run_subclassed(self):
        """A subclassed model rebuilt: a copy of its own class from its config, the convs it holds swapped
        as planned, built with the original's build shapes, weights copied."""
        source = self.mg.source
        new = self._copy_swapped(source, source.name, self._swaps(source))
        sublayers.build_like(new, source)
        return self._finish(new)

    def _substitutes(self):
        """({id(layer): (implementation, options) or None}, extra edges making each replacement's
        dependencies (e.g. PAC's guidance) come before it)."""
        choices, extra_edges = {}, []
        for site in (s for held in self.mg.held.values() for s in held):
            choices[id(site.layer)] = self._held_choice(site)
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

    def _held_choice(self, site):
        """substitute(site) for a conv held inside a layer: only a drop-in replacement can be swapped in."""
        choice = self.substitute(site)
        if choice is not None and not choice[0].drop_in:
            raise UnsupportedModelError(
                f"Layer '{site.path}' is held inside layer '{site.holder.name}' ({type(site.holder).__name__}), not "
                f"called by a Functional graph, and implementation '{choice[0].label}' needs the graph to wire its "
                f"extra inputs; expected it only for convolutions that are layers of a Functional or Sequential "
                f"model (plan.force('{site.path}', 'direct'), or select other layers).")
        return choice

    def _swaps(self, op) -> list:
        """[(steps, original, make)] for what `op` holds that the plan changes: each conv it replaces, and
        each graph model it holds with a site replaced. make() -> (replacement, transfer or None, spec)."""
        out = []
        for site in self.mg.held.get(id(op), []):
            if self.choices.get(id(site.layer)) is not None:
                impl, options = self.choices[id(site.layer)]
                out.append((site.steps, site.layer, lambda site=site, impl=impl, options=options: (
                    impl.make_layer(site.layer, site.spec, **options), impl.transfer_weights, site.spec)))
        for steps, child in self.mg.held_models.get(id(op), []):
            if any(self.substitute(site) is not None for site in child.sites):
                out.append((steps, child.source, lambda child=child: (_Rebuilder(
                    child, self.substitute, self.cache, shared=self.shared, unsaved=self.unsaved).run(), None, None)))
        return out

    def _copy_swapped(self, op, path: str, swaps):
        """A copy of `op` from its config with each planned held conv (or held graph model) swapped for its
        replacement; its weights are moved once it is built (see SwappedCopy)."""
        new = recreate(op, path)  # it must be copied: raises where it cannot be re-created
        placed, swapped = {}, []
        for steps, original, make in swaps:
            holder, sub = sublayers.locate(new, steps)
            if sub is None:  # held sublayers made in build(): build the copy as the original was
                sublayers.build_like(new, op)
                holder, sub = sublayers.locate(new, steps)
            if sub is None or type(sub) is not type(original):
                raise UnsupportedModelError(
                    f"Layer '{path}' ({type(op).__name__}) re-created from its config holds no "
                    f"{type(original).__name__} at '{sublayers.path_of(steps)}', where the original holds "
                    f"'{original.name}'; expected get_config() to re-create the same sublayers.")
            replacement, transfer, spec = make()
            sublayers.swap(holder, sub, replacement)  # unbuilt: the holder builds it (some call build() on it)
            placed[id(original)] = (transfer, spec)
            swapped.append((steps, replacement))
        if not sublayers.record_swaps(new, swapped):
            self.unsaved.append(path)
        self.transfers.append((sublayers.SwappedCopy(placed), op, new, None))
        return new

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
            new = _Rebuilder(self.mg.children[id(op)], self.substitute, self.cache, shared=self.shared,
                            unsaved=self.unsaved, dropped=self.dropped, keep_class=self.keep_class).run()
        elif self._swaps(op):
            new = self._copy_swapped(op, self.mg.prefix + op.name, self._swaps(op))
        else:
            new = recreate(op, self.mg.prefix + op.name, share=True)
            if new is op and getattr(op, "weights", None):
                self.shared.append(self.mg.prefix + op.name)
            else:
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


def keras_config(op) -> dict:
    """`live_config(op)` without the options of convrewrite's own replacement layers (their class's
    `convrewrite_extra_config`, e.g. an FFT layer's tile_size and transform): what the Keras class the layer
    computes, or another replacement of it, takes. The identity for Keras's own layers."""
    extra = type(op).__dict__.get("convrewrite_extra_config", ())
    return {k: v for k, v in live_config(op).items() if k not in extra}


def recreate(op, path: str = "", share: bool = False):
    """A fresh copy of a layer/operation from its config (no weights yet).

    A layer that cannot be re-created but holds no weights (a custom stateless layer without
    get_config) is kept as it is: the new model calls the same object, which shares no state with it.
    One that holds weights is kept as it is too where `share` (the rebuild of a layer that is not being
    replaced: the new model then shares its variables with the original, and the rebuild says so); else
    it raises UnsupportedModelError."""
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
        if share or (not getattr(op, "weights", None) and not _is_model(op)):
            return op
        detail = str(exc).splitlines()[0] if str(exc).strip() else "no message"
        raise UnsupportedModelError(
            f"Layer '{path or op.name}' ({type(op).__name__}) holds weights but cannot be re-created from its "
            f"config ({type(exc).__name__}: {detail}); expected a layer with get_config()/from_config(), "
            f"registered with keras.saving.register_keras_serializable."
        ) from exc


def _copy_built(op, path: str):
    """A copy of `op` built as it is, with its weights; `op` itself where it cannot be re-created."""
    new = recreate(op, path, share=True)
    if new is not op:
        sublayers.build_like(new, op)
        _copy_weights(op, new)
    return new


def _copy_refusal(op, path: str) -> str:
    """'' where `op` can be re-created from its config (so the convs it holds can be swapped on a copy),
    else why not, for the plan's rows."""
    try:
        recreate(op, path)
    except UnsupportedModelError:
        return f"held in layer '{path}' ({type(op).__name__}), which cannot be re-created from its config to swap it"
    return ""


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
    raise UnsupportedModelError(f"Received {type(model).__name__}; expected a keras.Model (Sequential or Functional).")


def walk(model) -> ModelGraph:
    """Walk a Keras model: Sequential or Functional (recursively into nested models and into the layers
    holding convolutions), or subclassed (the convolutions it holds)."""
    import keras

    if not isinstance(model, keras.Model):
        raise UnsupportedModelError(f"Received {type(model).__name__}; expected a keras.Model.")
    return ModelGraph(model)


def input_struct(model):
    """The model's symbolic inputs in its own input structure (a tensor, list or dict of keras.KerasTensor).

    A subclassed model has none of its own: tensors of the shapes it was built with stand for them."""
    if _is_model(model) and not sublayers.is_graph_model(model):
        shape = (model.get_build_config() or {}).get("input_shape") if model.built else None
        if shape is None:
            raise UnsupportedModelError(
                f"Subclassed model '{model.name}' was not built on positional inputs, so its inputs are unknown; "
                f"expected inputs= (arrays in its input structure) or a model built with model.build(input_shape).")
        return sublayers.symbolic_inputs(shape, model.input_dtype)
    return _keras.io_structs(_as_functional(model))[0]
