"""keras_hub backbones as users build them (constructor arguments, small sizes, no downloads).

Skipped where keras_hub is not installed (it is no dependency of convrewrite: its own dependencies include
tensorflow-text). To run: a virtual environment with `pip install --no-deps keras-hub tokenizers`."""

import warnings

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite.verify import random_inputs
from conftest import rel_error

keras_hub = pytest.importorskip("keras_hub")


def _images(model, rng):
    return random_inputs(model, batch=2, seed=int(rng.integers(1 << 30)))  # in the model's input structure


def _outputs(model, x):
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(model(x))]


def _dinov2():
    return keras_hub.models.DINOV2Backbone(patch_size=14, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32,
                                           image_shape=(56, 56, 3), position_embedding_shape=(56, 56, 3))


def test_dinov2_patch_conv_held_in_a_custom_layer_is_planned_swapped_and_saved(rng, tmp_path):
    model = _dinov2()
    x = _images(model, rng)
    expected = _outputs(model, x)
    plan = convrewrite.plan(model, cost_model=None)
    site = "embeddings/patch_embeddings/projection"
    assert site in [row.site for row in plan]
    fast = convrewrite.optimize(model, plan=plan.force(site, "fft"), inputs=x)
    assert fast.convrewrite_report.passed
    assert "DINOV2Backbone" in fast.convrewrite_report.model_class  # not kept, and the report says so
    patch = fast.get_layer("embeddings").patch_embeddings.projection
    assert type(patch).__name__ == "FFTConv2D"
    assert type(model.get_layer("embeddings").patch_embeddings.projection) is keras.layers.Conv2D
    for a, b in zip(_outputs(fast, x), expected):
        assert rel_error(a, b) <= 1e-5
    fast.save(tmp_path / "dinov2.keras")
    loaded = keras.models.load_model(tmp_path / "dinov2.keras")
    assert type(loaded.get_layer("embeddings").patch_embeddings.projection).__name__ == "FFTConv2D"
    for a, b in zip(_outputs(loaded, x), _outputs(fast, x)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("make", [
    lambda: keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2,
                                         hidden_dim=16, mlp_dim=32),
    lambda: keras_hub.models.MiTBackbone(layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
                                         layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0,
                                         layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2],
                                         image_shape=(32, 32, 3), hidden_dims=[8, 16]),
], ids=["vit", "mit"])
def test_backbones_with_layers_that_cannot_be_recreated_convert_and_stay_equivalent(make, rng):
    model = make()
    x = _images(model, rng)
    expected = _outputs(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # shared layers are warned about; the report lists them
        fast = convrewrite.optimize(model, cost_model=None, inputs=x)
    assert fast.convrewrite_report.passed
    for a, b in zip(_outputs(fast, x), expected):
        assert rel_error(a, b) <= 1e-5
    for row in fast.convrewrite_plan:  # held in a layer that cannot be copied: kept, and the row says why
        if any("cannot be re-created" in why for why in row.candidates.values()):
            assert row.choice == "direct"
