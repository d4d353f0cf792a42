"""Every private Keras API convrewrite relies on, in one small adapter.

Keras has no public API for a Functional model's node graph, for the layout of `.weights.h5` files, or for
reading a variable past a mixed-precision autocast; these wrappers name what each private attribute is for.
Checked against Keras 3.10 to 3.15: a Keras upgrade that moves one of them breaks here, and only here.
"""

from __future__ import annotations


# ---- the Functional node graph (graph.py) ------------------------------------------------------------
def ops_add_class():
    """The operation a functional sum `x + y` / `keras.ops.add(x, y)` records in a Functional graph."""
    from keras.src.ops.numpy import Add

    return Add


def functional_class():
    """keras.src's Functional (a Sequential's or keras.Model(inputs, outputs)'s class)."""
    from keras.src.models.functional import Functional

    return Functional


def sequential_functional(model):
    """The Functional a built Sequential keeps inside (Sequential._functional), None before it is built."""
    return getattr(model, "_functional", None)


def nodes_in_order(model):
    """Every node (layer call) of a Functional model, inputs first (Functional._nodes_by_depth)."""
    by_depth = model._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def call_index(op, node) -> int:
    """Which of `op`'s calls `node` is (Operation._inbound_nodes)."""
    return op._inbound_nodes.index(node) if node in op._inbound_nodes else 0


def producer(tensor):
    """(layer, node) that produced a symbolic tensor (KerasTensor._keras_history)."""
    layer, node_index, _ = tensor._keras_history
    return layer, layer._inbound_nodes[node_index]


def input_name(tensor) -> str:
    """The name of the Input layer a model input comes from."""
    return tensor._keras_history.operation.name


def io_structs(functional):
    """(inputs, outputs) of a Functional in its own nesting (Functional._inputs_struct / _outputs_struct)."""
    return functional._inputs_struct, functional._outputs_struct


def fill_in(node, tensors):
    """(args, kwargs) of a node's call with its symbolic tensors replaced from {id(old): new}."""
    return node.arguments.fill_in(tensors)


def all_layers(model) -> list:
    """Every layer a model tracks, nested models' layers too (Layer._flatten_layers)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def unsafe_deserialization():
    """A context in which from_config may rebuild Lambda layers (serialization_lib.SafeModeScope(False)):
    re-creating a layer that already lives in this process is no deserialization risk."""
    from keras.src.saving import serialization_lib

    return serialization_lib.SafeModeScope(False)


# ---- sublayers held by custom layers and subclassed models (sublayers.py) ----------------------------
def tracked_sublayers(layer) -> list:
    """The layers `layer` tracks directly (Layer._layers: whatever it holds in attributes, lists and dicts),
    in the order Keras lists their weights."""
    return list(getattr(layer, "_layers", ()))


def replace_tracked_sublayer(layer, old, new) -> None:
    """Make `layer` track `new` in `old`'s place, same position (Tracker.replace_tracked_value), so its
    weights, sublayers and saved state list `new` where they listed `old`."""
    layer._tracker.replace_tracked_value("layers", old, new)


def node_call_arguments(node):
    """(args, kwargs) a node's layer was called with, as symbolic tensors (Node.arguments)."""
    return node.arguments.args, node.arguments.kwargs


def input_shapes_seen(layer, args, kwargs, watched) -> dict:
    """{id(sublayer): [input shape of each call]} for the `watched` sublayers when `layer.call(*args,
    **kwargs)` is traced once on symbolic tensors (backend.compute_output_spec: no values are computed,
    and no Keras node is added to `layer` or the sublayers, so the model is left as it was)."""
    from keras.src import backend

    seen = {id(sub): [] for sub in watched}

    def watch(sub):
        bound = sub.call

        def call(inputs, *a, **k):
            seen[id(sub)].append(tuple(inputs.shape))
            return bound(inputs, *a, **k)
        object.__setattr__(sub, "call", call)

    for sub in watched:
        watch(sub)
    try:
        backend.compute_output_spec(layer.call, *args, **kwargs)
    finally:
        for sub in watched:
            object.__delattr__(sub, "call")
    return seen


