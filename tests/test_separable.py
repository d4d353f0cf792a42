"""SeparableConv2D as a conv site: its ConvSpec, the float64 oracle, and FFTSeparableConv2D / WideSeparableConv2D
(the depthwise stage by FFT or at a wider kernel) with the sep-fft, sep-fft-tiled and sep-wide implementations.

Seeded random configurations (kernel, strides, dilation, padding, depth multiplier, data format) against
`reference.separable_conv2d`; NaN/Inf positions, gradients and mixed precision against Keras's own layer;
config and .keras round trips; planning and optimize() on a model, also with the conv inside a custom layer.
"""

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite import implementations, reference
from convrewrite.layers.separable import FFTSeparableConv2D, WideSeparableConv2D
from convrewrite.spec import ConvSpec, separable_stages, spec_from_layer
from convrewrite.timing import compiled
from conftest import gradients, random_cases, rel_error

TOL = 1e-5
VARIANTS = {
    "fft": lambda **c: FFTSeparableConv2D(**c, tile_size="full"),
    "fft-tiled": lambda **c: FFTSeparableConv2D(**c, tile_size=6),
    "wide": lambda **c: WideSeparableConv2D(**c, run_kernel_size=(c["kernel_size"] + 1, c["kernel_size"] + 2)),
}


def _random_config(rng):
    k = int(rng.choice([1, 2, 3, 5, 7, 12, 13]))
    s = int(rng.integers(1, 3))
    d = int(rng.integers(1, 3)) if s == 1 else 1
    return dict(filters=int(rng.integers(1, 5)), kernel_size=k, strides=s, dilation_rate=d,
                depth_multiplier=int(rng.integers(1, 3)), padding=str(rng.choice(["same", "valid"])),
                use_bias=bool(rng.random() < 0.8), activation=str(rng.choice(["linear", "relu"])))


def _randomize(layer, rng):
    layer.set_weights([rng.standard_normal(v.shape).astype("float32") for v in layer.get_weights()])


def _input(rng, config, cf=False, cin=3):
    eff = (config["kernel_size"] - 1) * config["dilation_rate"] + 1
    h, w = int(rng.integers(eff, eff + 9)), int(rng.integers(eff, eff + 9))
    return rng.standard_normal((2, cin, h, w) if cf else (2, h, w, cin)).astype("float32")


def test_spec_describes_the_layer_and_round_trips(rng):
    layer = keras.layers.SeparableConv2D(5, 3, strides=2, depth_multiplier=2, padding="same")
    x = rng.standard_normal((2, 9, 8, 3)).astype("float32")
    y = layer(x)
    spec = spec_from_layer(layer, x.shape)
    assert (spec.kind, spec.filters, spec.depth_multiplier, spec.groups) == ("separable_conv2d", 5, 2, 1)
    assert spec.output_hw() == tuple(y.shape[1:3])
    assert spec.macs() == 2 * 5 * 4 * 6 * (9 + 5)
    assert ConvSpec.from_json(spec.to_json()) == spec and "output_padding" not in spec.to_dict()
    assert spec.short().startswith("sep m2 3x3 s2")
    dw, pw = separable_stages(spec)
    assert dw.macs() + pw.macs() == spec.macs() and pw.in_channels == 6


def test_reference_matches_keras(rng):
    for _ in range(15):
        config = _random_config(rng)
        layer = keras.layers.SeparableConv2D(**config)
        x = _input(rng, config)
        layer(x)
        _randomize(layer, rng)
        want = reference.spec_forward(spec_from_layer(layer, x.shape), x, layer.get_weights())
        assert rel_error(layer(x), want) <= TOL, config


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_configs_match_reference(variant):
    rng = np.random.default_rng(sorted(VARIANTS).index(variant))
    for _ in range(random_cases(12)):
        config = _random_config(rng)
        cf = rng.random() < 0.3
        x = _input(rng, config, cf)
        layer = VARIANTS[variant](**config, data_format="channels_first" if cf else "channels_last")
        layer(x)
        _randomize(layer, rng)
        want = reference.spec_forward(spec_from_layer(layer, x.shape), x, layer.get_weights())
        assert rel_error(layer(x), want) <= TOL, (config, cf)
        assert rel_error(compiled(layer, [layer])(x), want) <= TOL, (config, cf)


