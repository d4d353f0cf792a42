"""The rebuilt model keeps the original's class: a Functional subclass stays that subclass.

keras_hub's Backbones and Tasks and users' own Functional subclasses are a Functional graph plus what their
constructor adds: attributes (`pyramid_outputs`, `backbone`, `preprocessor`, constructor arguments) and
methods (a Task's `predict` runs its preprocessor first). Their constructors build their own layers, so a
rebuilt graph cannot go through them. Instead the instance is made without its constructor and initialised
as a Functional on the rebuilt graph (the call a Functional subclass's constructor ends in), and every
attribute the original's constructor set is carried over:

- a tensor of the original's graph becomes the rebuilt graph's tensor in its place (`pyramid_outputs`);
- a layer of the graph becomes its rebuilt counterpart (`backbone`, `output_dense`); a layer outside the graph
  (a Task's `preprocessor`) is copied from its config, or shared where it cannot be (the report says so);
- a set of layer ids (keras_hub's `_functional_layer_ids`) is mapped to the rebuilt layers' ids;
- containers are mapped item by item; other values are copied.

Compile state is not copied attribute by attribute: a compiled original's compile config compiles the new
instance again (a fresh optimizer, the same loss and metrics).

Why the class matters beyond `isinstance`: `fast.predict(raw_images)` of a Task must run the preprocessor, as
`classifier.predict` does; verification therefore also goes through `predict` for such models (verify.py).
"""

from __future__ import annotations

import copy
import types
from typing import Callable, List

from . import keras_internals as _keras

__all__ = ["keeps_class", "kept_instance", "overrides_predict"]

COMPILE_STATE = ("optimizer", "stop_training", "_compiled_trainable_state", "loss", "compiled")
"""Attributes `compile()` sets; carried over by compiling again, not by copying."""


def keeps_class(model) -> bool:
    """True for a model whose class is a Functional subclass other than convrewrite's own: the rebuild makes
    an instance of that class (plain Functional and Sequential models are rebuilt as Functional anyway)."""
    import keras

    functional = _keras.functional_class()
    cls = type(model)
    return (isinstance(model, functional) and cls is not functional and not isinstance(model, keras.Sequential)
            and not getattr(cls, "convrewrite_rebuilt_class", False))


def kept_instance(source, inputs, outputs, tensor_of: Callable, layer_of: Callable, copy_layer: Callable,
                  shared: List[str], dropped: List[str], prefix: str = ""):
    """An instance of `source`'s class computing `outputs` from `inputs` (a rebuilt graph), with `source`'s
    attributes carried over (see the module docstring).

    tensor_of(old KerasTensor) -> rebuilt tensor (KeyError where it has none); layer_of(old layer) -> the
    rebuilt layer, or None where the graph holds no such layer; copy_layer(layer, path) -> a copy with its
    weights, or the layer itself where it cannot be copied. Paths of layers kept as the same object are
    appended to `shared`, attributes that could not be carried (a tensor a rewrite removed) to `dropped`, each
    after `prefix` (where the model sits in an enclosing one). convrewrite's own attributes are not carried."""
    cls = type(source)
    new = cls.__new__(cls)
    _keras.functional_class().__init__(new, inputs=inputs, outputs=outputs, name=source.name,
                                       dtype=source.dtype_policy, trainable=source.trainable)
    carry = _Carry(source, tensor_of, layer_of, copy_layer, shared)
    for name, value in list(vars(source).items()):
        if (name in vars(new) or name in COMPILE_STATE or name.startswith("_compile")
                or name.lstrip("_").startswith("convrewrite_") or isinstance(value, types.MethodType)):
            continue
        try:
            mapped = carry(value, prefix + name)
        except _NotCarried as exc:
            dropped.append(f"{prefix}{name} ({exc})")
            continue
        setattr(new, name, mapped)
    config = source.get_compile_config() if getattr(source, "compiled", False) else None
    if config:  # what Model.compile_from_config does, also for classes overriding compile() (keras_hub Tasks)
        import keras

        new.compile(**keras.saving.deserialize_keras_object(config))
    return new


class _NotCarried(Exception):
    pass


class _Carry:
    """Maps one attribute value of the original onto the rebuilt model (see the module docstring)."""

    def __init__(self, source, tensor_of, layer_of, copy_layer, shared):
        self.source, self.tensor_of, self.layer_of, self.shared = source, tensor_of, layer_of, shared
        self.copy_layer = copy_layer
        self.layer_ids = {}  # id(old layer) -> id(new layer), for the layers mapped so far
        self.copies = {}  # id(old layer outside the graph) -> its copy, so an object held twice stays one

    def __call__(self, value, path: str):
        import keras

        if isinstance(value, keras.KerasTensor):
            try:
                return self.tensor_of(value)
            except KeyError:
                raise _NotCarried("its tensor is not in the rebuilt graph") from None
        if isinstance(value, keras.layers.Layer):
            return self._layer(value, path)
        if isinstance(value, dict):
            return {k: self(v, f"{path}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            items = [self(v, f"{path}/{i}") for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        if isinstance(value, (set, frozenset)) and value and all(isinstance(v, int) for v in value):
            ids = self._layer_ids()
            if value <= set(ids):
                return type(value)(ids[v] for v in value)
        try:
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - a value that cannot be copied (a lock, a module) is shared
            return value

    def _layer(self, layer, path: str):
        new = self.layer_of(layer)
        if new is not None:
            return new
        if id(layer) not in self.copies:
            copied = self.copy_layer(layer, path)
            if copied is layer and getattr(layer, "weights", None):
                self.shared.append(path)
            self.copies[id(layer)] = copied
        return self.copies[id(layer)]

    def _layer_ids(self) -> dict:
        """{id(old layer): id(new layer)} over the original's graph, nested models included."""
        if not self.layer_ids:
            for old in _keras.all_layers(self.source):
                new = self.layer_of(old)
                if new is not None:
                    self.layer_ids[id(old)] = id(new)
        return self.layer_ids


def overrides_predict(model) -> bool:
    """Whether `model.predict` may compute something else than calling the model: its class overrides
    predict / predict_step / make_predict_function (a keras_hub Task runs its preprocessor there)."""
    import keras

    cls = type(model)
    return any(getattr(cls, name, None) is not getattr(keras.Model, name, None)
               for name in ("predict", "predict_step", "make_predict_function"))