EXTRA_BUILD_STATE = "_convrewrite_build_state"  # {key: state} a layer's build config carries
_BUILD_RESTORERS = {}  # key -> restore(layer, state, build), see hook_build_config


def hook_build_config(key: str, restore) -> None:
    """Make Keras build configs carry extra state, so a `.keras` file keeps it and loading applies it.

    A layer given state under `key` (`set_build_state`) saves it in its build config (what get_build_config
    returns and a `.keras` file stores per layer and model); loading such a config calls
    `restore(layer, state, build)` before the layer's weights are read, where `build()` builds the layer as
    Keras would (restore calls it where it needs the layer built first; it runs once). Wraps
    keras.layers.Layer's get_build_config and Layer's and keras.Model's build_from_config, once; a config
    without a hooked key goes through unchanged. A class overriding these methods without calling super() is
    not reached (see `carries_build_state`); Keras calls build_from_config only for layers not built by their
    constructor (a Functional model is: see `hook_loaded_model`)."""
    import keras

    _BUILD_RESTORERS[key] = restore

    def wrap_get(original):
        def get_build_config(self):
            config = original(self)
            states = getattr(self, EXTRA_BUILD_STATE, None)
            return {**(config or {}), **states} if states else config
        get_build_config.convrewrite_wrapped = True
        return get_build_config

    def wrap_build(original):
        def build_from_config(self, config):
            ours = {k: v for k, v in (config or {}).items() if k in _BUILD_RESTORERS}
            if not ours:
                return original(self, config)
            plain = {k: v for k, v in config.items() if k not in ours}
            object.__setattr__(self, EXTRA_BUILD_STATE, dict(ours))
            built = []

            def build():
                if not built:
                    built.append(original(self, plain))
            for k, state in ours.items():
                _BUILD_RESTORERS[k](self, state, build)
            build()
        build_from_config.convrewrite_wrapped = True
        return build_from_config

    layer_cls, model_cls = keras.layers.Layer, keras.Model
    if not getattr(layer_cls.get_build_config, "convrewrite_wrapped", False):
        layer_cls.get_build_config = wrap_get(layer_cls.get_build_config)
    for cls in (layer_cls, model_cls):
        if not getattr(cls.__dict__["build_from_config"], "convrewrite_wrapped", False):
            cls.build_from_config = wrap_build(cls.__dict__["build_from_config"])


def carries_build_state(layer) -> bool:
    """Whether `layer`'s class saves and restores extra build state through `hook_build_config`: False where
    it overrides get_build_config or build_from_config (which may not reach Keras's own)."""
    return all(getattr(getattr(type(layer), name), "convrewrite_wrapped", False)
               for name in ("get_build_config", "build_from_config"))


def set_build_state(layer, key: str, state) -> None:
    """Give `layer` extra build state under `key` for its build config to carry (see hook_build_config)."""
    states = dict(getattr(layer, EXTRA_BUILD_STATE, None) or {})
    states[key] = state
    object.__setattr__(layer, EXTRA_BUILD_STATE, states)


def hook_loaded_model(key: str, restore) -> None:
    """Let the model a `.keras` file holds be replaced as it loads: where the outermost model's build config
    carries state under `key` (`set_build_state`), `restore(model, state)` gets the model Keras deserialized
    and returns the model whose weights the file then fills (saving_lib's deserialize_keras_object, wrapped
    once). For models whose constructor builds them, so that Keras never calls their build_from_config."""
    from keras.src.saving import saving_lib

    original = saving_lib.deserialize_keras_object
    if getattr(original, "convrewrite_wrapped", False):
        return

    def deserialize_keras_object(config, *args, **kwargs):
        obj = original(config, *args, **kwargs)
        build_config = config.get("build_config") if isinstance(config, dict) else None
        state = build_config.get(key) if isinstance(build_config, dict) else None
        return obj if state is None else restore(obj, state)
    deserialize_keras_object.convrewrite_wrapped = True
    saving_lib.deserialize_keras_object = deserialize_keras_object


