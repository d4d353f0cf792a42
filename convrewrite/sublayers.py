"""Convolutions held inside custom layers and subclassed models: find them, and swap them on a copy.

A Functional graph shows every layer it calls; a custom layer (or a subclassed model) shows only itself:
the Conv2D it holds in an attribute, a list or a dict is called from Python inside its `call()`. This module
finds such sublayers wherever they are held (recursively), names each by where it is held
("attn/proj", "convs/0"), and builds a copy of the holding layer in which chosen sublayers are swapped for
drop-in replacements (layers called with the same input, computing the same output), weights copied.

It knows nothing of which replacements exist: callers pass the replacement layers (graph.py, through the
registry's implementations). Functional and Sequential models met inside a custom layer are listed, not
entered: their graph, not their attributes, says what they call (graph.py walks it, and swaps the rebuilt
model in). A copy records its swaps in its build config, and loading a `.keras` file swaps them back in
(`record_swaps` / `restore_swaps`, through keras_internals.hook_build_config).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import keras_internals as _keras
from .errors import UnsupportedModelError

Step = Tuple[str, object]  # ("attr", name) or ("item", list index / dict key)
_NOT_STATE = ("_layers", "_tracker", _keras.EXTRA_BUILD_STATE)  # bookkeeping, not where sublayers are held
SWAPS_KEY = "convrewrite_swaps"
"""The key under which a copy's build config (so its `.keras` file) lists its swapped sublayers."""


def is_graph_model(layer) -> bool:
    """True for Sequential and Functional models, whose graph (not their attributes) says what they call."""
    return isinstance(layer, _keras.functional_class()) or _is_sequential(layer)


def _is_sequential(layer) -> bool:
    import keras

    return isinstance(layer, keras.Sequential)


def path_of(steps) -> str:
    """'attn/proj', 'convs/0' for the steps that reach a sublayer."""
    return "/".join(str(key) for _, key in steps)


def held_sublayers(layer, is_site: Callable[[object], bool], everything: bool = False) -> List[Tuple[tuple, object]]:
    """[(steps, sublayer)] for every sublayer of `layer` that `is_site` accepts, and every graph model it
    holds (not entered: walk its graph), at any depth, in Keras's order, each once; `steps` say where it is
    held, from `layer` down; with `everything`, every other sublayer too."""
    out, seen = [], set()

    def visit(holder, prefix):
        for sub in _keras.tracked_sublayers(holder):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            steps = prefix + _steps_to(holder, sub)
            if is_site(sub) or is_graph_model(sub):
                out.append((steps, sub))
            else:
                if everything:
                    out.append((steps, sub))
                visit(sub, steps)

    if not is_graph_model(layer):
        visit(layer, ())
    return out


def every_sublayer(layer) -> List[Tuple[tuple, object]]:
    """[(steps, sublayer)] for every layer `layer` tracks, at any depth, each once (graph models listed, not
    entered): so each can be addressed by its path, e.g. to copy weights by name."""
    return held_sublayers(layer, lambda sub: False, everything=True)


def _steps_to(holder, sub) -> tuple:
    """The first attribute path of `holder` (public attributes first) that holds `sub`."""
    names = [n for n in vars(holder) if n not in _NOT_STATE]
    for name in sorted(names, key=lambda n: n.startswith("_")):
        found = _find_in(getattr(holder, name, None), sub)
        if found is not None:
            return (("attr", name),) + found
    return (("attr", sub.name),)  # tracked but held nowhere we can name: its own name


def _find_in(value, target) -> Optional[tuple]:
    if value is target:
        return ()
    if isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
    else:
        return None
    for key, item in items:
        found = _find_in(item, target)
        if found is not None:
            return (("item", key),) + found
    return None


def locate(layer, steps) -> Tuple[object, object]:
    """(holder, sublayer): what `steps` reach from `layer`, and the deepest layer holding it."""
    import keras

    holder, obj = layer, layer
    for kind, key in steps:
        if isinstance(obj, keras.layers.Layer):
            holder = obj
        try:
            obj = getattr(obj, key) if kind == "attr" else obj[key]
        except (AttributeError, KeyError, IndexError, TypeError):
            return holder, None
    return holder, obj


def swap(holder, old, new) -> None:
    """Put `new` wherever `holder` holds `old` (attributes, lists, dicts, tuples) and in Keras's tracking."""
    _keras.replace_tracked_sublayer(holder, old, new)
    for name, value in list(vars(holder).items()):
        if name in _NOT_STATE:
            continue
        replaced = _replaced(value, old, new)
        if replaced is not value:
            setattr(holder, name, replaced)


def _replaced(value, old, new):
    """`value` with `old` replaced by `new`: lists and dicts edited in place, tuples rebuilt (returned)."""
    if value is old:
        return new
    if isinstance(value, list):
        for i, item in enumerate(value):
            r = _replaced(item, old, new)
            if r is not item:
                list.__setitem__(value, i, r)
    elif isinstance(value, dict):
        for key, item in list(value.items()):
            r = _replaced(item, old, new)
            if r is not item:
                dict.__setitem__(value, key, r)
    elif isinstance(value, tuple) and not hasattr(value, "_fields"):
        items = [_replaced(item, old, new) for item in value]
        if any(a is not b for a, b in zip(items, value)):
            return type(value)(items)
    return value


