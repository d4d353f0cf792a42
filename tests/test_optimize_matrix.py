"""The optimize-path matrix: every implementation forced in turn through `convrewrite.optimize(model, plan=plan)`.

Each cell is (model, implementation): the model gets random non-zero weights *and biases*, every site the
implementation applies to is forced to it, and the optimized model is compared with the original model and
with a numpy forward pass written here from `convrewrite.reference`'s conv oracles (not from
`reference.spec_forward`, which the verifier itself uses). A cell also checks that nothing fell back: a
replacement that verify rejected would otherwise be replaced by `direct` and pass silently.

By default every composite model runs with every implementation, plus a seeded sample of single-layer cells; set
CONVREWRITE_FULL_MATRIX=1 to run all of them.
"""

import os
import random

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import reference
from convrewrite.layers.fft import FFTConv2D, FFTDepthwiseConv2D
from convrewrite.layers.pac import PacConv2D
from convrewrite.layers.wide import WideDepthwiseConv2D
from convrewrite.verify import random_inputs
from conftest import rel_error

FULL = os.environ.get("CONVREWRITE_FULL_MATRIX", "0") not in ("", "0")
IMPLS = ("depthwise", "depthwise-wide", "fft", "fft-tiled", "pac")
TOL = 1e-5  # float32, normwise relative (verify's default for float32)


# ---- numpy forward of the models below, from the original layers' configs and weights ----------------
def np_act(name, y):
    if name == "relu":
        return np.maximum(y, 0.0)
    assert name == "linear", name
    return y


def np_conv(layer, x):
    """What `layer` (a Keras Conv2D / DepthwiseConv2D) computes on x, in float64 numpy."""
    cfg = layer.get_config()
    w = [np.asarray(v, np.float64) for v in layer.get_weights()]
    bias = w[1] if cfg["use_bias"] else None
    cf = cfg["data_format"] == "channels_first"
    x = np.asarray(x, np.float64)
    if cf:
        x = x.transpose(0, 2, 3, 1)
    common = dict(strides=cfg["strides"], padding=cfg["padding"], dilation=cfg["dilation_rate"])
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        y = reference.depthwise_conv2d(x, w[0], bias, **common)
    else:
        y = reference.conv2d(x, w[0], bias, groups=cfg["groups"], **common)
    y = np_act(cfg["activation"], y)
    return y.transpose(0, 3, 1, 2) if cf else y


# ---- the models ---------------------------------------------------------------------------------------
SINGLE = {  # the configurations of tests/test_graph.py::test_conv_configurations, plus a few more
    "s2": lambda: keras.layers.Conv2D(5, 3, strides=2, padding="same", name="s2"),
    "d2": lambda: keras.layers.Conv2D(5, 3, dilation_rate=2, padding="same", name="d2"),
    "valid": lambda: keras.layers.Conv2D(5, (4, 2), padding="valid", name="valid"),
    "g2": lambda: keras.layers.Conv2D(6, 3, groups=2, padding="same", name="g2"),
    "dw_grouped_nobias": lambda: keras.layers.Conv2D(12, 3, groups=6, strides=2, padding="same", use_bias=False,
                                                     name="dw_grouped_nobias"),
    "mult2": lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="mult2"),
    "dw_nobias": lambda: keras.layers.DepthwiseConv2D(5, strides=2, use_bias=False, name="dw_nobias"),
    # more: grouped+dilated (depthwise applies), an even kernel with SAME and strides, relu, channels_first
    "dw_dilated": lambda: keras.layers.Conv2D(6, 3, groups=6, dilation_rate=2, padding="same", name="dw_dilated"),
    "even_same_s2": lambda: keras.layers.Conv2D(4, (2, 4), strides=(2, 1), padding="same", activation="relu",
                                                name="even_same_s2"),
    "cf_dense": lambda: keras.layers.Conv2D(5, 3, padding="same", data_format="channels_first", name="cf_dense"),
    "cf_grouped": lambda: keras.layers.Conv2D(6, 3, groups=6, strides=2, padding="same",
                                              data_format="channels_first", name="cf_grouped"),
    # kernel widths in TF's slow depthwise band (depthwise-wide applies)
    "dw_wide": lambda: keras.layers.DepthwiseConv2D((3, 12), depth_multiplier=2, padding="same", name="dw_wide"),
    "dw_wide_valid_s2": lambda: keras.layers.DepthwiseConv2D((2, 12), strides=2, padding="valid", activation="relu",
                                                             name="dw_wide_valid_s2"),
    "cf_grouped_wide": lambda: keras.layers.Conv2D(6, (3, 13), groups=6, strides=2, padding="same",
                                                   data_format="channels_first", name="cf_grouped_wide"),
}


