"""Walking and rebuilding models: structure, weights, equivalence, and the original left untouched."""

import re

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite.graph import walk
from convrewrite.verify import random_inputs
from conftest import rel_error


def _snapshot(model, inputs):
    outs = [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(model(inputs))]
    return outs, [np.array(w) for w in model.get_weights()]


def optimize_and_check(model, tol=1e-5, **kwargs):
    """Optimize `model`; assert equivalence, the original unchanged, and no shared variables."""
    rng = np.random.default_rng(7)
    for v in model.weights:  # non-zero biases: a replacement that lost or reordered one would show
        if v.path.endswith("bias"):
            v.assign(rng.standard_normal(tuple(v.shape)).astype("float32"))
    inputs = random_inputs(model, batch=2, seed=1)
    before_out, before_w = _snapshot(model, inputs)
    fast = convrewrite.optimize(model, cost_model=None, **kwargs)
    assert fast is not model
    fast_out = [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(fast(inputs))]
    assert len(fast_out) == len(before_out)
    for a, b in zip(fast_out, before_out):
        assert rel_error(a, b) <= tol
    after_out, after_w = _snapshot(model, inputs)
    for a, b in zip(after_out + after_w, before_out + before_w):
        np.testing.assert_array_equal(a, b)
    original_vars = {id(v) for v in model.weights}
    assert not original_vars & {id(v) for v in fast.weights}, "optimized model shares variables with the original"
    input_names = lambda m: [t._keras_history.operation.name for t in keras.tree.flatten(m.inputs)]  # noqa: E731
    assert input_names(fast) == input_names(model)
    assert [tuple(t.shape) for t in keras.tree.flatten(fast.outputs)] == [tuple(t.shape) for t in keras.tree.flatten(model.outputs)]
    assert fast.convrewrite_report.passed
    return fast


def test_sequential():
    model = keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),
        keras.layers.Conv2D(8, 3, padding="same", groups=8, name="grouped"),
        keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])
    fast = optimize_and_check(model)
    assert isinstance(fast.get_layer("grouped"), keras.layers.DepthwiseConv2D)
    assert fast.convrewrite_plan.row("grouped").choice == "depthwise"
    assert fast.convrewrite_plan.row("c1").choice == "direct"


def test_functional_two_inputs_two_outputs():
    a = keras.Input((10, 10, 4), name="image")
    b = keras.Input((10, 10, 2), name="aux")
    x = keras.layers.Concatenate()([a, b])
    x = keras.layers.Conv2D(6, 3, padding="same", groups=6, name="mix")(x)
    y1 = keras.layers.Conv2D(3, 1, name="head1")(x)
    y2 = keras.layers.GlobalMaxPooling2D(name="head2")(keras.layers.Add()([x, keras.layers.Conv2D(6, 1)(b)]))
    model = keras.Model({"image": a, "aux": b}, {"seg": y1, "cls": y2})
    fast = optimize_and_check(model)
    assert set(fast.output_names) == set(model.output_names)


@pytest.mark.parametrize("layer", [
    keras.layers.Conv2D(5, 3, strides=2, padding="same", name="s2"),
    keras.layers.Conv2D(5, 3, dilation_rate=2, padding="same", name="d2"),
    keras.layers.Conv2D(5, (4, 2), padding="valid", name="valid"),
    keras.layers.Conv2D(6, 3, groups=2, padding="same", name="g2"),
    keras.layers.Conv2D(12, 3, groups=6, strides=2, padding="same", use_bias=False, name="dw_grouped_nobias"),
    keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="mult2"),
    keras.layers.DepthwiseConv2D(5, strides=2, use_bias=False, name="dw_nobias"),
], ids=lambda l: l.name)
def test_conv_configurations(layer):
    x = keras.Input((11, 13, 6))
    model = keras.Model(x, layer(x))
    optimize_and_check(model)


def test_nested_model_and_shared_conv():
    inner_in = keras.Input((8, 8, 4))
    inner_out = keras.layers.Conv2D(4, 3, padding="same", groups=4, name="inner_dw")(inner_in)
    inner = keras.Model(inner_in, keras.layers.ReLU()(inner_out), name="block")
    shared = keras.layers.Conv2D(4, 3, padding="same", name="shared")
    x = keras.Input((8, 8, 4))
    y = shared(x)
    y = inner(y)
    y = inner(y)  # nested model called twice
    y = shared(y)  # shared conv called twice
    model = keras.Model(x, y)
    graph = walk(model)
    assert sorted(s.path for s in graph.sites) == ["block/inner_dw", "shared"]
    assert next(s for s in graph.sites if s.path == "shared").calls == 2
    fast = optimize_and_check(model)
    # still shared: one layer object, called twice
    assert sum(1 for l in fast.layers if l.name == "shared") == 1
    assert len(fast.get_layer("shared")._inbound_nodes) == 2
    assert isinstance(fast.get_layer("block").get_layer("inner_dw"), keras.layers.DepthwiseConv2D)


