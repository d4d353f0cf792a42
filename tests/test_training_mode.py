"""optimize(mode="training"): the graph is kept (BN, branches), and with measure=True the plan comes from
forward + backward timings of the model's own conv shapes; the result trains as the original does."""

import keras
import numpy as np

import convrewrite
from convrewrite import api, profile
from convrewrite.spec import ConvSpec
from convrewrite.verify import relative_error
from conftest import gradients

L = keras.layers


def _wide_model():
    inp = keras.Input((24, 24, 4))
    y = L.Conv2D(8, 15, padding="same", use_bias=False, name="wide")(inp)  # a bias before BN has no gradient
    y = L.BatchNormalization(name="bn")(y)
    return keras.Model(inp, L.Conv2D(3, 3, padding="same", name="out")(L.ReLU()(y)))


def test_time_spec_times_forward_and_backward():
    spec = ConvSpec(kind="conv2d", in_channels=4, filters=8, kernel=(9, 9), height=16, width=16, batch=2,
                    padding="same")
    forward = profile.time_spec(spec, allow=["direct"], repeats=2)
    training = profile.time_spec(spec, allow=["direct"], repeats=2, training=True)
    assert set(forward) == set(training) == {"direct"} and training["direct"] > 0


def test_training_plan_is_timed_forward_backward_and_gradients_match():
    model = _wide_model()
    fast = convrewrite.optimize(model, mode="training", measure=True, batch=2, check_speed=True)
    plan = fast.convrewrite_plan
    assert plan.mode == "training" and not plan.rewrites
    assert set(plan.prediction_sources()) == {api.TRAINING_TIMED}
    assert any(isinstance(layer, L.BatchNormalization) for layer in fast.layers)
    assert "training" in fast.convrewrite_speed.not_measured
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 24, 24, 4)).astype("float32")
    grads = []
    for m in (model, fast):
        grads.append(gradients(lambda t, m=m: m(t, training=True) ** 2, x, m.trainable_variables)[1:])
    for a, b in zip(*grads):
        assert relative_error(np.reshape(b, a.shape), a) <= 1e-4
