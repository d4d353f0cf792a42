"""keras_hub backbones and a Task as users build them (constructor arguments, small sizes, no downloads): each
converts, keeps its class and attributes, stays equivalent, and round-trips through `.keras` in a fresh process.

Skipped where keras_hub is not installed (the `test` extra installs it)."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import convrewrite
from convrewrite.verify import random_inputs
from conftest import rel_error

keras_hub = pytest.importorskip("keras_hub")
models = keras_hub.models


def _outputs(model, x):
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(model(x))]


def _classifier():
    backbone = models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block", image_shape=(32, 32, 3))
    converter = keras_hub.layers.ResNetImageConverter(image_size=(32, 32), scale=1 / 255.0)
    return models.ResNetImageClassifier(backbone=backbone, num_classes=5,
                                        preprocessor=models.ResNetImageClassifierPreprocessor(image_converter=converter))


ZOO = {
    "resnet_basic": lambda: models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block", image_shape=(32, 32, 3)),
    "resnet_preact_bottleneck": lambda: models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="bottleneck_block",
        use_pre_activation=True, image_shape=(32, 32, 3)),
    "vgg": lambda: models.VGGBackbone(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16],
                                      image_shape=(32, 32, 3)),
    "densenet": lambda: models.DenseNetBackbone(stackwise_num_repeats=[1, 1], growth_rate=8, image_shape=(32, 32, 3)),
    "xception": lambda: models.XceptionBackbone(stackwise_conv_filters=[[8, 16], [16, 16]],
                                                stackwise_pooling=[True, False], image_shape=(32, 32, 3)),
    "vitdet": lambda: models.ViTDetBackbone(
        hidden_size=16, num_layers=1, intermediate_dim=32, num_heads=2, global_attention_layer_indices=[0],
        image_shape=(32, 32, 3), patch_size=8, num_output_channels=8, window_size=2),
    "vit": lambda: models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2,
                                      hidden_dim=16, mlp_dim=32),
    "mit": lambda: models.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[2, 1],
        max_drop_path_rate=0.0, layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2], image_shape=(32, 32, 3),
        hidden_dims=[8, 16]),
    "dinov2": lambda: models.DINOV2Backbone(
        patch_size=14, num_layers=1, hidden_dim=16, num_heads=2, intermediate_dim=32, image_shape=(56, 56, 3),
        position_embedding_shape=(56, 56, 3)),
    "resnet_classifier": _classifier,
}


def _fft_site(plan):
    """A conv site the FFT can take (a plain conv with a kernel larger than 1x1, in a layer that can be copied),
    so a replacement is saved."""
    for row in plan:
        copyable = not any("cannot be re-created" in str(why) for why in row.candidates.values())
        if row.spec.kind == "conv2d" and row.spec.groups == 1 and max(row.spec.kernel) > 1 and copyable:
            return row.site
    return None


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{name: (original, optimized, inputs, saved path)} for the whole zoo, converted once."""
    folder = tmp_path_factory.mktemp("keras_hub")
    rng = np.random.default_rng(7)
    out = {}
    for name, make in ZOO.items():
        model = make()
        x = random_inputs(model, batch=2, seed=int(rng.integers(1 << 30)))
        plan = convrewrite.plan(model, cost_model=None)
        site = _fft_site(plan)
        if site is not None:
            plan = plan.force(site, "fft")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # shared layers are warned about; the report lists them
            fast = convrewrite.optimize(model, plan=plan, inputs=x)
        path = folder / f"{name}.keras"
        fast.save(path)
        np.savez(folder / f"{name}.in.npz", *[np.asarray(t) for t in keras.tree.flatten(x)])
        out[name] = (model, fast, x, path, site)
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_converts_keeps_its_class_and_attributes_and_stays_equivalent(name, converted):
    model, fast, x, _, site = converted[name]
    assert type(fast) is type(model), fast.convrewrite_report.model_class
    assert fast.convrewrite_report.passed and fast.convrewrite_report.model_class == ""
    for a, b in zip(_outputs(fast, x), _outputs(model, x)):
        assert rel_error(a, b) <= 1e-5
    if site is not None:
        assert type(walk_layer(fast, site)).__name__ == "FFTConv2D"
        assert type(walk_layer(model, site)) is keras.layers.Conv2D  # the original is untouched
    assert fast.get_config() == model.get_config()  # its constructor arguments, carried over


