"""Convolutions held inside custom layers and subclassed models: found, planned, swapped on a copy, verified."""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import sublayers
from convrewrite.graph import walk
from conftest import rel_error


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class Block(keras.layers.Layer):
    """Convs held every way a layer holds them: an attribute, a list, a dict, a tuple, and a nested layer."""

    def __init__(self, filters=8, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.proj = keras.layers.Conv2D(filters, 3, padding="same", groups=filters)
        self.convs = [keras.layers.Conv2D(filters, 7, padding="same"), keras.layers.DepthwiseConv2D(5, padding="same")]
        self.heads = {"a": keras.layers.Conv2D(filters, 1)}
        self.pair = (keras.layers.Conv2D(filters, 3, padding="same", use_bias=False),)
        self.attn = Inner(filters)
        self.norm = keras.layers.LayerNormalization()

    def call(self, x):
        y = self.proj(x)
        for conv in self.convs:
            y = conv(y)
        y = self.pair[0](y) + self.heads["a"](x)
        return self.norm(self.attn(y))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class Inner(keras.layers.Layer):
    def __init__(self, filters=8, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.scale = self.add_weight(shape=(filters,), initializer="ones", name="scale")
        self.proj = keras.layers.Conv2D(filters, 9, padding="same")

    def call(self, x):
        return self.proj(x) * self.scale

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class Net(keras.Model):
    """A subclassed model: a stem conv, a Block, a Dense head."""

    def __init__(self, filters=8, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.stem = keras.layers.Conv2D(filters, 3, padding="same")
        self.block = Block(filters)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(3)

    def call(self, x):
        return self.head(self.pool(self.block(self.stem(x))))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class LateBlock(keras.layers.Layer):
    """Creates its conv in build(), not __init__."""

    def build(self, shape):
        self.conv = keras.layers.Conv2D(int(shape[-1]), 7, padding="same")
        self.conv.build(shape)

    def call(self, x):
        return self.conv(x)


def _randomize(model, rng):
    for v in model.weights:
        v.assign(rng.standard_normal(tuple(v.shape)).astype("float32") * 0.3)


def _state(model, x):
    return ([id(layer) for layer in model._flatten_layers()], [np.array(w) for w in model.get_weights()],
            keras.ops.convert_to_numpy(model(x)))


HELD_PATHS = ["stem", "block/proj", "block/convs/0", "block/convs/1", "block/heads/a", "block/pair/0",
              "block/attn/proj"]


def test_held_convs_are_found_where_they_are_held_with_the_shapes_they_see():
    net = Net()
    net(np.zeros((2, 12, 10, 3), "float32"))
    sites = walk(net).sites
    assert [s.path for s in sites] == HELD_PATHS
    by_path = {s.path: s for s in sites}
    assert (by_path["stem"].spec.height, by_path["stem"].spec.width, by_path["stem"].spec.in_channels) == (12, 10, 3)
    assert by_path["block/convs/1"].spec.kind == "depthwise_conv2d"
    assert by_path["block/attn/proj"].spec.kernel == (9, 9)
    assert by_path["block/attn/proj"].holder is net
    holder, layer = sublayers.locate(net, by_path["block/attn/proj"].steps)
    assert layer is net.block.attn.proj and holder is net.block.attn


def test_subclassed_model_gets_a_plan_and_an_equivalent_copy_of_its_class_original_untouched(rng):
    net = Net()
    x = rng.standard_normal((2, 12, 10, 3)).astype("float32")
    net(x)
    _randomize(net, rng)
    before = _state(net, x)
    plan = convrewrite.plan(net, cost_model=None)
    assert [r.site for r in plan] == HELD_PATHS and plan.row("block/proj").choice == "depthwise"
    plan.force("block/convs/0", "fft").force("block/convs/1", "fft").force("block/attn/proj", "fft-tiled", tile_size=8)
    fast = convrewrite.optimize(net, plan=plan)
    assert type(fast) is Net and fast is not net and fast.filters == 8
    assert isinstance(fast.block.proj, keras.layers.DepthwiseConv2D)
    assert type(fast.block.convs[0]).__name__ == "FFTConv2D" and type(fast.block.attn.proj).__name__ == "FFTConv2D"
    assert fast.block.convs[0] in fast.block._layers and net.block.convs[0] not in fast.block._layers
    assert rel_error(keras.ops.convert_to_numpy(fast(x)), before[2]) <= 1e-5
    report = fast.convrewrite_report
    assert report.passed and {c.name for c in report.sites} == set(HELD_PATHS)
    after = _state(net, x)
    assert after[0] == before[0]  # the original's objects: not one swapped
    for a, b in zip(after[1] + [after[2]], before[1] + [before[2]]):
        np.testing.assert_array_equal(a, b)
    assert not {id(v) for v in net.weights} & {id(v) for v in fast.weights}
    assert len(fast.weights) == len(net.weights)


def test_a_custom_layer_in_a_functional_model_has_its_convs_swapped_on_a_copy(rng):
    inputs = keras.Input((11, 13, 4))
    model = keras.Model(inputs, Block(4, name="blk")(keras.layers.Conv2D(4, 1, name="pre")(inputs)))
    _randomize(model, rng)
    x = rng.standard_normal((2, 11, 13, 4)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x))
    plan = convrewrite.plan(model, cost_model=None).force("blk/convs/0", "fft").force("blk/attn/proj", "fft")
    fast = convrewrite.optimize(model, plan=plan, inputs=x)
    blk = fast.get_layer("blk")
    assert blk is not model.get_layer("blk") and type(blk.convs[0]).__name__ == "FFTConv2D"
    assert type(model.get_layer("blk").convs[0]) is keras.layers.Conv2D
    assert rel_error(keras.ops.convert_to_numpy(fast(x)), expected) <= 1e-5
    assert fast.convrewrite_report.passed
    assert fast.convrewrite_plan.row("blk/attn/proj").choice == "fft"


def test_a_conv_made_in_build_is_swapped_too(rng):
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, LateBlock(name="late")(inputs))
    _randomize(model, rng)
    plan = convrewrite.plan(model, cost_model=None).force("late/conv", "fft")
    fast = convrewrite.optimize(model, plan=plan)
    assert type(fast.get_layer("late").conv).__name__ == "FFTConv2D"
    assert fast.convrewrite_report.passed


def test_graph_wired_implementations_are_refused_for_held_convs_with_a_clear_error():
    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    with pytest.raises(convrewrite.UnsupportedModelError, match=r"'block/convs/0' is held inside .*Functional"):
        convrewrite.optimize(net, cost_model=None, pac={"layers": ["block/convs/0"], "guidance": "self"})


def test_a_holder_that_cannot_be_recreated_is_refused_only_when_its_conv_is_replaced(rng):
    class NoConfig(keras.layers.Layer):
        def __init__(self, units):
            super().__init__()
            self.conv = keras.layers.Conv2D(units, 7, padding="same")

        def call(self, x):
            return self.conv(x)

    inputs = keras.Input((12, 12, 3))
    model = keras.Model(inputs, NoConfig(4)(inputs))
    with pytest.warns(UserWarning, match="shares 1 layer"):
        kept = convrewrite.optimize(model, cost_model=None)  # nothing replaced: shared, as any such layer
    assert kept.convrewrite_report.passed
    row = kept.convrewrite_plan.rows[0]
    assert row.choice == "direct" and "cannot be re-created" in row.candidates["fft"]  # never chosen for speed
    plan = convrewrite.plan(model, cost_model=None).force(row.site, "fft")
    with pytest.raises(convrewrite.UnsupportedModelError, match="cannot be re-created"):
        convrewrite.optimize(model, plan=plan)


def test_an_unbuilt_subclassed_model_is_refused_with_what_to_do():
    with pytest.raises(convrewrite.UnsupportedModelError, match=r"not built.*model.build"):
        convrewrite.plan(Net())


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class OwnBuildConfig(keras.layers.Layer):
    """Keeps its own build config (not Keras's), so a `.keras` file cannot record its swapped conv."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(4, 7, padding="same")

    def call(self, x):
        return self.conv(x)

    def get_build_config(self):
        return {"input_shape": self._shape}

    def build(self, shape):
        self._shape = tuple(shape)

    def build_from_config(self, config):
        self.build(config["input_shape"])


def _optimized_net(rng):
    net = Net()
    x = rng.standard_normal((2, 12, 10, 3)).astype("float32")
    net(x)
    _randomize(net, rng)
    plan = convrewrite.plan(net, cost_model=None).force("block/convs/0", "fft").force("block/attn/proj", "fft")
    return convrewrite.optimize(net, plan=plan), x


def _kinds(net):
    return [type(layer).__name__ for layer in (net.block.proj, net.block.convs[0], net.block.attn.proj)]


def test_a_subclassed_model_saves_and_loads_with_its_replacements(rng, tmp_path):
    fast, x = _optimized_net(rng)
    assert _kinds(fast) == ["DepthwiseConv2D", "FFTConv2D", "FFTConv2D"]
    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    assert type(loaded) is Net and _kinds(loaded) == _kinds(fast)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(fast(x)))
    loaded.save(tmp_path / "again.keras")  # the loaded model records its replacements too
    assert _kinds(keras.models.load_model(tmp_path / "again.keras")) == _kinds(fast)


def test_a_saved_subclassed_model_loads_with_its_replacements_in_a_fresh_process(rng, tmp_path):
    import os
    import subprocess
    import sys

    fast, x = _optimized_net(rng)
    fast.save(tmp_path / "fast.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", keras.ops.convert_to_numpy(fast(x)))
    script = (
        "import sys, numpy as np, keras, convrewrite\n"
        "import test_sublayers\n"
        f"m = keras.models.load_model({str(tmp_path / 'fast.keras')!r})\n"
        "print(test_sublayers._kinds(m))\n"
        f"y = keras.ops.convert_to_numpy(m(np.load({str(tmp_path / 'x.npy')!r})))\n"
        f"print(float(np.max(np.abs(y - np.load({str(tmp_path / 'y.npy')!r})))))\n")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH", "")]))}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    kinds, diff = r.stdout.strip().splitlines()[-2:]
    assert kinds == str(_kinds(fast)) and float(diff) == 0.0


def test_a_functional_model_holding_swapped_convs_saves_and_loads_with_them(rng, tmp_path):
    inputs = keras.Input((11, 13, 4))
    model = keras.Model(inputs, Block(4, name="blk")(inputs))
    _randomize(model, rng)
    x = rng.standard_normal((2, 11, 13, 4)).astype("float32")
    fast = convrewrite.optimize(model, plan=convrewrite.plan(model, cost_model=None).force("blk/convs/0", "fft"))
    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    assert type(loaded.get_layer("blk").convs[0]).__name__ == "FFTConv2D"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(fast(x)))


def test_a_holder_that_keeps_its_own_build_config_warns_and_the_plan_re_applies_after_loading(rng, tmp_path):
    inputs = keras.Input((12, 12, 3))
    model = keras.Model(inputs, OwnBuildConfig(name="own")(inputs))
    _randomize(model, rng)
    plan = convrewrite.plan(model, cost_model=None).force("own/conv", "fft")
    with pytest.warns(UserWarning, match=r"\['own'\].*loads their plain layers.*convrewrite.build"):
        fast = convrewrite.optimize(model, plan=plan)
    assert fast.convrewrite_unsaved_swaps == ("own",)
    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    assert type(loaded.get_layer("own").conv) is keras.layers.Conv2D  # what the warning said
    again = convrewrite.build(loaded, fast.convrewrite_plan)
    assert type(again.get_layer("own").conv).__name__ == "FFTConv2D"
    x = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    assert rel_error(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(model(x))) <= 1e-5


class _MyFunctional(keras.Model):
    """A Functional subclass whose constructor builds its own graph (as keras_hub backbones do)."""

    def __init__(self, **kwargs):
        inputs = keras.Input((10, 10, 4))
        super().__init__(inputs, keras.layers.Conv2D(4, 3, groups=4, name="g")(inputs), **kwargs)
        self.pyramid = "kept?"


def test_a_functional_subclass_keeps_its_class_and_attributes_and_the_report_says_when_a_class_is_not_kept(rng):
    model = _MyFunctional()
    fast = convrewrite.optimize(model, plan=convrewrite.plan(model, cost_model=None).force("g", "fft"))
    assert type(fast) is _MyFunctional and fast.pyramid == "kept?" and fast.convrewrite_report.model_class == ""
    assert type(fast.get_layer("g")).__name__ == "FFTConv2D" and type(model.get_layer("g")) is keras.layers.Conv2D
    seq = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(2, 3)])
    assert "Sequential" in convrewrite.optimize(seq, cost_model=None).convrewrite_report.model_class
    net = Net()
    net(np.zeros((1, 8, 8, 3), "float32"))
    assert convrewrite.optimize(net, cost_model=None).convrewrite_report.model_class == ""


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class WithSequential(keras.Model):
    """Holds its convs in a Sequential and in a Functional sub-model, as subclassed models often do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features = keras.Sequential([keras.layers.Conv2D(6, 7, padding="same", name="big"),
                                          keras.layers.Conv2D(6, 3, padding="same", groups=6, name="grouped")])
        inputs = keras.Input((None, None, 6))
        self.head = keras.Model(inputs, keras.layers.Conv2D(2, 9, padding="same", name="wide")(inputs))

    def call(self, x):
        return self.head(self.features(x))


def test_graph_models_held_by_a_subclassed_model_are_walked_and_rebuilt(rng, tmp_path):
    model = WithSequential()
    x = rng.standard_normal((2, 16, 16, 3)).astype("float32")
    model(x)
    _randomize(model, rng)
    expected = keras.ops.convert_to_numpy(model(x))
    plan = convrewrite.plan(model, cost_model=None)
    assert [r.site for r in plan] == ["features/big", "features/grouped", "head/wide"]
    assert plan.row("features/grouped").choice == "depthwise"
    fast = convrewrite.optimize(model, plan=plan.force("features/big", "fft").force("head/wide", "fft-tiled", tile_size=8))
    assert type(fast) is WithSequential and fast.convrewrite_report.passed
    assert type(fast.features.get_layer("big")).__name__ == "FFTConv2D"
    assert type(fast.head.get_layer("wide")).__name__ == "FFTConv2D"
    assert type(model.features.get_layer("big")) is keras.layers.Conv2D
    assert rel_error(keras.ops.convert_to_numpy(fast(x)), expected) <= 1e-5
    assert not {id(v) for v in model.weights} & {id(v) for v in fast.weights}
    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    assert type(loaded.features.get_layer("big")).__name__ == "FFTConv2D"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(fast(x)))