# ---- export (layers/backend: transforms as constants of an exported artifact) ---------------------------
def hook_exports(context) -> None:
    """Run Keras's exports inside `context(fmt)` (a context-manager factory taking the format written):
    `keras.Model.export` (every format: SavedModel, ONNX, OpenVINO, LiteRT trace the model there) and the
    SavedModel archive's `write_out` (where a hand-built `keras.export.ExportArchive` traces its endpoints: the
    class that `ExportArchive()` makes on every backend derives from it). Wrapped once; what they do is
    otherwise unchanged."""
    import inspect

    import keras
    from keras.src.export.saved_model_export_archive import SavedModelExportArchive

    def wrap(original, format_of):
        def wrapped(*args, **kwargs):
            with context(format_of(*args, **kwargs)):
                return original(*args, **kwargs)
        wrapped.convrewrite_wrapped, wrapped.__wrapped__ = True, original
        wrapped.__doc__, wrapped.__name__ = original.__doc__, original.__name__
        return wrapped

    signature = inspect.signature(getattr(keras.Model.export, "__wrapped__", keras.Model.export))

    def export_format(*args, **kwargs):  # Model.export(self, filepath, format="tf_saved_model", ...)
        return signature.bind_partial(*args, **kwargs).arguments.get("format", "tf_saved_model")

    for cls, name, format_of in ((keras.Model, "export", export_format),
                                 (SavedModelExportArchive, "write_out", lambda *a, **k: "tf_saved_model")):
        if not getattr(getattr(cls, name), "convrewrite_wrapped", False):
            setattr(cls, name, wrap(getattr(cls, name), format_of))


# ---- reading variables past autocast (layers/fft.py) ---------------------------------------------------
def autocast_disabled():
    """A context in which a layer's float32 variables read as float32 under a mixed-precision policy
    (keras.src.backend.AutocastScope(None))."""
    from keras.src import backend

    return backend.AutocastScope(None)


# ---- the .weights.h5 layout (weights.py) ---------------------------------------------------------------
def weights_file_key(layer, used: dict) -> str:
    """The group a container's `save_weights` files `layer` under: its class name in snake case, numbered
    per class (saving_lib._get_unique_name over naming.to_snake_case)."""
    from keras.src.saving.saving_lib import _get_unique_name
    from keras.src.utils import naming

    return _get_unique_name(naming.to_snake_case(type(layer).__name__), used)


def h5_store(filepath, mode: str):
    """Keras's .weights.h5 store (saving_lib.H5IOStore), opened for "r" or "w"."""
    from keras.src.saving import saving_lib

    return saving_lib.H5IOStore(filepath, mode=mode)


def save_layer_state(layer, store, path: str, visited: set):
    """Write `layer`'s variables (and its sublayers') under `path` (saving_lib._save_state)."""
    from keras.src.saving import saving_lib

    saving_lib._save_state(layer, store, None, path, visited)


def load_layer_state(layer, store, path: str):
    """Read `layer`'s variables (and its sublayers') from `path` (saving_lib._load_state)."""
    from keras.src.saving import saving_lib

    saving_lib._load_state(layer, store, None, path, visited_saveables=set())


def confirm_overwrite(filepath) -> bool:
    """Keras's own overwrite prompt (io_utils.ask_to_proceed_with_overwrite)."""
    from keras.src.utils import io_utils

    return io_utils.ask_to_proceed_with_overwrite(filepath)


def call_kwargs(node) -> dict:
    """The keyword arguments a layer was called with at `node` (node.arguments.kwargs), e.g. training=True."""
    return dict(node.arguments.kwargs)