def walk_layer(model, path):
    return convrewrite.graph.walk(model).layers[path]


def test_dinov2_patch_conv_held_in_a_custom_layer_is_a_site(converted):
    model, fast, _, _, site = converted["dinov2"]
    assert site == "embeddings/patch_embeddings/projection"
    assert type(fast.get_layer("embeddings").patch_embeddings.projection).__name__ == "FFTConv2D"


def test_backbone_attributes_point_into_the_optimized_graph(converted):
    model, fast, x, _, _ = converted["resnet_basic"]
    assert sorted(fast.pyramid_outputs) == sorted(model.pyramid_outputs)
    pyramid = keras.Model(fast.inputs, fast.pyramid_outputs)  # tensors of the optimized graph, not the original's
    expected = keras.Model(model.inputs, model.pyramid_outputs)(x)
    for key, value in pyramid(x).items():
        assert rel_error(keras.ops.convert_to_numpy(value), keras.ops.convert_to_numpy(expected[key])) <= 1e-5


def test_task_keeps_its_preprocessor_backbone_and_compile_state(converted, rng):
    model, fast, _, _, _ = converted["resnet_classifier"]
    assert type(fast.backbone) is type(model.backbone) and fast.backbone is not model.backbone
    assert type(fast.preprocessor) is type(model.preprocessor)
    assert fast.compiled and fast.get_compile_config() == model.get_compile_config()
    raw = rng.uniform(0, 255, (2, 48, 40, 3)).astype("float32")  # raw images: the preprocessor resizes and scales
    assert rel_error(fast.predict(raw, verbose=0), model.predict(raw, verbose=0)) <= 1e-5
    assert any(c.name == "predict()" and c.passed for c in fast.convrewrite_report.outputs)


def test_a_lost_preprocessor_fails_verification(converted):
    model, _, x, _, _ = converted["resnet_classifier"]
    plain = keras.Model(model.inputs, model.outputs)  # the same graph without the Task's preprocessing
    report = convrewrite.verify(model, plain, inputs=x, sites=False)
    assert not report.passed
    assert [c.name for c in report.outputs if not c.passed] == ["predict()"]


_LOAD_SCRIPT = """
import json, sys
import numpy as np, keras
import convrewrite  # noqa: F401  registers the layers and the plan applied on loading
out = {}
for name, path in json.loads(sys.argv[1]).items():
    model = keras.models.load_model(path)
    with np.load(path[:-len(".keras")] + ".in.npz") as f:
        xs = [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]
    x = xs[0] if len(xs) == 1 else xs
    fft = [type(l).__name__ for l in model._flatten_layers() if type(l).__name__ == "FFTConv2D"]
    ys = [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(model(x))]
    np.savez(path + ".out.npz", *ys)
    out[name] = {"class": type(model).__name__, "fft": len(fft)}
print(json.dumps(out))
"""


def test_every_model_loads_in_a_fresh_process_with_its_class_and_replacements(converted):
    paths = {name: str(path) for name, (_, _, _, path, _) in converted.items()}
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, json.dumps(paths)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for name, (model, fast, x, path, site) in converted.items():
        assert loaded[name]["class"] == type(model).__name__
        assert loaded[name]["fft"] == (1 if site else 0), (name, loaded[name])
        with np.load(str(path) + ".out.npz") as ys:
            for i, expected in enumerate(_outputs(model, x)):
                assert rel_error(ys[f"arr_{i}"], expected) <= 1e-5, name