def test_a_pac_pattern_leaves_held_convs_alone(rng):
    inputs = keras.Input((12, 12, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", name="top")(inputs)
    model = keras.Model(inputs, Block(4, name="blk")(x))
    plan = convrewrite.plan(model, cost_model=None, pac={"layers": ".*", "guidance": "self"})
    assert plan.row("top").choice == "pac"
    assert all(row.choice != "pac" for row in plan if row.site.startswith("blk/"))


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class TwoScales(keras.Model):
    """One conv applied at two sizes (as a feature pyramid's shared head is)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shared = keras.layers.Conv2D(3, 5, padding="same")
        self.pool = keras.layers.AveragePooling2D(2)

    def call(self, x):
        return self.pool(self.shared(x)) + self.shared(self.pool(x))


def test_a_held_conv_called_at_several_sizes_is_planned_at_each_from_one_traced_call(rng):
    model = TwoScales()
    x = rng.standard_normal((2, 16, 12, 3)).astype("float32")
    model(x)
    _randomize(model, rng)
    nodes = len(model.shared._inbound_nodes)
    site = walk(model).sites[0]
    assert len(model.shared._inbound_nodes) == nodes  # the trace leaves the model as it was
    assert site.calls == 2 and [(s.height, s.width) for s in site.specs] == [(16, 12), (8, 6)]
    plan = convrewrite.plan(model, cost_model=None).force("shared", "fft")
    assert [(s.height, s.width) for s in plan.row("shared").specs] == [(16, 12), (8, 6)]
    fast = convrewrite.optimize(model, plan=plan)
    assert type(fast.shared).__name__ == "FFTConv2D" and fast.convrewrite_report.passed
    assert rel_error(keras.ops.convert_to_numpy(fast(x)), keras.ops.convert_to_numpy(model(x))) <= 1e-5


def test_weights_move_by_path_between_a_subclassed_model_and_its_copy(rng):
    fast, x = _optimized_net(rng)
    other = Net()
    other(x)  # fresh weights
    copied = convrewrite.transfer_weights(fast, other)
    assert {"block/norm", "block/attn", "block/convs/0", "head"} <= set(copied)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(other(x)), keras.ops.convert_to_numpy(fast(x)),
                               rtol=1e-5, atol=1e-5)


@keras.saving.register_keras_serializable(package="convrewrite_tests")
class TwoInputs(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(2, 3, padding="same")

    def call(self, inputs):
        a, b = inputs
        return self.conv(a) + b


def test_a_subclassed_model_with_two_inputs_is_planned_and_verified(rng):
    model = TwoInputs()
    x = [rng.standard_normal((2, 8, 8, 3)).astype("float32"), rng.standard_normal((2, 8, 8, 2)).astype("float32")]
    model(x)
    assert [(s.path, s.spec.height, s.calls) for s in walk(model).sites] == [("conv", 8, 1)]
    assert convrewrite.optimize(model, cost_model=None).convrewrite_report.passed  # on random inputs of its shapes
    fast = convrewrite.optimize(model, plan=convrewrite.plan(model, cost_model=None).force("conv", "fft"), inputs=x)
    assert fast.convrewrite_report.passed and type(fast.conv).__name__ == "FFTConv2D"