def single_model(key):
    layer = SINGLE[key]()
    cf = key.startswith("cf_")
    x = keras.Input((6, 11, 13) if cf else (11, 13, 6))
    model = keras.Model(x, layer(x))
    return model, lambda inputs: np_conv(model.get_layer(key), inputs)


def nested_model():
    """Nesting two levels deep; the inner block is called twice."""
    i0 = keras.Input((9, 9, 4))
    deep = keras.Model(i0, keras.layers.Conv2D(4, 3, padding="same", groups=4, name="deep_dw")(i0), name="deep")
    i1 = keras.Input((9, 9, 4))
    y = keras.layers.Conv2D(4, 5, padding="same", activation="relu", name="mid_conv")(deep(i1))
    block = keras.Model(i1, y, name="block")
    x = keras.Input((9, 9, 4))
    y = block(block(keras.layers.Conv2D(4, 3, padding="same", name="stem")(x)))
    model = keras.Model(x, y)

    def forward(inputs):
        dw, mid, stem = (block.get_layer("deep").get_layer("deep_dw"), block.get_layer("mid_conv"),
                         model.get_layer("stem"))
        y = np_conv(stem, inputs)
        for _ in range(2):
            y = np_conv(mid, np_conv(dw, y))
        return y

    return model, forward


def shared_model():
    """One conv layer called twice, and a grouped conv between."""
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    grouped = keras.layers.Conv2D(4, 3, padding="same", groups=4, name="grouped")
    x = keras.Input((10, 8, 4))
    model = keras.Model(x, shared(keras.layers.ReLU()(grouped(shared(x)))))

    def forward(inputs):
        s, g = model.get_layer("shared"), model.get_layer("grouped")
        return np_conv(s, np.maximum(np_conv(g, np_conv(s, inputs)), 0.0))

    return model, forward


def multi_io_model():
    a = keras.Input((10, 10, 4), name="image")
    b = keras.Input((10, 10, 2), name="aux")
    x = keras.layers.Concatenate()([a, b])
    x = keras.layers.Conv2D(6, 3, padding="same", groups=6, name="mix")(x)
    y1 = keras.layers.Conv2D(3, 3, name="head1")(x)
    y2 = keras.layers.Add(name="sum")([x, keras.layers.Conv2D(6, 1, name="aux_proj")(b)])
    model = keras.Model({"image": a, "aux": b}, {"seg": y1, "feat": y2})

    def forward(inputs):
        x = np_conv(model.get_layer("mix"), np.concatenate([inputs["image"], inputs["aux"]], axis=-1))
        return {"seg": np_conv(model.get_layer("head1"), x),
                "feat": x + np_conv(model.get_layer("aux_proj"), inputs["aux"])}

    return model, forward


MODELS = {**{k: (lambda k=k: single_model(k)) for k in SINGLE}, "nested": nested_model, "shared": shared_model,
          "multi_io": multi_io_model}


def randomize(model, rng):
    """Random non-zero weights and biases (biases as large as the outputs, so a lost or reordered bias shows)."""
    for w in model.weights:
        shape = tuple(w.shape)
        scale = 1.0 if len(shape) == 1 else 1.0 / np.sqrt(max(np.prod(shape[:-1]), 1))
        w.assign((rng.standard_normal(shape) * scale).astype("float32"))


# ---- the matrix ------------------------------------------------------------------------------------------
CELLS = [(m, impl) for m in MODELS for impl in IMPLS]


