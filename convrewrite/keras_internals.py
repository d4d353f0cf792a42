"""Every private Keras API convrewrite relies on, in one small adapter.

Keras has no public API for a Functional model's node graph, for the layout of `.weights.h5` files, or for
reading a variable past a mixed-precision autocast; these wrappers name what each private attribute is for.
Checked against Keras 3.10 to 3.15: a Keras upgrade that moves one of them breaks here, and only here.
"""

from __future__ import annotations


# ---- the Functional node graph (graph.py) ------------------------------------------------------------
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


def unsafe_deserialization():
    """A context in which from_config may rebuild Lambda layers (serialization_lib.SafeModeScope(False)):
    re-creating a layer that already lives in this process is no deserialization risk."""
    from keras.src.saving import serialization_lib

    return serialization_lib.SafeModeScope(False)


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