def test_layer_shared_between_a_model_and_its_nested_model_is_one_site():
    shared = keras.layers.Conv2D(4, 3, padding="same", groups=4, name="sh")
    inner_in = keras.Input((8, 8, 4))
    inner = keras.Model(inner_in, shared(inner_in), name="inner")
    x = keras.Input((8, 8, 4))
    model = keras.Model(x, inner(shared(x)))
    site, = walk(model).sites
    assert (site.path, site.aliases, site.calls) == ("sh", ["inner/sh"], 2)
    plan = convrewrite.plan(model, cost_model=None)
    assert plan.row("inner/sh") is plan.row("sh") and plan.row("sh").choice == "depthwise"
    fast = optimize_and_check(model)
    assert fast.get_layer("sh") is fast.get_layer("inner").get_layer("sh")
    assert isinstance(fast.get_layer("sh"), keras.layers.DepthwiseConv2D)
    plan.force("inner/sh", "direct")  # either path names the site
    kept = convrewrite.optimize(model, plan=plan)
    assert type(kept.get_layer("inner").get_layer("sh")) is keras.layers.Conv2D


def test_stateless_layer_without_config_is_kept_and_lambda_activation_survives():
    class Doubler(keras.layers.Layer):  # no get_config override for its constructor argument
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def call(self, t):
            return t * self.factor

    x = keras.Input((9, 9, 4))
    y = keras.layers.Conv2D(8, 3, groups=4, activation=lambda t: t * 3.0, name="g")(x)
    model = keras.Model(x, Doubler(2.0)(y))
    fast = optimize_and_check(model)
    assert isinstance(fast.get_layer("g"), keras.layers.DepthwiseConv2D)


def test_spec_validation_names_the_argument():
    base = dict(kind="conv2d", in_channels=4, filters=4, kernel=3)
    for bad, match in [(dict(strides=0), "strides=.0, 0."), (dict(data_format="NCHW"), "data_format"),
                       (dict(groups=0), "groups=0"), (dict(kind="depthwise_conv2d", groups=4, filters=6), "filters = in_channels")]:
        with pytest.raises(ValueError, match=match):
            convrewrite.ConvSpec(**{**base, **bad})


def test_pac_selection_errors_are_explicit():
    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", name="c1")(x)
    model = keras.Model(x, keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(y))
    with pytest.raises(convrewrite.PlanError, match="c_typo"):
        convrewrite.plan(model, cost_model=None, pac={"layers": ["c1", "c_typo"], "guidance": "self"})
    plan = convrewrite.plan(model, cost_model=None, pac={"layers": ".*", "guidance": "self"})
    assert plan.choices() == {"c1": "pac", "dw": "direct"}  # a pattern picks the sites PAC can replace
    with pytest.raises(convrewrite.PlanError, match="cannot become PAC"):
        convrewrite.plan(model, cost_model=None, pac={"layers": ["dw"], "guidance": "self"})


def test_graph_is_networkx_with_tensor_edges():
    a = keras.Input((6, 6, 2), name="a")
    c = keras.layers.Conv2D(2, 3, padding="same", name="c")
    y = keras.layers.Add(name="add")([c(a), a])
    g = walk(keras.Model(a, y)).graph
    assert set(g.nodes) == {"a:0", "c:0", "add:0"}
    assert g.has_edge("a:0", "c:0") and g.has_edge("c:0", "add:0") and g.has_edge("a:0", "add:0")
    assert g["c:0"]["add:0"]["tensors"] == [0] and g["a:0"]["add:0"]["tensors"] == [1]


def test_training_the_copy_leaves_the_original_alone():
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, groups=2, name="c"),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    before = [np.array(w) for w in model.get_weights()]
    fast = convrewrite.optimize(model, cost_model=None)
    fast.compile("sgd", "mse")
    rng = np.random.default_rng(0)
    fast.fit(rng.standard_normal((8, 8, 8, 2)), rng.standard_normal((8, 1)), epochs=1, verbose=0)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(fast.get_weights(), before))


