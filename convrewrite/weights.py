"""Weight files shared between an original model and its optimized version.

Keras keys the entries of a `.weights.h5` file by layer *class* and position ("layers/conv2d_1/vars"), not by
layer name, so a file written by the original model does not fit a rewritten one (an FFTConv2D is filed as
"fft_conv2d", and every later Conv2D moves up one position), and loading it fails inside Keras or, where
shapes happen to line up, gives a layer another layer's weights.

An optimized model (`RewrittenModel`, what `convrewrite.optimize` / `build` return) therefore reads and writes
weight files in the *original's* layout: it records, per layer, where the original model files that layer's
variables, and its `save_weights` / `load_weights` use that record. So, both ways:

    original.save_weights("w.weights.h5"); fast.load_weights("w.weights.h5")
    fast.save_weights("w.weights.h5");     original.load_weights("w.weights.h5")

work weight for weight by layer identity. A file that does not fit (another architecture) is rejected, before
any variable is assigned, with one `WeightFileError` naming the layer and the file. Between models of
different architectures, `transfer_weights(source, target)` copies weights by layer name.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from . import keras_internals
from .errors import WeightFileError

__all__ = ["RewrittenModel", "WeightFileError", "keep_weight_layout", "transfer_weights", "weight_layout"]


def _own_variables(layer) -> List:
    """The variables `layer.save_own_variables` writes, in its order (its own, not its sublayers')."""
    store = {}
    layer.save_own_variables(store)
    return [store[k] for k in sorted(store, key=lambda k: int(k) if str(k).isdigit() else str(k))]


def _keras_h5_paths(model, prefix: str = "", out=None, visited=None) -> Dict[int, str]:
    """{id(layer): group path} where `model.save_weights` files each layer, nested models included.

    Mirrors keras.src.saving.saving_lib._save_container_state for the `layers` of a Functional or
    Sequential model: each layer is filed under the snake-cased name of its class, numbered per class in
    the order of `model.layers` (the number is taken even by a layer already filed elsewhere)."""
    import keras

    out = {} if out is None else out
    visited = set() if visited is None else visited
    used = {}
    for layer in model.layers:
        key = keras_internals.weights_file_key(layer, used)
        if id(layer) in visited:
            continue
        visited.add(id(layer))
        path = f"{prefix}layers/{key}"
        out[id(layer)] = path
        if isinstance(layer, keras.Model):
            inner = getattr(layer, "_convrewrite_weight_layout", None)
            if inner is not None:  # an optimized model nested in another: its own record, under its group
                by_path = _layers_by_path(layer)
                for entry in inner:
                    if entry["layer"] in by_path:
                        out.setdefault(id(by_path[entry["layer"]]), f"{path}/{entry['h5']}")
            else:
                _keras_h5_paths(layer, path + "/", out, visited)
    return out


def _layers_by_path(model) -> dict:
    from .graph import walk

    return walk(model).layers


def weight_layout(model) -> List[dict]:
    """Where `model`'s weight files keep each layer's variables:
    [{"layer": path in the model ("inner/conv"), "h5": group in the file, "shapes": [variable shapes]}].

    For an optimized model, the layout of the model it was built from (so optimizing twice still reads and
    writes the first original's files)."""
    recorded = getattr(model, "_convrewrite_weight_layout", None)
    if recorded is not None:
        return [dict(e) for e in recorded]
    import keras

    h5 = _keras_h5_paths(model)
    layout, seen = [], set()
    for path, layer in _layers_by_path(model).items():
        if id(layer) in seen or isinstance(layer, keras.Model) or id(layer) not in h5:
            continue
        seen.add(id(layer))
        layout.append({"layer": path, "h5": h5[id(layer)],
                       "shapes": [list(v.shape) for v in _own_variables(layer)]})
    return layout


def _fit(value, shape, what, relayout=False):
    """value as `shape`: it must have that shape, or, with relayout=True, the same number of values, which are
    then read again in the same order. relayout is only passed where the two layers are known to lay the same
    weights out differently: a grouped Conv2D kernel (kh, kw, 1, C*M) holds exactly a DepthwiseConv2D kernel
    (kh, kw, C, M) in the same order, which is how the `depthwise` implementation maps weights."""
    value = np.asarray(value)
    shape = tuple(int(d) for d in shape)
    if value.shape == shape:
        return value
    if relayout and value.size == int(np.prod(shape)):
        return value.reshape(shape)
    raise WeightFileError(what(value.shape, shape))


def _depthwise_pair(a, b) -> bool:
    """a and b are a grouped Conv2D with one input channel per group and a DepthwiseConv2D (either order)."""
    import keras

    def grouped(layer):
        return isinstance(layer, keras.layers.Conv2D) and getattr(layer, "groups", 1) > 1 and \
            _own_variables(layer)[0].shape[2] == 1

    dw = keras.layers.DepthwiseConv2D
    return (isinstance(a, dw) and grouped(b)) or (isinstance(b, dw) and grouped(a))


def _layer_entries(model):
    """(entry, layer) for every recorded layer of `model`, failing clearly on a layer the record lacks."""
    by_path = _layers_by_path(model)
    out = []
    for entry in model._convrewrite_weight_layout:
        layer = by_path.get(entry["layer"])
        if layer is None:
            raise WeightFileError(
                f"Optimized model '{model.name}' has no layer '{entry['layer']}' although its weight layout names "
                f"it; expected a model built by convrewrite.optimize / build (rebuild it rather than editing it).")
        out.append((entry, layer))
    return out


def _not_in_original_layout(model, entry, layer, count):
    shapes = entry["shapes"]
    return (f"Layer '{entry['layer']}' ({type(layer).__name__}) of optimized model '{model.name}' holds {count} "
            f"variables ({[list(v.shape) for v in _own_variables(layer)]}) where the original layer held {len(shapes)} "
            f"({shapes}), so its weights have no place in the original model's weight files (a PAC layer learns "
            f"weights the original lacks); save and load this model whole with model.save('m.keras') and "
            f"keras.models.load_model instead.")


def save_weights(model, filepath, overwrite=True):
    """Write `model`'s weights in the layout of the model it was built from (see the module docstring)."""

    filepath = os.fspath(filepath)
    if not filepath.endswith(".weights.h5"):
        raise WeightFileError(
            f"Received weight file '{filepath}' for optimized model '{model.name}'; expected a name ending in "
            f"'.weights.h5' (sharded files are not supported: save the whole model with model.save('m.keras')).")
    if not model.built:
        raise ValueError(f"Model '{model.name}' is not built; expected a built model before save_weights.")
    if os.path.exists(filepath) and not overwrite and not keras_internals.confirm_overwrite(filepath):
        return
    entries = _layer_entries(model)
    store = keras_internals.h5_store(filepath, "w")
    try:
        visited = set()
        for entry, layer in entries:
            variables = _own_variables(layer)
            shapes = [tuple(s) for s in entry["shapes"]]
            if [tuple(v.shape) for v in variables] == shapes:
                keras_internals.save_layer_state(layer, store, entry["h5"], visited)
                continue
            if len(variables) != len(shapes):
                raise WeightFileError(_not_in_original_layout(model, entry, layer, len(variables)))
            store.make(entry["h5"], metadata={"name": layer.name})
            for i, (v, shape) in enumerate(zip(variables, shapes)):
                store[str(i)] = _fit(np.asarray(v), shape, lambda have, want: (
                    f"Layer '{entry['layer']}' variable {i} has shape {have}, which cannot be written as the "
                    f"original's {want}; save the whole model with model.save('m.keras') instead."), relayout=True)
            visited.add(id(layer))
    finally:
        store.close()


def load_weights(model, filepath, skip_mismatch=False):
    """Read a weight file in the layout of the model `model` was built from: every layer's variables are read
    and checked first, and only when all fit are they assigned (never a partial load)."""

    filepath = os.fspath(filepath)
    if skip_mismatch:
        raise WeightFileError(
            f"Received skip_mismatch=True for optimized model '{model.name}'; expected False: it loads all weights or "
            f"none. To load part of another model's weights, use convrewrite.transfer_weights(source, target).")
    if not filepath.endswith(".weights.h5"):
        raise WeightFileError(
            f"Received weight file '{filepath}' for optimized model '{model.name}'; expected a '.weights.h5' file "
            f"saved by the original model or by this one (for a '.keras' file, load it with "
            f"keras.models.load_model and copy with convrewrite.transfer_weights(loaded, model)).")
    if not os.path.exists(filepath):
        raise WeightFileError(f"Weight file '{filepath}' does not exist; expected a path to a '.weights.h5' file.")
    store = keras_internals.h5_store(filepath, "r")
    try:
        staged = []
        for entry, layer in _layer_entries(model):
            variables = _own_variables(layer)
            group = store.get(entry["h5"])
            keys = sorted(group.keys(), key=lambda k: int(k) if str(k).isdigit() else str(k))
            if len(variables) != len(entry["shapes"]):
                raise WeightFileError(_not_in_original_layout(model, entry, layer, len(variables)))
            if len(keys) != len(variables):
                raise WeightFileError(
                    f"Weight file '{filepath}' does not fit optimized model '{model.name}': layer '{entry['layer']}' "
                    f"({type(layer).__name__}) holds {len(variables)} variables but the file has {len(keys)} at "
                    f"'{entry['h5']}' (where the original model keeps that layer); expected a file saved by the "
                    f"original model or by this one. Nothing was loaded. Between different architectures, copy "
                    f"weights by layer name with convrewrite.transfer_weights(source_model, target_model).")
            values = []
            for i, (k, v, original) in enumerate(zip(keys, variables, entry["shapes"])):
                # the file must hold the original layer's shape exactly; it is then laid out as this layer's
                # (the same values, e.g. a depthwise kernel; the mapping was fixed when the model was built)
                stored = _fit(np.asarray(group[k]), tuple(original), lambda have, want: (
                    f"Weight file '{filepath}' does not fit optimized model '{model.name}': layer '{entry['layer']}' "
                    f"variable {i} has shape {want} in the original model but the file holds {have} at "
                    f"'{entry['h5']}'; expected a file saved by the original model or by this one. Nothing was loaded."))
                values.append(_fit(stored, tuple(v.shape), lambda have, want: _not_in_original_layout(
                    model, entry, layer, len(variables)), relayout=True))
            staged.append((entry, layer, values, [tuple(v.shape) for v in variables] == [tuple(s) for s in entry["shapes"]]))
        for entry, layer, values, same_shapes in staged:
            if same_shapes:  # Keras's own loader: also restores sub-objects' state (e.g. a Dropout's seed)
                keras_internals.load_layer_state(layer, store, entry["h5"])
            else:
                layer.load_own_variables({str(i): v for i, v in enumerate(values)})
    finally:
        store.close()


def transfer_weights(source, target):
    """Copy every layer's weights from `source` to `target` by layer name (path, for nested models).

    For models of different architectures that share layer names, e.g. an original and an optimized model
    in either direction, or a model re-optimized on another device. Every layer of `target` that holds
    weights must have a same-named layer in `source` with as many variables of fitting shapes; otherwise
    a WeightFileError names it and nothing is copied. Returns the names copied."""
    import keras

    src = _layers_by_path(source)
    staged, copied = [], []
    for path, layer in _layers_by_path(target).items():
        if isinstance(layer, keras.Model) or any(layer is s[0] for s in staged):
            continue
        dst_vars = _own_variables(layer)
        if not dst_vars:
            continue
        other = src.get(path)
        if other is None:
            raise WeightFileError(
                f"Model '{source.name}' has no layer '{path}' to copy into layer '{path}' of model '{target.name}'; "
                f"expected models whose layers share names (e.g. an original and its optimized version). Nothing "
                f"was copied.")
        src_vars = _own_variables(other)
        if len(src_vars) != len(dst_vars):
            raise WeightFileError(
                f"Layer '{path}' holds {len(src_vars)} variables in model '{source.name}' but {len(dst_vars)} in model "
                f"'{target.name}'; expected the same layer in both. Nothing was copied.")
        values = [_fit(np.asarray(s), tuple(d.shape), lambda have, want: (
            f"Layer '{path}' has a variable of shape {have} in model '{source.name}' but {want} in model "
            f"'{target.name}'; expected the same layer in both. Nothing was copied."), relayout=_depthwise_pair(other, layer))
            for s, d in zip(src_vars, dst_vars)]
        staged.append((layer, values))
        copied.append(path)
    for layer, values in staged:
        layer.load_own_variables({str(i): v for i, v in enumerate(values)})
    return copied


def keep_weight_layout(model, layout) -> None:
    """Give `model`, an instance of the original's own class (see convrewrite.model_class), the weight files of
    a RewrittenModel: its `save_weights` / `load_weights` use the original's layout `layout`."""
    import types

    object.__setattr__(model, "_convrewrite_weight_layout", [dict(e) for e in layout])
    object.__setattr__(model, "save_weights", types.MethodType(save_weights, model))
    object.__setattr__(model, "load_weights", types.MethodType(load_weights, model))


def _functional_base():
    return keras_internals.functional_class()


def _make_model_class():
    import keras

    @keras.saving.register_keras_serializable(package="convrewrite")
    class RewrittenModel(_functional_base()):
        """A Functional model built by convrewrite (optimize / build): an ordinary keras.Model whose weight
        files use the layout of the model it was built from (see convrewrite.weights), so checkpoints of the
        original load into it and its checkpoints load into the original."""

        convrewrite_rebuilt_class = True  # rebuilt as a graph, not kept as a user's class (see model_class)

        def __init__(self, *args, convrewrite_weight_layout=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._convrewrite_weight_layout = None if convrewrite_weight_layout is None else [
                dict(e) for e in convrewrite_weight_layout]

        def save_weights(self, filepath, overwrite=True, max_shard_size=None):
            if max_shard_size is not None:
                raise WeightFileError(
                    f"Received max_shard_size={max_shard_size!r} for optimized model '{self.name}'; expected None "
                    f"(its weight files use the original model's layout in one '.weights.h5' file).")
            if self._convrewrite_weight_layout is None:
                return super().save_weights(filepath, overwrite=overwrite)
            save_weights(self, filepath, overwrite=overwrite)

        def load_weights(self, filepath, skip_mismatch=False, **kwargs):
            if self._convrewrite_weight_layout is None:
                return super().load_weights(filepath, skip_mismatch=skip_mismatch, **kwargs)
            load_weights(self, filepath, skip_mismatch=skip_mismatch)

        def get_config(self):
            config = super().get_config()
            if self._convrewrite_weight_layout is not None:
                config["convrewrite_weight_layout"] = [dict(e) for e in self._convrewrite_weight_layout]
            return config

    return RewrittenModel


RewrittenModel = _make_model_class()