def test_channels_first_bias_is_added_along_channels(rng):
    # keras.ops.add would add a (1, C, 1, 1) bias along the last axis when the width is also C (TF backend)
    config = dict(filters=3, kernel_size=12, strides=2, padding="valid", data_format="channels_first")
    x = rng.standard_normal((2, 2, 20, 16)).astype("float32")  # output width 3 == filters
    for make in VARIANTS.values():
        layer = make(**config)
        layer(x)
        _randomize(layer, rng)
        want = reference.spec_forward(spec_from_layer(layer, x.shape), x, layer.get_weights())
        assert rel_error(layer(x), want) <= TOL


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_nonfinite_inputs_propagate_like_keras(rng, variant):
    config = dict(filters=3, kernel_size=5, padding="same", depth_multiplier=2)
    keras_layer = keras.layers.SeparableConv2D(**config)
    layer = VARIANTS[variant](**config)
    x = rng.standard_normal((1, 10, 10, 2)).astype("float32")
    keras_layer(x), layer(x)
    _randomize(keras_layer, rng)
    layer.set_weights(keras_layer.get_weights())
    x[0, 2, 3, 1], x[0, 8, 0, 0] = np.nan, -np.inf
    want, got = np.asarray(keras_layer(x)), np.asarray(layer(x))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_match_keras(rng, variant):
    config = dict(filters=3, kernel_size=5, strides=2, padding="same", activation="tanh")
    keras_layer = keras.layers.SeparableConv2D(**config)
    layer = VARIANTS[variant](**config)
    x = rng.standard_normal((2, 9, 8, 2)).astype("float32")
    keras_layer(x), layer(x)
    _randomize(keras_layer, rng)
    layer.set_weights(keras_layer.get_weights())
    grads = []
    for lay in (keras_layer, layer):
        grads.append(gradients(lambda t, lay=lay: lay(t, training=True) ** 2, x, lay.trainable_variables))
    for got, want in zip(grads[1], grads[0]):
        assert rel_error(got, want) <= TOL


def test_config_and_keras_file_round_trip(rng, tmp_path):
    inp = keras.Input((12, 12, 3))
    y = FFTSeparableConv2D(4, 7, padding="same", tile_size=8, name="sep_fft")(inp)
    y = WideSeparableConv2D(4, 13, padding="same", name="sep_wide")(y)
    model = keras.Model(inp, y)
    for layer in model.layers[1:]:
        _randomize(layer, rng)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = rng.standard_normal((2, 12, 12, 3)).astype("float32")
    assert loaded.get_layer("sep_fft").tile_size == (8, 8)
    assert loaded.get_layer("sep_wide").run_kernel_size == (13, 14)
    np.testing.assert_allclose(loaded(x), model(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="run_kernel_size"):
        WideSeparableConv2D(4, 13, run_kernel_size=12)


def test_mixed_precision_matches_keras(rng):
    config = dict(filters=4, kernel_size=13, padding="same", dtype="mixed_bfloat16")
    keras_layer = keras.layers.SeparableConv2D(**config)
    x = rng.standard_normal((2, 16, 16, 3)).astype("float32")
    keras_layer(x)
    _randomize(keras_layer, rng)
    want = np.asarray(keras_layer(x), np.float32)
    for make in VARIANTS.values():
        layer = make(**config)
        layer(x)
        layer.set_weights(keras_layer.get_weights())
        got = layer(x)
        assert got.dtype == keras_layer(x).dtype
        assert rel_error(np.asarray(got, np.float32), want) <= 3e-2


@keras.saving.register_keras_serializable(package="convrewrite_test")
class _Block(keras.layers.Layer):
    """A custom layer holding a SeparableConv2D (no graph to rewire: the conv is swapped in place)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.SeparableConv2D(4, 13, padding="same")

    def call(self, x):
        return x[..., :1] + self.conv(x)


def _model():
    inp = keras.Input((14, 14, 4))
    y = keras.layers.SeparableConv2D(4, 13, padding="same", name="sep")(inp)
    y = _Block(name="block")(y)
    return keras.Model(inp, y)


@pytest.mark.parametrize("forced", ["sep-fft", "sep-fft-tiled", "sep-wide", "direct"])
def test_plan_lists_separable_convs_and_optimize_forces_them(rng, forced):
    model = _model()
    plan = convrewrite.plan(model)
    sites = {r.site: r for r in plan.rows}
    assert sites["sep"].spec.kind == "separable_conv2d" and len(sites) == 2
    for site in sites:
        plan = plan.force(site, forced)
    new = convrewrite.optimize(model, plan=plan)
    assert new.convrewrite_report.passed
    x = rng.standard_normal((2, 14, 14, 4)).astype("float32")
    assert rel_error(new(x), model(x)) <= TOL
    want = keras.layers.SeparableConv2D if forced == "direct" else implementations.get(forced).make_layer(
        model.get_layer("sep"), sites["sep"].spec).__class__
    assert type(new.get_layer("sep")) is want
    assert type(new.get_layer("block").conv) is want


def test_implementations_apply_to_their_kind_only():
    sep = ConvSpec(kind="separable_conv2d", in_channels=4, filters=4, kernel=13, height=14, width=14)
    dw = ConvSpec(kind="depthwise_conv2d", in_channels=4, filters=4, kernel=13, groups=4, height=14, width=14)
    for name in ("sep-fft", "sep-fft-tiled", "sep-wide"):
        assert implementations.get(name).applicable(sep)[0] and not implementations.get(name).applicable(dw)[0]
    for name in ("fft", "fft-tiled", "depthwise-wide", "depthwise", "pac"):
        assert not implementations.get(name).applicable(sep)[0]
    assert not implementations.get("sep-wide").applicable(sep.__class__(**{**sep.to_dict(), "kernel": (7, 7)}))[0]