class SwappedCopy:
    """How one holding layer was copied: which of its sublayers were swapped, and how to move the weights.

    swaps: {id(original sublayer): (transfer, spec)} where transfer(old, new, spec) copies the original
    sublayer's weights into its built replacement (an Implementation's transfer_weights); None where the
    replacement already holds them (a graph model rebuilt with its weights)."""

    def __init__(self, swaps: Dict[int, tuple]):
        self.swaps = swaps

    def transfer_weights(self, old, new, spec=None) -> None:
        """Copy every weight of `old` into its built copy `new`, layer by layer (a swapped sublayer stands
        where the original stood): swapped ones through their transfer, the rest as they are."""
        for o, n in self._pairs(old, new, set()):
            if id(o) in self.swaps:
                transfer, spec = self.swaps[id(o)]
                if transfer is not None:
                    build_like(n, o)  # where the holder's call never reached it
                    transfer(o, n, spec)
            elif type(o) is not type(n):
                raise UnsupportedModelError(
                    f"Layer '{old.name}' ({type(old).__name__}) copied from its config holds a {type(n).__name__} "
                    f"where the original holds {type(o).__name__} '{o.name}'; expected get_config() to re-create "
                    f"the same sublayers in the same order.")
            else:
                copy_own_variables(o, n)

    def _pairs(self, old, new, seen):
        """(original, copy) for `old` and every layer it tracks, matched by position, each once; a swapped
        sublayer's own sublayers are its replacement's business."""
        if id(old) in seen:
            return
        seen.add(id(old))
        yield old, new
        if id(old) in self.swaps:
            return
        olds, news = _keras.tracked_sublayers(old), _keras.tracked_sublayers(new)
        if len(olds) != len(news):
            raise UnsupportedModelError(
                f"Layer '{old.name}' ({type(old).__name__}) copied with swapped sublayers holds {len(news)} layers "
                f"where the original holds {len(olds)}; expected get_config() to re-create the same sublayers.")
        for o, n in zip(olds, news):
            yield from self._pairs(o, n, seen)


def copy_own_variables(old, new) -> None:
    """Copy the variables `old` owns itself (not its sublayers') into `new`, by value."""
    import keras

    store = {}
    old.save_own_variables(store)
    if not store:
        return
    try:
        new.load_own_variables({k: np.array(keras.ops.convert_to_numpy(v)) for k, v in store.items()})
    except ValueError as exc:
        raise UnsupportedModelError(
            f"Layer '{old.name}' ({type(old).__name__}) re-created from config has weights that do not match the "
            f"original's ({str(exc).splitlines()[0]}); expected get_config() to describe the layer fully.") from exc


def build_like(new, old) -> None:
    """Build `new` as `old` was built (its recorded build shapes), where it is not built yet."""
    config = old.get_build_config() if getattr(old, "built", False) else None
    if getattr(new, "built", False) or not config:
        return
    new.build_from_config(config)
    shape = config.get("input_shape")
    if not new.built and shape is not None:  # a subclassed model's build runs call() yet stays unbuilt: call it
        new(symbolic_inputs(shape, getattr(old, "input_dtype", None)))


def symbolic_inputs(shape, dtype=None):
    """keras.KerasTensor(s) for a recorded input shape: one shape, or a list / dict of them (several inputs)."""
    import keras

    if isinstance(shape, dict):
        return {k: symbolic_inputs(v, dtype) for k, v in shape.items()}
    if all(d is None or isinstance(d, int) for d in shape):
        return keras.KerasTensor(tuple(shape), dtype=dtype)
    return [symbolic_inputs(s, dtype) for s in shape]


# ---- saving and loading the swaps --------------------------------------------------------------------
def record_swaps(new, swapped) -> bool:
    """Make the build config of `new` (a copy with swapped sublayers) list them, so that a `.keras` file
    of a model holding it loads with the replacements: [(steps, replacement layer)]. Returns False where
    its class keeps Keras's build config from carrying them (it then loads with its plain sublayers)."""
    import keras

    if not _keras.carries_build_state(new):
        return False
    state = [{"steps": [list(step) for step in steps], "layer": keras.saving.serialize_keras_object(layer)}
             for steps, layer in swapped]
    _keras.set_build_state(new, SWAPS_KEY, state)
    return True


def restore_swaps(layer, state, build) -> None:
    """On loading: swap the recorded replacements into `layer` (re-created from its config) before Keras
    reads the weights, which the file holds in the replacements' layout. `build()` builds `layer` first where
    a sublayer is made in build()."""
    import keras

    for entry in state:
        steps = tuple((kind, key) for kind, key in entry["steps"])
        holder, sub = locate(layer, steps)
        if sub is None:
            build()
            holder, sub = locate(layer, steps)
        if sub is None:
            raise UnsupportedModelError(
                f"Layer '{layer.name}' ({type(layer).__name__}) loaded from its config holds no sublayer at "
                f"'{path_of(steps)}', where its saved optimized version held a replacement; expected the same "
                f"class as when it was saved.")
        swap(holder, sub, keras.saving.deserialize_keras_object(entry["layer"]))


_keras.hook_build_config(SWAPS_KEY, restore_swaps)