def test_frozen_layers_stay_frozen():
    x = keras.Input((8, 8, 2))
    frozen = keras.layers.Conv2D(2, 3, name="frozen", trainable=False)
    inner = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(2, 1, name="ic")], name="inner")
    inner.trainable = False
    model = keras.Model(x, inner(frozen(x)))
    fast = convrewrite.optimize(model, cost_model=None)
    assert fast.trainable and not fast.get_layer("frozen").trainable and not fast.get_layer("inner").trainable
    assert len(fast.trainable_weights) == len(model.trainable_weights) == 0


def test_mixed_precision_model():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = keras.Sequential([keras.Input((10, 10, 4)), keras.layers.Conv2D(8, 3, groups=4, name="g"),
                                  keras.layers.Conv2D(4, 3, name="c")])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    fast = optimize_and_check(model, tol=1e-2)
    assert fast.get_layer("g").dtype_policy.name == "mixed_float16"


def test_plan_force_and_summary():
    x = keras.Input((8, 8, 4))
    model = keras.Model(x, keras.layers.Conv2D(4, 3, groups=4, name="g")(x))
    plan = convrewrite.plan(model, cost_model=None)
    assert plan.row("g").choice == "depthwise"
    plan.force("g", "direct")
    assert "g" in plan.summary() and "direct" in plan.summary()
    fast = convrewrite.optimize(model, plan=plan)
    assert type(fast.get_layer("g")) is keras.layers.Conv2D
    assert convrewrite.Plan.from_dict(plan.to_dict()).choices() == plan.choices()
    with pytest.raises(convrewrite.PlanError, match="nope"):
        plan.force("nope", "direct")
    with pytest.raises(convrewrite.PlanError, match="no-such-impl"):
        plan.force("g", "no-such-impl")
    plan_all = convrewrite.plan(model, cost_model=None)
    plan_all.force(re.compile(".*"), "direct")
    assert set(plan_all.choices().values()) == {"direct"}


def test_fallback_when_a_replacement_is_wrong(monkeypatch):
    """A broken implementation is caught per site and replaced by direct, and the report says so."""
    from convrewrite import implementations

    depthwise = implementations.get("depthwise")

    def corrupt(old, new, spec):
        weights = [np.array(w) for w in old.get_weights()]
        weights[0] = weights[0].reshape(new.get_weights()[0].shape) * 1.01
        new.set_weights(weights)

    monkeypatch.setattr(depthwise, "transfer_weights", corrupt)
    x = keras.Input((8, 8, 4))
    model = keras.Model(x, keras.layers.Conv2D(4, 3, groups=4, name="g")(x))
    fast = convrewrite.optimize(model, cost_model=None)
    assert fast.convrewrite_plan.row("g").choice == "direct"
    assert fast.convrewrite_report.fallbacks[0]["site"] == "g"
    assert fast.convrewrite_report.passed


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(2, 3)

    def call(self, x):
        return self.conv(x)


class _NoConfig(keras.layers.Layer):
    def __init__(self, units):
        super().__init__()
        self.units = units

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units))

    def call(self, x):
        return keras.ops.matmul(x, self.w)


def test_unsupported_models_get_clear_errors():
    sub = _Subclassed()
    sub(np.zeros((1, 5, 5, 1), "float32"))
    with pytest.raises(convrewrite.UnsupportedModelError, match=r"_subclassed.*cannot be re-created from its config"):
        convrewrite.optimize(sub)  # its __init__ takes no config: a subclassed model must be copied from one
    with pytest.raises(convrewrite.UnsupportedModelError, match="is not built"):
        convrewrite.plan(_Subclassed())
    unbuilt = keras.Sequential([keras.layers.Conv2D(2, 3)])
    with pytest.raises(convrewrite.UnsupportedModelError, match="no known input shape"):
        convrewrite.plan(unbuilt)


def test_a_layer_that_cannot_be_recreated_and_is_not_replaced_is_shared_and_reported(rng):
    """Never refuse a model over a layer that is not being replaced: keep the object, say so."""
    x = keras.Input((6, 6, 3))
    y = keras.layers.Conv2D(4, 3, groups=1, name="c")(x)
    keeper = _NoConfig(2)
    model = keras.Model(x, keeper(keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(y)))
    for layer in model.layers[1:]:
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    with pytest.warns(UserWarning, match=r"shares 1 layer.*_no_config"):
        fast = convrewrite.optimize(model, cost_model=None, allow=["direct", "depthwise", "fft"])
    assert fast.convrewrite_report.shared_layers == [keeper.name]
    assert "shared with the original" in fast.convrewrite_report.summary()
    assert keeper in fast.layers and fast.get_layer("c") is not model.get_layer("c")  # the rest is copied
    data = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(fast(data), model(data), rtol=1e-5, atol=1e-5)


