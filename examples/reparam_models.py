"""Structurally re-parameterized networks, as trained: parallel branches with BatchNormalization that
`convrewrite.optimize` (mode="inference", the default) merges into one convolution per block.

    python examples/reparam_models.py        # optimize both, print each plan (with its rewrites) and report

- RepVGG-style: every block is 3x3 conv + BN, 1x1 conv + BN and (stride 1, same width) an identity BN, summed,
  then ReLU; merged, each block is one 3x3 conv with ReLU.
- RepLK-style (RepLKNet / SLaK): each block is a 31x31 depthwise conv + BN with a parallel 5x5 depthwise
  conv + BN, summed, ReLU, then a 1x1 conv + BN and a residual add; merged, each block's large kernel is one
  31x31 depthwise conv, which the planner may put on an FFT layer with a cached spectrum.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

L = keras.layers


def repvgg_block(x, filters, strides, name):
    """x: (batch, H, W, C) -> (batch, H/strides, W/strides, filters)."""
    a = L.Conv2D(filters, 3, strides, padding="same", use_bias=False, name=f"{name}_3x3")(x)
    a = L.BatchNormalization(name=f"{name}_3x3_bn")(a)
    b = L.Conv2D(filters, 1, strides, padding="same", use_bias=False, name=f"{name}_1x1")(x)
    b = L.BatchNormalization(name=f"{name}_1x1_bn")(b)
    branches = [a, b]
    if strides == 1 and x.shape[-1] == filters:
        branches.append(L.BatchNormalization(name=f"{name}_identity_bn")(x))
    return L.ReLU(name=f"{name}_relu")(L.Add(name=f"{name}_add")(branches))


def repvgg_model(input_shape=(96, 96, 3), widths=(32, 64, 128, 256), depths=(1, 2, 4, 1)):
    """RepVGG-A-style: a stride-2 block (3x3 + 1x1, no identity) opens each stage."""
    x = inp = keras.Input(input_shape)
    x = repvgg_block(x, widths[0], 2, "stem")
    for stage, (width, depth) in enumerate(zip(widths, depths)):
        for i in range(depth):
            x = repvgg_block(x, width, 2 if i == 0 and stage > 0 else 1, f"s{stage}_b{i}")
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(10, name="head")(x), name="repvgg")


def replk_block(x, large, small, name):
    """x: (batch, H, W, C) -> same shape."""
    channels = x.shape[-1]
    a = L.DepthwiseConv2D(large, padding="same", use_bias=False, name=f"{name}_dw{large}")(x)
    a = L.BatchNormalization(name=f"{name}_dw{large}_bn")(a)
    b = L.DepthwiseConv2D(small, padding="same", use_bias=False, name=f"{name}_dw{small}")(x)
    b = L.BatchNormalization(name=f"{name}_dw{small}_bn")(b)
    y = L.ReLU(name=f"{name}_relu")(L.Add(name=f"{name}_add")([a, b]))
    y = L.Conv2D(channels, 1, use_bias=False, name=f"{name}_pw")(y)
    y = L.BatchNormalization(name=f"{name}_pw_bn")(y)
    return L.Add(name=f"{name}_residual")([x, y])


def replk_model(input_shape=(56, 56, 64), blocks=4, large=31, small=5):
    """RepLKNet-style stage: `blocks` blocks of a large depthwise kernel with a parallel small one."""
    x = inp = keras.Input(input_shape)
    for i in range(blocks):
        x = replk_block(x, large, small, f"b{i}")
    return keras.Model(inp, x, name="replk")


def randomize_batchnorm(model, seed=0):
    """Give every BN the non-trivial statistics a trained network has (a fresh one folds to identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.1, n),
                               rng.uniform(0.5, 2.0, n)])
    return model


def main():
    import convrewrite

    for build in (repvgg_model, replk_model):
        model = randomize_batchnorm(build())
        fast = convrewrite.optimize(model)
        print(fast.convrewrite_plan.summary())
        print()
        print(fast.convrewrite_report.summary())
        print()


if __name__ == "__main__":
    main()
