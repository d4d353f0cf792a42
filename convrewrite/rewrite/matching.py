"""What the rewrite patterns ask of a walked graph (graph.ModelGraph): who reads a tensor, whether a layer is
called once, which conv layout a layer has, its weights as float64 numpy arrays.

Node keys are the ModelGraph's ("layer name:call index"); each pattern matches in one graph (nested models
are rewritten on their own: nested.py)."""

from __future__ import annotations

from typing import List, Optional

import numpy as np

from .. import keras_internals
from . import kernels

FOLDABLE_DTYPES = ("float32", "float64")  # folding rounds differently in half precision


def conv_layout(layer) -> Optional[str]:
    """kernels.CONV / DEPTHWISE / TRANSPOSE for Keras's own conv layers (exact types: a subclass may compute
    something else), None for anything else (separable convs included: two kernels)."""
    import keras

    L = keras.layers
    table = {L.Conv1D: kernels.CONV, L.Conv2D: kernels.CONV, L.Conv3D: kernels.CONV,
             L.DepthwiseConv1D: kernels.DEPTHWISE, L.DepthwiseConv2D: kernels.DEPTHWISE,
             L.Conv1DTranspose: kernels.TRANSPOSE, L.Conv2DTranspose: kernels.TRANSPOSE,
             L.Conv3DTranspose: kernels.TRANSPOSE}
    return table.get(type(layer))


def is_linear(layer) -> bool:
    """The layer applies no activation (None / "linear")."""
    import keras

    return getattr(layer, "activation", None) in (None, keras.activations.linear)


def numpy(variable):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def calls(mg, op) -> int:
    """How often `op` is called in `mg`, counting a call inside a nested model as another use."""
    own = sum(1 for _, d in mg.graph.nodes(data=True) if d["op"] is op)
    nested = sum(1 for child in mg.children.values() for layer in child.layers.values() if layer is op)
    return own + nested


def output_tensor(mg, key):
    return mg.graph.nodes[key]["node"].outputs[0]


def readers(mg, key) -> List[str]:
    """The node keys that read any output of node `key`, one entry per tensor position read."""
    return [v for v in mg.graph.successors(key) for _ in mg.graph[key][v]["tensors"]]


def is_model_output(mg, key) -> bool:
    import keras

    outputs = keras.tree.flatten(keras_internals.io_structs(mg.model)[1])
    return any(id(t) == id(o) for t in mg.graph.nodes[key]["node"].outputs for o in outputs)


def sole_reader(mg, key) -> Optional[str]:
    """The one node reading node `key`'s output, if exactly one reads it once and it is no model output."""
    found = readers(mg, key)
    if len(found) != 1 or is_model_output(mg, key) or len(mg.graph.nodes[key]["node"].outputs) != 1:
        return None
    return found[0]


def producer_key(mg, key, position: int = 0) -> Optional[str]:
    """The node producing input `position` of node `key`."""
    for u in mg.graph.predecessors(key):
        if position in mg.graph[u][key]["tensors"]:
            return u
    return None


def input_tensor(mg, key, position: int = 0):
    return mg.graph.nodes[key]["node"].input_tensors[position]


def op(mg, key):
    return mg.graph.nodes[key]["op"]


def is_sum(mg, key) -> bool:
    """Node `key` adds its inputs elementwise: an `Add` layer, or a functional `x + y` / `keras.ops.add(x, y)`
    of two tensors (an ops node; a sum with a constant has one tensor input and is no branch sum)."""
    import keras

    operation = op(mg, key)
    if type(operation) is keras.layers.Add:
        return True
    node = mg.graph.nodes[key]["node"]
    return (type(operation) is keras_internals.ops_add_class() and len(node.input_tensors) == 2
            and not keras_internals.call_kwargs(node))


def same_float_dtype(*layers) -> bool:
    """Every layer computes and keeps its variables in one dtype that folding keeps exact to rounding."""
    dtypes = {str(layer.compute_dtype) for layer in layers} | {str(layer.variable_dtype) for layer in layers}
    return len(dtypes) == 1 and dtypes.pop() in FOLDABLE_DTYPES


def inference_bn(mg, key) -> bool:
    """Node `key` is a BatchNormalization called once, not with training=True, without a mask: at
    inference it is an affine map per channel of its moving statistics."""
    import keras

    layer = op(mg, key)
    if type(layer) is not keras.layers.BatchNormalization or calls(mg, layer) != 1:
        return False
    kwargs = keras_internals.call_kwargs(mg.graph.nodes[key]["node"])
    return kwargs.get("training") is not True and kwargs.get("mask") is None


def bn_channel_axis_ok(bn, rank: int, data_format: str) -> bool:
    """The BN normalizes the channel axis of a rank-`rank` tensor in `data_format` (one axis only)."""
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    if axis is None:
        return False
    channel = 1 if data_format == "channels_first" else rank - 1
    return axis % rank == channel


def bn_affine(bn):
    """(s, t) of the BN at inference (see kernels.bn_scale_shift)."""
    return kernels.bn_scale_shift(numpy(bn.gamma) if bn.scale else None, numpy(bn.beta) if bn.center else None,
                                  numpy(bn.moving_mean), numpy(bn.moving_variance), bn.epsilon)


def conv_weights(layer):
    """(kernel, bias or None) as float64."""
    kernel = numpy(layer.kernel)
    return kernel, (numpy(layer.bias) if layer.use_bias else None)


def new_conv(layer, weights, **changes):
    """A layer of `layer`'s class and name with config `changes`, its weights set on first call: returns
    call(x) -> output tensor."""
    from ..graph import live_config

    config = live_config(layer)
    config.update(changes)
    new = type(layer).from_config(config)

    def call(x):
        y = new(x)
        new.set_weights([np.asarray(w, layer.variable_dtype) for w in weights])
        return y

    return call
