"""A keras.applications model through the FFT rewrites (the application tests otherwise see only `direct` and
`depthwise`): a seeded sample of MobileNetV2's sites forced to fft / fft-tiled, random BatchNorm statistics so
that no branch is near-zero, compared with the original and with no fallback."""

import os
import random

import keras
import numpy as np

import convrewrite
from convrewrite.layers.fft import FFTConv2D, FFTDepthwiseConv2D
from convrewrite.verify import random_inputs
from conftest import rel_error

FULL = os.environ.get("CONVREWRITE_FULL_MATRIX", "0") not in ("", "0")


def test_mobilenet_v2_sites_forced_to_fft(rng):
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35,
                                             classifier_activation=None)  # logits: a softmax would flatten differences
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.standard_normal(beta.shape) * 0.1,
                               rng.standard_normal(mean.shape) * 0.1, rng.uniform(0.5, 1.5, var.shape)])
    plan = convrewrite.plan(model, cost_model=None)
    sites = [r.site for r in plan]
    chosen = sites if FULL else random.Random(16).sample(sites, 8)
    # both kinds of site and a strided one are in the sample
    kinds = {(plan.row(s).spec.kind, max(plan.row(s).spec.strides) > 1) for s in chosen}
    assert {k for k, _ in kinds} == {"conv2d", "depthwise_conv2d"} and any(s for _, s in kinds)
    for i, site in enumerate(chosen):
        plan.force(site, "fft" if i % 2 == 0 else "fft-tiled")
    inputs = random_inputs(model, batch=2, seed=5)
    before = keras.ops.convert_to_numpy(model(inputs))
    fast = convrewrite.optimize(model, plan=plan, check_speed=False)
    assert fast.convrewrite_report.fallbacks == [] and fast.convrewrite_report.passed
    for site in chosen:
        assert isinstance(fast.get_layer(site), (FFTConv2D, FFTDepthwiseConv2D)), site
    assert rel_error(keras.ops.convert_to_numpy(fast(inputs)), before) <= 1e-5