def test_unknown_spatial_size():
    x = keras.Input((None, None, 3))
    model = keras.Model(x, keras.layers.Conv2D(6, 3, groups=3, padding="same", name="g")(x))
    assert walk(model).sites[0].spec.height is None
    optimize_and_check(model)


class _NameLessConfig(keras.layers.Layer):
    """A custom layer whose get_config() leaves `name` out."""

    def __init__(self, units=3):
        super().__init__()
        self.units = units

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1], self.units))

    def call(self, x):
        return keras.ops.matmul(x, self.w)

    def get_config(self):
        return {"units": self.units}


def test_custom_layer_whose_config_lacks_name_keeps_its_name():
    """Issue 15 reproduction: such a layer came back auto-named ("..._1") in the optimized model."""
    x = keras.Input((8, 8, 2))
    h = keras.layers.Conv2D(4, 3, name="c")(x)
    model = keras.Model(x, _NameLessConfig(3)(h))
    fast = convrewrite.optimize(model, cost_model=None)
    assert [layer.name for layer in fast.layers] == [layer.name for layer in model.layers]


def test_an_optimized_model_can_be_re_planned():
    """Issue 15 reproduction: the FFT layers of an optimized model were no longer sites, so optimizing it
    again could not change its mind. They are sites of their own kind, and `direct` turns them back into
    Keras's layers."""
    x = keras.Input((16, 16, 3))
    h = keras.layers.Conv2D(4, 9, padding="same", name="a")(x)
    h = keras.layers.DepthwiseConv2D(7, padding="same", name="d")(h)
    model = keras.Model(x, h)
    fast = convrewrite.optimize(model, plan=convrewrite.plan(model, cost_model=None).force("a", "fft").force("d", "fft"))
    plan = convrewrite.plan(fast, cost_model=None)
    assert [r.site for r in plan] == ["a", "d"] and plan.row("d").spec.kind == "depthwise_conv2d"
    again = convrewrite.optimize(fast, plan=plan.force("a", "direct").force("d", "fft-tiled", tile_size=5))
    kinds = {layer.name: type(layer).__name__ for layer in again.layers}
    assert kinds["a"] == "Conv2D" and kinds["d"] == "FFTDepthwiseConv2D" and again.get_layer("d").tile_size == (5, 5)
    data = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype("float32")
    want = np.asarray(model(data))
    assert np.abs(np.asarray(again(data)) - want).max() <= 1e-5 * np.abs(want).max()


class _HeightCost:
    """A stand-in cost model: ms = spatial height (so sums over calls are visible)."""

    name = "height"

    def predict_ms(self, impl_name, spec):
        return None if spec.height is None else float(spec.height) * (1.0 if impl_name == "direct" else 2.0)


def test_a_layer_shared_at_two_input_sizes_is_planned_with_both():
    """Issue 15 reproduction: a layer shared at two input sizes was planned and predicted for its first call
    only. Now the site lists both specs, a candidate must apply at both, and predictions add up."""
    conv = keras.layers.Conv2D(4, 9, padding="same", name="shared")
    small, large = keras.Input((16, 16, 3), name="small"), keras.Input((None, None, 3), name="large")
    model = keras.Model([small, large], [conv(small), conv(large)])
    site = walk(model).sites[0]
    assert sorted(str(s.height) for s in site.specs) == ["16", "None"] and site.calls == 2
    plan = convrewrite.plan(model, cost_model=None)
    assert plan.row("shared").candidates["fft"] != ""  # full FFT needs a known size at every call
    assert plan.row("shared").candidates["fft-tiled"] == ""
    a, b = keras.Input((16, 16, 3)), keras.Input((32, 32, 3))
    conv2 = keras.layers.Conv2D(4, 9, padding="same", name="shared2")
    two = keras.Model([a, b], [conv2(a), conv2(b)])
    row = convrewrite.plan(two, cost_model=_HeightCost()).row("shared2")
    assert row.predicted_ms["direct"] == 16.0 + 32.0