# the single-layer configurations each implementation applies to (the test skips a cell where none does)
APPLIES = {"depthwise": ["dw_grouped_nobias", "dw_dilated", "cf_grouped", "cf_grouped_wide"],
           "depthwise-wide": ["dw_wide", "dw_wide_valid_s2", "cf_grouped_wide"], "fft": list(SINGLE),
           "fft-tiled": list(SINGLE), "pac": ["s2", "d2", "valid", "even_same_s2", "cf_dense"]}


def _sample():
    """The default: every composite model (where wiring goes wrong) with every implementation, and a seeded
    sample of 3 single-layer configurations each implementation applies to."""
    r = random.Random(16)
    chosen = {(m, impl) for m in ("nested", "shared", "multi_io") for impl in IMPLS}
    for impl in IMPLS:
        for m in r.sample(APPLIES[impl], 3):
            chosen.add((m, impl))
    return chosen


SAMPLE = _sample()


def _cells():
    for cell in CELLS:
        marks = [] if FULL or cell in SAMPLE else [pytest.mark.skip(reason="not in the default sample; "
                                                                           "CONVREWRITE_FULL_MATRIX=1 runs it")]
        yield pytest.param(*cell, id=f"{cell[0]}-{cell[1]}", marks=marks)


EXPECTED_CLASS = {"depthwise": (keras.layers.DepthwiseConv2D,), "depthwise-wide": (WideDepthwiseConv2D,), "fft": (FFTConv2D, FFTDepthwiseConv2D),
                  "fft-tiled": (FFTConv2D, FFTDepthwiseConv2D), "pac": (PacConv2D,)}


def _layer_at(model, path):
    layer = model
    for part in path.split("/"):
        layer = layer.get_layer(part)
    return layer


def _np_outputs(model, out):
    """Flatten numpy outputs in the model's output order."""
    return keras.tree.flatten(out)  # the same order as keras.tree.flatten(model(inputs))


@pytest.mark.parametrize("model_key,impl", list(_cells()))
def test_forced_implementation_matches_original_and_reference(model_key, impl, rng):
    model, forward = MODELS[model_key]()
    randomize(model, rng)
    plan = convrewrite.plan(model, cost_model=None)
    forced = []
    for row in plan:
        ok, _ = convrewrite.implementations.get(impl).applicable(row.spec)
        if ok:
            plan.force(row.site, impl)
            forced.append(row.site)
    if not forced:
        pytest.skip(f"{impl} applies to no site of {model_key}")
    inputs = random_inputs(model, batch=2, seed=int(rng.integers(1 << 30)))
    before = [np.array(w) for w in model.get_weights()]
    fast = convrewrite.optimize(model, plan=plan, **({"check_speed": False} if _has_check_speed() else {}))

    # nothing fell back: every forced site is still its implementation, in the report and in the model
    assert fast.convrewrite_report.fallbacks == []
    assert fast.convrewrite_report.passed
    for site in forced:
        assert fast.convrewrite_plan.row(site).choice == impl
        assert isinstance(_layer_at(fast, site), EXPECTED_CLASS[impl]), (site, type(_layer_at(fast, site)))
        check = next(c for c in fast.convrewrite_report.sites if c.name == site)
        assert check.implementation == impl and check.rel_error <= TOL

    got = [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(fast(inputs))]
    orig = [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(model(inputs))]
    ref = _np_outputs(model, forward(inputs))
    assert len(got) == len(orig) == len(ref)
    for g, o, r in zip(got, orig, ref):
        assert np.max(np.abs(r)) > 0
        assert rel_error(o, r) <= TOL, "the original model disagrees with the numpy forward (the test's oracle)"
        assert rel_error(g, o) <= TOL
        assert rel_error(g, r) <= TOL
    for a, b in zip(model.get_weights(), before):  # the original is untouched
        np.testing.assert_array_equal(a, b)


def _has_check_speed():
    import inspect

    return "check_speed" in inspect.signature(convrewrite.optimize).parameters


def test_sample_covers_every_implementation_and_model_kind():
    impls = {impl for _, impl in SAMPLE}
    assert impls == set(IMPLS)
    assert {m for m, _ in SAMPLE} & {"nested", "shared", "multi_io"}
